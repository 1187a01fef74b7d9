"""`close()` of the fused back pass: its per-parameter hooks go, and with them the reference
cycle (parameter -> hook -> closure -> FusedBackward -> parameters) that kept a dropped fused
build, its optimizers and their states alive (issue 32)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from trainer.optim import (
    FusedOptimizerSet,
    OptimizerFile,
    SectionConfig,
    TrainOptimSettings,
    build_optimizers,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def _loss(net: nn.Module) -> torch.Tensor:
    return net(torch.randn(5, 6, generator=torch.Generator().manual_seed(0))).pow(2).mean()


def _fused_set(net: nn.Module) -> FusedOptimizerSet:
    base = build_optimizers(
        OptimizerFile(base=SectionConfig(optimizer="adamw", lr=1e-2, lr_scheduler="cosine")),
        TrainOptimSettings(disable_textenc_training=True),
        unet=net,
        text_encoder=nn.Linear(2, 2),
        total_optimizer_steps=4,
    )
    return FusedOptimizerSet(base, uses_grad_scaler=False, world_size=1)


def test_after_close_backward_steps_nothing_and_gradients_accumulate():
    net = _net()
    optim = _fused_set(net)
    optim.backward(_loss(net))  # hooks step: the weights move, gradients are freed
    assert all(p.grad is None for p in net.parameters())
    weights = [p.detach().clone() for p in net.parameters()]
    lr = optim.nominal_learning_rates()

    optim.close()
    optim.close()  # idempotent
    assert all(not p._post_accumulate_grad_hooks for p in net.parameters())
    _loss(net).backward()
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))
    first = [p.grad.clone() for p in net.parameters()]
    _loss(net).backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(net.parameters(), first, strict=True))
    assert optim.nominal_learning_rates() == lr  # no schedule advanced either
    assert optim.state_dict()["fused"]["unet"]["params"]  # the state stays readable
    with pytest.raises(RuntimeError, match="backward after close"):
        optim.backward(_loss(net))


def test_a_closed_set_is_collected_while_its_model_lives():
    """The model stays (a session's model outlives its optimizer); the set, its per-parameter
    optimizers and their states go with the last reference, as soon as the hooks are removed."""
    kept, dropped = _net(), _net()
    leaked = _fused_set(kept)
    leaked.backward(_loss(kept))
    leaking = weakref.ref(leaked.fused["unet"].optimizers[0])
    del leaked
    gc.collect()
    assert leaking() is not None  # without close(): the hooks hold it, and gc cannot see the cycle

    optim = _fused_set(dropped)
    optim.backward(_loss(dropped))
    refs = [
        weakref.ref(optim),
        weakref.ref(optim.fused["unet"]),
        weakref.ref(optim.fused["unet"].optimizers[0]),
    ]
    state = weakref.ref(optim.fused["unet"].optimizers[0].state[next(dropped.parameters())]["exp_avg"])
    optim.close()
    del optim
    gc.collect()
    assert [r() for r in refs] == [None, None, None] and state() is None


def test_a_plain_optimizer_set_closes_as_a_no_op():
    net = _net()
    base = build_optimizers(
        OptimizerFile(base=SectionConfig(optimizer="adamw", lr=1e-2)),
        TrainOptimSettings(disable_textenc_training=True),
        unet=net,
        text_encoder=nn.Linear(2, 2),
        total_optimizer_steps=4,
    )
    base.close()
    base.close()
    base.backward(_loss(net))
    assert not base.step().skipped
