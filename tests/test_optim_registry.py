"""Every optimizer name builds from JSON, steps, fits, keeps 8-bit state and round-trips exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json, regression_data
from torch import nn

from trainer.optim import REGISTRY

# lr that fits the toy regression in a few dozen steps (None = optimizer chooses its own).
_LR = {
    "adagrad": 0.1,
    "adam": 1e-2,
    "adamw": 1e-2,
    "lamb": 0.1,
    "lars": 0.5,
    "lion": 1e-3,
    "rmsprop": 1e-3,
    "sgd": 0.05,
    "adagrad8bit": 0.1,
    "adam8bit": 1e-2,
    "adamw8bit": 1e-2,
    "lamb8bit": 0.1,
    "lars8bit": 0.5,
    "lion8bit": 1e-3,
    "rmsprop8bit": 1e-3,
    "sgd8bit": 0.05,
    "paged_adam": 1e-2,
    "paged_adamw": 1e-2,
    "paged_adam8bit": 1e-2,
    "paged_adamw8bit": 1e-2,
    "paged_lion": 1e-3,
    "paged_lion8bit": 1e-3,
    "dadapt_adam": 1.0,
    "dadapt_lion": 1.0,
    "dadapt_sgd": 1.0,
    "dadapt_adan": 1.0,
    "dadapt_adagrad": 1.0,
    "prodigy": 1.0,
    "adafactor": None,
    "adamw_schedulefree": 1e-2,
    "sgd_schedulefree": 0.05,
    "radam_schedulefree": 1e-2,
    "prodigy_schedulefree": 1.0,
    "came": 1e-3,
    "adopt": 1e-2,
}
# Extra options per case; "adafactor_constant" is Adafactor's second mode.
_CASES = {name: (name, {}) for name in REGISTRY}
_CASES["adafactor_constant"] = ("adafactor", {"relative_step": False, "scale_parameter": False, "lr": 1e-2})
_CASES["sgd"] = ("sgd", {"momentum": 0.9})
_CASES["dadapt_sgd"] = ("dadapt_sgd", {"growth_rate": 2.0})  # D-Adapt SGD grows d slowly otherwise


def test_every_registered_name_has_a_case():
    assert set(_LR) == set(REGISTRY)


def _config(case: str) -> dict:
    name, extra = _CASES[case]
    base = {"optimizer": name, "lr": _LR[name], "weight_decay": 0.0, **extra}
    if name in ("dadapt_adam", "dadapt_adan", "dadapt_adagrad", "prodigy", "prodigy_schedulefree"):
        base["d0"] = 1e-3  # start closer to the toy problem's scale so 40 steps suffice
    return {"base": base}


def _build(case: str, model: nn.Module):
    return build_from_json(
        _config(case), unet=model, text_encoder=tiny_text_encoder(2), disable_textenc_training=True
    )


def _train_step(model, opt_set, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    result = opt_set.step()
    assert not result.skipped
    return loss.detach()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_optimizer_fits_and_round_trips(case):
    torch.manual_seed(0)
    model = Regressor()
    x, y = regression_data()
    opt_set = _build(case, model)
    assert list(opt_set.components) == ["unet"]
    optimizer = opt_set.components["unet"].optimizer
    spec = opt_set.components["unet"].spec
    assert spec.name == _CASES[case][0]

    losses = [_train_step(model, opt_set, x, y).item() for _ in range(30)]
    assert losses[-1] < 0.75 * losses[0], f"{case}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"

    state = optimizer.state[model.fc1.weight]
    if spec.eight_bit:
        assert state["state1"].dtype == torch.uint8
    else:
        assert all(v.dtype != torch.uint8 for v in state.values() if torch.is_tensor(v))

    # Save, load into a fresh model + set, and the next step is bitwise identical.
    saved = copy.deepcopy(opt_set.state_dict())
    twin = Regressor()
    twin.load_state_dict(model.state_dict())
    twin_set = _build(case, twin)
    twin_set.load_state_dict(saved)
    _train_step(model, opt_set, x, y)
    _train_step(twin, twin_set, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), case
    assert opt_set.learning_rates() == twin_set.learning_rates()


def test_effective_lr_is_d_times_lr_for_adaptive():
    model = Regressor()
    opt_set = _build("prodigy", model)
    x, y = regression_data()
    for _ in range(20):
        _train_step(model, opt_set, x, y)
    group = opt_set.components["unet"].optimizer.param_groups[0]
    assert group["d"] != 1e-3  # d moved
    assert opt_set.learning_rates()["unet"] == pytest.approx(group["d"] * group["lr"])


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("adamw", {}, True),  # the single-kernel implementation by default
        ("adam", {}, True),
        ("sgd", {}, True),
        ("adamw", {"foreach": True}, False),  # the user's explicit choice wins
        ("adamw", {"fused": False}, False),
        ("adamw8bit", {}, False),  # bitsandbytes has its own kernels
        ("rmsprop", {}, False),  # no fused implementation
    ],
)
def test_torch_optimizers_prefer_the_fused_kernel(name, options, expected):
    from trainer.optim.registry import get_spec, prefer_fused_kernel

    assert prefer_fused_kernel(get_spec(name), options) is expected


def test_cpu_build_takes_the_fused_kernel_unless_the_user_chose():
    from trainer.optim.registry import build_optimizer, get_spec

    opt = build_optimizer(get_spec("adamw"), [nn.Parameter(torch.zeros(4))], 1e-3, {})
    assert opt.defaults["fused"] is True
    opt = build_optimizer(get_spec("adamw"), [nn.Parameter(torch.zeros(4))], 1e-3, {"foreach": True})
    assert opt.defaults["fused"] is None
