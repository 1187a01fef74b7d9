"""Schedules (exact values, once per optimizer step), clipping, non-finite skips, GradScaler, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json, regression_data
from torch import nn

from trainer.optim import grad_scaler_tweak
from trainer.optim.grad_scaler import apply_grad_scaler_tweak
from trainer.runtime.errors import CheckpointError


def _unet_only(base: dict, steps: int = 100, model: nn.Module | None = None, **settings):
    model = model or Regressor()
    opt_set = build_from_json(
        {"base": {"optimizer": "sgd", **base}},
        unet=model,
        text_encoder=tiny_text_encoder(2),
        steps=steps,
        disable_textenc_training=True,
        **settings,
    )
    return model, opt_set


def _lrs_at(base: dict, at: list[int], steps: int = 100) -> list[float]:
    """LR after k optimizer steps, for each k in `at` (steps without grads: the schedule still moves)."""
    _, opt_set = _unet_only({"lr": 1.0, **base}, steps)
    out, done = [], 0
    for k in at:
        while done < k:
            opt_set.step()
            done += 1
        out.append(opt_set.learning_rates()["unet"])
    return out


def test_cosine_with_warmup_exact(caplog):
    got = _lrs_at(
        {"lr_scheduler": "cosine", "lr_warmup_steps": 10, "lr_decay_steps": 100}, [0, 5, 10, 55, 100, 120]
    )
    # diffusers' cosine keeps going past decay_steps (rises again): pinned, and warned about
    # because this run has 200 optimizer steps > 100 decay steps.
    past_end = 0.5 * (1 + math.cos(math.pi * 110 / 90))
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, past_end], abs=1e-12)
    assert "rises again" not in caplog.text
    _lrs_at({"lr_scheduler": "cosine", "lr_warmup_steps": 10, "lr_decay_steps": 100}, [0], steps=200)
    assert "rises again" in caplog.text


def test_linear_polynomial_restarts_exact():
    assert _lrs_at(
        {"lr_scheduler": "linear", "lr_warmup_steps": 0, "lr_decay_steps": 10}, [0, 3, 10]
    ) == pytest.approx([1.0, 0.7, 0.0])
    poly = _lrs_at(
        {"lr_scheduler": "polynomial", "lr_warmup_steps": 0, "lr_decay_steps": 10, "lr_scheduler_power": 2.0},
        [0, 5],
    )
    assert poly == pytest.approx([1.0, (1 - 1e-7) * 0.25 + 1e-7])
    restarts = _lrs_at(
        {
            "lr_scheduler": "cosine_with_restarts",
            "lr_warmup_steps": 0,
            "lr_decay_steps": 10,
            "lr_scheduler_num_cycles": 2,
        },
        [2, 5],
    )
    assert restarts == pytest.approx([0.5 * (1 + math.cos(math.pi * 0.4)), 1.0])


def test_constant_ignores_warmup_and_constant_with_warmup_uses_it():
    assert _lrs_at({"lr_scheduler": "constant", "lr_warmup_steps": 5}, [0, 3]) == [1.0, 1.0]
    got = _lrs_at({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4}, [0, 2, 4, 50])
    assert got == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_auto_decay_and_warmup_follow_ed2():
    _, opt_set = _unet_only({"lr": 1.0, "lr_scheduler": "cosine"}, steps=100)
    resolved = opt_set.components["unet"].resolved
    assert (resolved.lr_decay_steps, resolved.lr_warmup_steps) == (150, 3)
    _, opt_set = _unet_only({"lr": 1.0, "lr_decay_steps": 0, "lr_warmup_steps": 0}, steps=40)
    resolved = opt_set.components["unet"].resolved
    assert (resolved.lr_decay_steps, resolved.lr_warmup_steps) == (60, 0)  # decay <1 = auto; warmup 0 = 0


def test_schedule_advances_once_per_optimizer_step_with_grad_accum():
    grad_accum = 4
    model, opt_set = _unet_only(
        {"lr": 1.0, "lr_scheduler": "linear", "lr_warmup_steps": 0, "lr_decay_steps": 10}
    )
    x, y = regression_data()
    for _ in range(3):  # three optimizer steps, each after 4 micro-batch backwards
        for micro in range(grad_accum):
            nn.functional.mse_loss(model(x[micro::grad_accum]), y[micro::grad_accum]).backward()
        opt_set.step()
    scheduler = opt_set.components["unet"].lr_scheduler
    assert scheduler.last_epoch == 3
    assert opt_set.learning_rates()["unet"] == pytest.approx(0.7)


def test_clipping_uses_and_reports_pre_clip_norm():
    model, opt_set = _unet_only({"lr": 1.0, "momentum": 0.0}, clip_grad_norm=0.01)
    x, y = regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    pre_clip = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    result = opt_set.step()
    assert result.grad_norms["unet"].dim() == 0
    assert torch.allclose(result.grad_norms["unet"], pre_clip)
    applied = torch.linalg.vector_norm(
        torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    )
    assert applied.item() == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the update is the clipped grad
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_grad_skips_update_without_scaler():
    model, opt_set = _unet_only(
        {"lr": 1.0, "lr_scheduler": "linear", "lr_warmup_steps": 0, "lr_decay_steps": 10}
    )
    x, y = regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    result = opt_set.step()
    assert result.skipped
    assert not torch.isfinite(result.grad_norms["unet"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert opt_set.learning_rates()["unet"] == pytest.approx(0.9)  # the schedule still advances


def test_grad_scaler_unscales_and_skips_on_overflow():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, opt_set = _unet_only({"lr": 0.1, "momentum": 0.0})
    reference = copy.deepcopy(model)
    _, ref_set = _unet_only({"lr": 0.1, "momentum": 0.0}, model=reference)
    x, y = regression_data()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    result = opt_set.step(scaler)
    ref_result = ref_set.step()
    assert not result.skipped
    assert torch.allclose(result.grad_norms["unet"], ref_result.grad_norms["unet"])
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)
    # overflow: skipped, scale backs off (step() called scaler.update())
    scaler.scale(nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    before = copy.deepcopy(model.state_dict())
    assert opt_set.step(scaler).skipped
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_grad_scaler_tweak_schedule():
    assert grad_scaler_tweak(499) is None
    assert grad_scaler_tweak(500) == pytest.approx((1.8, 1 / 1.8, 100))
    assert grad_scaler_tweak(1000) == pytest.approx((1.6, 1 / 1.6, 200))
    assert grad_scaler_tweak(2000) == pytest.approx((1.3, 1 / 1.3, 500))
    assert grad_scaler_tweak(4000) == pytest.approx((1.15, 1 / 1.15, 2000))
    assert grad_scaler_tweak(8000) is None
    scaler = torch.amp.GradScaler("cpu")
    assert apply_grad_scaler_tweak(scaler, 1000)
    assert (scaler.get_growth_factor(), scaler.get_growth_interval()) == (1.6, 200)


def _two_components(config: dict):
    return build_from_json(config, unet=Regressor(), text_encoder=tiny_text_encoder(2))


def test_state_dict_mismatches_are_clear_errors():
    opt_set = _two_components({"base": {"optimizer": "adamw", "lr": 1e-3}})
    state = opt_set.state_dict()
    unet_only = build_from_json(
        {"base": {"optimizer": "adamw", "lr": 1e-3}},
        unet=Regressor(),
        text_encoder=tiny_text_encoder(2),
        disable_textenc_training=True,
    )
    with pytest.raises(CheckpointError, match="the checkpoint trains"):
        unet_only.load_state_dict(state)
    other_opt = _two_components({"base": {"optimizer": "adam", "lr": 1e-3}})
    with pytest.raises(CheckpointError, match="trained with 'adamw'"):
        other_opt.load_state_dict(state)
    frozen = _two_components(
        {"base": {"optimizer": "adamw", "lr": 1e-3}, "text_encoder_freezing": {"unfreeze_last_n_layers": 1}}
    )
    with pytest.raises(CheckpointError, match="text_encoder trainable parameters differ"):
        frozen.load_state_dict(state)


def test_state_dict_restores_schedule_position():
    opt_set = _two_components(
        {"base": {"optimizer": "adamw", "lr": 1.0, "lr_scheduler": "linear", "lr_decay_steps": 10}}
    )
    for _ in range(4):
        opt_set.step()
    fresh = _two_components(
        {"base": {"optimizer": "adamw", "lr": 1.0, "lr_scheduler": "linear", "lr_decay_steps": 10}}
    )
    fresh.load_state_dict(copy.deepcopy(opt_set.state_dict()))
    assert fresh.learning_rates() == opt_set.learning_rates()
    opt_set.step()
    fresh.step()
    assert fresh.learning_rates() == opt_set.learning_rates()


def test_summary_table_and_counts():
    opt_set = _two_components(
        {
            "base": {"optimizer": "adamw8bit", "lr": 2e-6},
            "text_encoder_overrides": {"lr": 5e-7, "lr_scheduler": "cosine"},
        }
    )
    table = opt_set.summary_table()
    for text in (
        "unet",
        "text_encoder",
        "adamw8bit (8-bit state)",
        "2e-06",
        "5e-07",
        "cosine",
        "trainable params",
    ):
        assert text in table
    counts = opt_set.trainable_parameter_count()
    assert counts["unet"] == (sum(p.numel() for p in Regressor().parameters()), 0)
    assert (
        opt_set.resolved_config()["text_encoder"]["lr_source"] == "optimizer.json text_encoder_overrides.lr"
    )
