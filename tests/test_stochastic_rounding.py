"""Stochastic rounding to bf16: unbiased, always a neighbour, and small updates accumulate."""

from __future__ import annotations

import pytest
import torch

from trainer.stochastic_rounding import step_with_stochastic_rounding, stochastic_round_


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above (truncate toward zero, then one ulp outward)."""
    down = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    up = (down.view(torch.int32) + (1 << 16)).view(torch.float32)
    return down, up


def test_mean_of_many_rounds_is_the_fp32_value():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(512, generator=gen) * torch.logspace(-3, 3, 512)
    dst = torch.empty(512, dtype=torch.bfloat16)
    total = torch.zeros(512, dtype=torch.float64)
    rounds = 4000
    for _ in range(rounds):
        total += stochastic_round_(dst, src, gen).double()
    ulp = src.abs().double() * 2.0**-7
    # Std of the mean of a two-point variable is <= ulp / (2 sqrt(rounds)) ~ 0.008 ulp; allow 6x.
    assert ((total / rounds - src.double()).abs() / ulp).max() < 0.05
    # Round-to-nearest is biased on these values; SR must do better than it on average.
    nearest_err = (src.bfloat16().double() - src.double()).abs().mean()
    assert (total / rounds - src.double()).abs().mean() < nearest_err / 5


def test_result_is_always_one_of_the_two_neighbours_and_exact_values_stay():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(10_000, generator=gen)
    down, up = _neighbours(src)
    out = stochastic_round_(torch.empty_like(src, dtype=torch.bfloat16), src, gen).float()
    assert bool(((out == down) | (out == up)).all())
    assert bool((out == up).any() and (out == down).any())
    exact = src.bfloat16().float()
    assert torch.equal(
        stochastic_round_(torch.empty_like(exact, dtype=torch.bfloat16), exact, gen).float(), exact
    )
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    got = stochastic_round_(torch.empty(5, dtype=torch.bfloat16), special, gen).float()
    assert (
        torch.isnan(got[0])
        and got[1] == float("inf")
        and got[2] == -float("inf")
        and bool((got[3:] == 0).all())
    )


def test_rejects_wrong_dtypes():
    with pytest.raises(TypeError):
        stochastic_round_(torch.empty(2), torch.zeros(2))
    with pytest.raises(TypeError):
        stochastic_round_(torch.empty(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64))


def test_small_updates_accumulate_in_bf16_weights():
    """SGD steps of 1e-4 at weight 1.0 (ulp 2^-7): round-to-nearest never moves, SR tracks fp32."""
    gen = torch.Generator().manual_seed(2)
    sr = torch.nn.Parameter(torch.ones(2048, dtype=torch.bfloat16))
    rne = torch.nn.Parameter(torch.ones(2048, dtype=torch.bfloat16))
    opt_sr, opt_rne = torch.optim.SGD([sr], lr=1e-4), torch.optim.SGD([rne], lr=1e-4)
    for _ in range(200):
        sr.grad, rne.grad = torch.ones_like(sr), torch.ones_like(rne)
        step_with_stochastic_rounding(opt_sr, gen)
        opt_rne.step()
    assert bool((rne == 1.0).all())  # every update lost
    assert sr.dtype == torch.bfloat16 and sr.grad.dtype == torch.bfloat16
    assert abs(sr.detach().double().mean().item() - (1 - 200 * 1e-4)) < 1e-3


def test_optimizer_state_is_fp32_for_bf16_weights():
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    step_with_stochastic_rounding(opt, gen)
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert p.dtype == torch.bfloat16 and bool((p < 1).any())


def _bf16_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    return model.to(torch.bfloat16)


def _train(model, chunk_bytes, steps: int = 3, hook=None):
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if hook is not None:
        opt.register_step_pre_hook(hook)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for _ in range(steps):
        model(x).float().square().mean().backward()
        step_with_stochastic_rounding(opt, gen, chunk_bytes=chunk_bytes)
        opt.zero_grad(set_to_none=True)
    return opt


def test_chunked_rounding_bounds_fp32_copies_and_keeps_the_update():
    """Each optimizer call sees at most one chunk of fp32 stand-ins (plus one parameter)."""
    seen = []

    def count(opt, args, kwargs):
        seen.append(sum(4 * p.numel() for g in opt.param_groups for p in g["params"] if p.grad is not None))

    chunk = 4 * 64 * 64 + 4 * 64  # one Linear(64, 64)'s weight and bias
    chunked, whole = _bf16_model(), _bf16_model()
    opt = _train(chunked, chunk, hook=count)
    _train(whole, None)
    assert max(seen) <= chunk and len(seen) == 3 * 3  # 3 steps x 3 chunks
    assert all(s.dtype == torch.float32 for st in opt.state.values() for k, s in st.items() if k != "step")
    for a, b in zip(chunked.parameters(), whole.parameters(), strict=True):
        assert a.dtype == torch.bfloat16
        # Same fp32 update; the random bits come in other chunk sizes, so at most one ulp apart.
        ulp = (b.detach().float().abs() * 2**-7).clamp(min=2**-133)
        assert bool(((a.float() - b.float()).abs() <= ulp).all())


def test_parameters_are_never_retyped_so_ddp_hooks_stay_attached():
    """Retyping p.data (bf16 -> fp32 -> bf16) replaces the parameter's gradient accumulator, the
    node DDP's all-reduce hooks sit on: replicas then silently stopped syncing after step 1."""
    model = _bf16_model()
    weight = model[0].weight
    before = weight.view_as(weight).grad_fn.next_functions[0][0]  # the AccumulateGrad node
    _train(model, 4 * 64 * 64, steps=1)
    assert weight.view_as(weight).grad_fn.next_functions[0][0] is before
