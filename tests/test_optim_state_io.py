"""Optimizer state loads in the dtypes it was saved in (trainer/optim/state_io.py)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from trainer.optim.state_io import load_optimizer_state


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(dtype)


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x).float(), y).backward()
    opt.step()


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _prodigy_sf(params):
    import prodigyplus  # a required dependency (pyproject.toml): a broken install must fail, not skip

    opt = prodigyplus.ProdigyPlusScheduleFree(params, lr=1.0)
    opt.train()
    return opt


def _adamw_fp32_moments(params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    return opt


@pytest.mark.parametrize(
    ("make", "dtype"),
    [(_prodigy_sf, torch.float32), (_adamw_fp32_moments, torch.bfloat16)],
    ids=["prodigy_sf-bf16-state-fp32-weights", "adamw-fp32-state-bf16-weights"],
)
def test_resumed_optimizer_keeps_state_dtypes_and_matches_the_straight_run(make, dtype):
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    straight = _model(dtype)
    opt = make(straight.parameters())
    if dtype == torch.bfloat16:  # fp32 moments beside bf16 weights, as stochastic rounding keeps them
        for p in straight.parameters():
            opt.state[p].update(
                step=torch.tensor(0.0),
                exp_avg=torch.zeros_like(p, dtype=torch.float32),
                exp_avg_sq=torch.zeros_like(p, dtype=torch.float32),
            )
    for _ in range(3):
        if dtype == torch.bfloat16:
            _fp32_adamw_step(straight, opt, x, y)
        else:
            _step(straight, opt, x, y)
    saved = _round_trip({"opt": opt.state_dict(), "weights": straight.state_dict()})
    saved_dtypes = {
        (i, k): v.dtype for i, e in saved["opt"]["state"].items() for k, v in e.items() if torch.is_tensor(v)
    }
    assert any(d != dtype for d in saved_dtypes.values())  # state kept in another dtype than the weights

    resumed = _model(dtype)
    resumed.load_state_dict(saved["weights"])
    opt2 = make(resumed.parameters())
    load_optimizer_state(opt2, saved["opt"])
    params2 = list(resumed.parameters())
    assert {
        (i, k): v.dtype for i, p in enumerate(params2) for k, v in opt2.state[p].items() if torch.is_tensor(v)
    } == saved_dtypes

    for _ in range(40):
        for model, o in ((straight, opt), (resumed, opt2)):
            if dtype == torch.bfloat16:
                _fp32_adamw_step(model, o, x, y)
            else:
                _step(model, o, x, y)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, opt2.state[q][key]), key


def _fp32_adamw_step(model, opt, x, y) -> None:
    """AdamW with fp32 moments on bf16 weights (what stochastic rounding's step keeps): the
    update is computed in fp32 and rounded to the weights' bf16."""
    opt.zero_grad()
    nn.functional.mse_loss(model(x).float(), y).backward()
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    with torch.no_grad():
        for p in model.parameters():
            st = opt.state[p]
            st["step"] += 1
            g = p.grad.float()
            st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            t = float(st["step"])
            update = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"])
            p.copy_((p.float() - group["lr"] * update).to(p.dtype))
