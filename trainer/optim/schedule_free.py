"""Schedule-free optimizers: the weights anything outside training reads are the eval-mode ones.

A schedule-free optimizer (schedulefree's AdamW/SGD/RAdam, Prodigy + schedule-free, the
pytorch-optimizer ScheduleFree* classes) trains at an interpolation y of its fast iterate z and
its average x; the model's parameters hold y in train mode and x after `optimizer.eval()`. x is
the model to sample, validate, save and export (y gives worse images); y is what training
continues from.

Why a snapshot instead of just `eval()` then `train()`: the switch is a `lerp` each way, so
`train(eval(y))` differs from y in the last bits and a run that saved or sampled would no longer
be bitwise identical to one that did not. `eval_weights` keeps a CPU copy of y and puts it back;
while it is active `OptimizerSet.state_dict()` saves that copy (the checkpoint's pipeline holds x,
its training state y), so a resume is exact too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainEvalSwitch(Protocol):
    """The mode switch every schedule-free optimizer has (weights y in train mode, x in eval)."""

    def train(self) -> object: ...

    def eval(self) -> object: ...


def set_train_mode_flag(optimizer_state: dict) -> dict:
    """A state dict taken while the optimizer was in eval mode, made to say train mode (the
    eval switch only moves the weights, never the optimizer state)."""
    for group in optimizer_state["param_groups"]:
        if "train_mode" in group:
            group["train_mode"] = True
    return optimizer_state


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Exact CPU copies (CPU so the copy never costs VRAM during sampling)."""
    return [p.detach().to("cpu", copy=True) for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, value in zip(params, saved, strict=True):
        p.copy_(value)


@contextlib.contextmanager
def eval_weights(optimizer_set) -> Iterator[None]:
    """Within the block, schedule-free components hold their eval-mode weights; afterwards their
    exact train-mode weights and train mode are back. Re-entrant; a no-op for other optimizers."""
    components = [c for c in getattr(optimizer_set, "components", {}).values() if c.spec.schedule_free]
    if not components or optimizer_set.train_weights is not None:
        yield
        return
    optimizer_set.train_weights = {c.name: snapshot(c.params) for c in components}
    try:
        for comp in components:
            comp.optimizer.eval()
        yield
    finally:
        for comp in components:
            comp.optimizer.train()
            restore(comp.params, optimizer_set.train_weights[comp.name])
        optimizer_set.train_weights = None
