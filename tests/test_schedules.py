"""LR schedule lengths: an explicit `lr_decay_steps` is kept as given, down to a single step.

ED2's rule replaces only null or < 1 with the automatic 1.5 x run length; a 1-step decay is a
legitimate setting (LR at full value for the first step, then at the schedule's end value) and
must not be mistaken for "unset". Exact LR curves of longer schedules are in test_optim_step.py.
"""

from __future__ import annotations

import pytest
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json

from trainer.optim.schedules import resolve_decay_steps

RUN_STEPS = 100  # optimizer steps of the run: the automatic decay would be 150


def _unet_set(base: dict):
    """An OptimizerSet for a UNet-only run of RUN_STEPS optimizer steps, built from optimizer.json."""
    return build_from_json(
        {"base": {"optimizer": "sgd", "lr": 1.0, **base}},
        unet=Regressor(),
        text_encoder=tiny_text_encoder(2),
        steps=RUN_STEPS,
        disable_textenc_training=True,
    )


def _lr_curve(opt_set, steps: int) -> list[float]:
    """The UNet LR before any step and after each of `steps` optimizer steps (no gradients: the
    schedule advances on skipped steps too)."""
    curve = [opt_set.learning_rates()["unet"]]
    for _ in range(steps):
        opt_set.step()
        curve.append(opt_set.learning_rates()["unet"])
    return curve


@pytest.mark.parametrize(("decay", "expected"), [(1, 1), (2, 2), (7, 7), (0, 150), (-3, 150), (None, 150)])
def test_resolve_decay_steps_keeps_explicit_values_and_autos_only_below_one(decay, expected):
    assert resolve_decay_steps(decay, RUN_STEPS) == expected


@pytest.mark.parametrize(
    ("scheduler", "curve"),
    [
        ("linear", [1.0, 0.0, 0.0, 0.0, 0.0]),  # stays at 0 after the decay
        ("cosine", [1.0, 0.0]),  # diffusers' cosine rises again after its decay (warned about)
    ],
)
def test_one_step_decay_is_kept_and_the_lr_reaches_its_end_after_one_step(scheduler, curve):
    opt_set = _unet_set({"lr_scheduler": scheduler, "lr_decay_steps": 1})
    resolved = opt_set.components["unet"].resolved
    # warmup null -> int(decay / 50): 0 for a 1-step decay (3 if the decay had become 150)
    assert (resolved.lr_decay_steps, resolved.lr_warmup_steps) == (1, 0)
    assert _lr_curve(opt_set, len(curve) - 1) == pytest.approx(curve, abs=1e-12)


def test_two_step_linear_decay_halves_then_ends():
    opt_set = _unet_set({"lr_scheduler": "linear", "lr_warmup_steps": 0, "lr_decay_steps": 2})
    assert _lr_curve(opt_set, 3) == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
