"""One trained component's optimizer, scheduler and parameters, and what one step reports.

Kept apart from optimizer_set.py so that the start-up table (table.py) and the optimizer
protocol (protocol.py) can name these types without importing the set that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.optim.resolve import ResolvedComponent
from trainer.optim.schedules import mirrors_optimizer_lr
from trainer.optim.spec import OptimizerSpec


@dataclass
class StepResult:
    skipped: bool  # True if a non-finite gradient made us skip the update
    grad_norms: dict[str, torch.Tensor]  # pre-clip total grad norm per component (0-dim, on device)


@dataclass
class ComponentOptimizer:
    """A component's optimizer, scheduler and trainable parameters (in optimizer order)."""

    name: str
    resolved: ResolvedComponent
    spec: OptimizerSpec
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    param_names: list[str]
    params: list[nn.Parameter]
    trainable_count: int
    frozen_count: int
    freeze_description: str = ""

    def effective_lr(self) -> float:
        return effective_lr(self.resolved, self.spec, self.optimizer, self.lr_scheduler)

    def schedule_advances(self, updated: bool) -> bool:
        """Whether this step advances the LR schedule: always, except Adafactor's own schedule
        on a skipped update (it mirrors the optimizer's state, which did not move)."""
        return updated or not mirrors_optimizer_lr(self.resolved.lr_scheduler)


def effective_lr(resolved: ResolvedComponent, spec: OptimizerSpec, optimizer, lr_scheduler) -> float:
    """The step size actually applied: d*lr for D-Adaptation/Prodigy, Adafactor's own LR."""
    group = optimizer.param_groups[0]
    if mirrors_optimizer_lr(resolved.lr_scheduler):
        return float(lr_scheduler.get_last_lr()[0])
    if spec.adaptive:
        return float(group["d"]) * float(group["lr"])
    return float(group["lr"])
