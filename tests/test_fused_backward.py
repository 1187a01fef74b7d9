"""Optimizer step fused into backward: same result as a normal step, gradients freed, guards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.optim import OptimizerFile, SectionConfig, TrainOptimSettings, build_optimizers
from trainer.optim.fused_backward import attach_fused_backward, fused_backward_from_optimizer_set
from trainer.runtime.errors import ConfigError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def _loss(net: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(5, 6, generator=gen)
    return net(x).pow(2).mean()


def _warmup_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


def test_matches_a_normal_adamw_step_and_frees_gradients():
    ref, fused_net = _net(), _net()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    sched = _warmup_schedule(opt)
    fused = attach_fused_backward(
        list(fused_net.named_parameters()),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lr_scheduler_factory=_warmup_schedule,
    )
    for step in range(4):
        _loss(ref, step).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _loss(fused_net, step).backward()
        assert all(p.grad is None for p in fused_net.parameters())
    for a, b in zip(ref.parameters(), fused_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(fused.learning_rates().values()) == {opt.param_groups[0]["lr"]}


def test_state_dict_round_trip_resumes_identically():
    def make(ps):
        return torch.optim.AdamW(ps, lr=1e-2)

    straight = _net()
    attach_fused_backward(list(straight.named_parameters()), make, lr_scheduler_factory=_warmup_schedule)
    for step in range(3):
        _loss(straight, step).backward()

    first = _net()
    fused = attach_fused_backward(list(first.named_parameters()), make, lr_scheduler_factory=_warmup_schedule)
    _loss(first, 0).backward()
    saved_weights, saved_state = copy.deepcopy(first.state_dict()), copy.deepcopy(fused.state_dict())

    resumed = _net()
    resumed.load_state_dict(saved_weights)
    fused = attach_fused_backward(
        list(resumed.named_parameters()), make, lr_scheduler_factory=_warmup_schedule
    )
    fused.load_state_dict(saved_state)
    for step in (1, 2):
        _loss(resumed, step).backward()
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uses_grad_scaler": True}, "GradScaler"),
        ({"world_size": 2}, "2 processes"),
        ({"optimizer_name": "prodigy"}, "prodigy"),
    ],
)
def test_refuses_settings_it_cannot_honour(kwargs, message):
    net = _net()
    with pytest.raises(ConfigError, match=message):
        attach_fused_backward(
            net.parameters(), lambda ps: torch.optim.AdamW(ps), lr_scheduler_factory=None, **kwargs
        )
    assert all(not p._post_accumulate_grad_hooks for p in net.parameters())


def test_from_optimizer_set_uses_the_resolved_settings():
    """Same optimizer, LR and cosine schedule as OptimizerSet.step (text encoder frozen here)."""
    ref_unet, unet = _net(), _net()
    opt_file = OptimizerFile(base=SectionConfig(optimizer="adamw", lr=1e-2, lr_scheduler="cosine"))
    settings = TrainOptimSettings(disable_textenc_training=True)
    ref = build_optimizers(
        opt_file, settings, unet=ref_unet, text_encoder=nn.Linear(2, 2), total_optimizer_steps=4
    )
    opt_set = build_optimizers(
        opt_file, settings, unet=unet, text_encoder=nn.Linear(2, 2), total_optimizer_steps=4
    )
    fused = fused_backward_from_optimizer_set(opt_set)
    assert list(fused) == ["unet"]
    for step in range(3):
        _loss(ref_unet, step).backward()
        ref.step()
        _loss(unet, step).backward()
    for a, b in zip(ref_unet.parameters(), unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused["unet"].learning_rates()["0.weight"] == pytest.approx(ref.nominal_learning_rates()["unet"])
    with pytest.raises(AssertionError, match="clip_grad_norm"):  # train.json validation refuses it first
        clipped = build_optimizers(
            opt_file,
            TrainOptimSettings(disable_textenc_training=True, clip_grad_norm=1.0),
            unet=_net(),
            text_encoder=nn.Linear(2, 2),
            total_optimizer_steps=4,
        )
        fused_backward_from_optimizer_set(clipped)


def test_fused_set_skips_a_nonfinite_loss_and_keeps_the_schedule():
    from trainer.optim import FusedOptimizerSet

    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    section = SectionConfig(
        optimizer="adamw", lr=1e-2, lr_scheduler="linear", lr_warmup_steps=0, lr_decay_steps=10
    )
    base = build_optimizers(
        OptimizerFile(base=section),
        TrainOptimSettings(disable_textenc_training=True),
        unet=net,
        text_encoder=nn.Linear(2, 2),
        total_optimizer_steps=10,
    )
    fused = FusedOptimizerSet(base, uses_grad_scaler=False, world_size=1)
    assert fused.nominal_learning_rates()["unet"] == pytest.approx(1e-2)
    loss = _loss(net, 0) * float("nan")
    fused.backward(loss)  # skipped: a non-finite loss never reaches the parameters
    result = fused.step()
    assert result.skipped and result.grad_norms == {}
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    # The LR schedule advanced as in OptimizerSet.step: linear decay over 10 steps, one taken.
    assert fused.nominal_learning_rates()["unet"] == pytest.approx(0.9e-2)
    fused.backward(_loss(net, 1))
    result = fused.step()
    assert not result.skipped and float(result.grad_norms["unet"]) > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def _adafactor_set(net: nn.Module, fused: bool):
    from trainer.optim import FusedOptimizerSet

    opt_set = build_optimizers(
        OptimizerFile(base=SectionConfig(optimizer="adafactor", lr=None, lr_scheduler="adafactor")),
        TrainOptimSettings(disable_textenc_training=True),
        unet=net,
        text_encoder=nn.Linear(2, 2),
        total_optimizer_steps=10,
    )
    return FusedOptimizerSet(opt_set, uses_grad_scaler=False, world_size=1) if fused else opt_set


def _adafactor_step(opt_set, loss: torch.Tensor):
    opt_set.backward(loss)
    return opt_set.step()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_adafactor_own_schedule_survives_a_skipped_first_step(fused):
    """A non-finite loss on the very first step: no update, Adafactor's state stays empty (its
    schedule reads state['step'], which does not exist yet), and the next finite step is
    Adafactor's step 1 with its closed-form LR: min(1e-2, 1/sqrt(1)) x max(eps2, RMS(p))."""
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt_set = _adafactor_set(net, fused)
    result = _adafactor_step(opt_set, _loss(net, 0) * float("nan"))
    assert result.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert opt_set.learning_rates() == {"unet": 0.0}  # AdafactorSchedule's value before any update

    result = _adafactor_step(opt_set, _loss(net, 1))
    assert not result.skipped
    first = before[0]
    rms = first.norm(2) / first.numel() ** 0.5
    assert opt_set.learning_rates()["unet"] == pytest.approx(1e-2 * max(1e-3, float(rms)), rel=1e-6)
    optimizers = (
        [o for f in opt_set.fused.values() for o in f.optimizers]
        if fused
        else [opt_set.components["unet"].optimizer]
    )
    steps = {int(state["step"]) for o in optimizers for state in o.state.values()}
    assert steps == {1}  # the skipped step was not counted
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_optimizer_state_of_the_other_mode_is_refused_naming_the_key():
    """The protocol's one load_state_dict check: a plain state into a fused set and back."""
    from trainer.optim import FusedOptimizerSet
    from trainer.runtime.errors import CheckpointError

    def opt_set(net):
        return build_optimizers(
            OptimizerFile(base=SectionConfig(optimizer="adamw", lr=1e-2)),
            TrainOptimSettings(disable_textenc_training=True),
            unet=net,
            text_encoder=nn.Linear(2, 2),
            total_optimizer_steps=4,
        )

    plain = opt_set(_net())
    fused = FusedOptimizerSet(opt_set(_net()), uses_grad_scaler=False, world_size=1)
    with pytest.raises(
        CheckpointError, match="with fused_back_pass: true; resume it with fused_back_pass: true"
    ):
        plain.load_state_dict(fused.state_dict())
    with pytest.raises(
        CheckpointError, match="with fused_back_pass: false; resume it with fused_back_pass: false"
    ):
        fused.load_state_dict(plain.state_dict())
    fused.load_state_dict(fused.state_dict())  # its own state loads
