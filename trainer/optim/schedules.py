"""LR schedules per component, counted in OPTIMIZER steps.

EveryDream2 stepped its schedulers on every micro-batch, so with grad_accum > 1 warmup and decay
ran grad_accum times too fast; here `OptimizerSet.step()` advances them once per optimizer step.
Defaults stay ED2-compatible: decay null or < 1 means 1.5 x the run's optimizer steps (so a
cosine ends at ~25 % of the nominal LR instead of 0), warmup null means decay / 50. A warmup of
0 is 0 (ED2's `x or default` turned it into the auto value).
"""

from __future__ import annotations

import importlib
import typing

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import LrSchedulerName
from trainer.runtime.errors import ConfigError

SCHEDULER_NAMES: tuple[str, ...] = typing.get_args(LrSchedulerName)  # one list, train.json's type
ADAFACTOR_SCHEDULE = "adafactor"
AUTO_DECAY_FACTOR = 1.5
AUTO_WARMUP_DIVISOR = 50


def mirrors_optimizer_lr(name: str) -> bool:
    """True for the `adafactor` schedule: transformers' AdafactorSchedule only reports the LR
    Adafactor computes itself (from its state), so it is never advanced without an update and
    its LR is read from the schedule, not from the param group."""
    return name == ADAFACTOR_SCHEDULE


def resolve_decay_steps(decay_steps: int | None, total_optimizer_steps: int) -> int:
    """ED2 rule: null or < 1 -> int(1.5 x total optimizer steps), at least 1."""
    if decay_steps is None or decay_steps < 1:
        return max(1, int(total_optimizer_steps * AUTO_DECAY_FACTOR))
    return decay_steps


def resolve_warmup_steps(warmup_steps: int | None, decay_steps: int) -> int:
    """ED2 rule: null -> int(decay / 50). 0 stays 0."""
    if warmup_steps is None:
        return int(decay_steps / AUTO_WARMUP_DIVISOR)
    return warmup_steps


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    decay_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> LambdaLR:
    """One scheduler for one optimizer; diffusers' get_scheduler for all but `adafactor`.

    `constant` ignores warmup (diffusers semantics, as in ED2); `linear`, `cosine` and
    `polynomial` reach their end value (0, or 1e-7 for polynomial) at `decay_steps`.
    """
    if mirrors_optimizer_lr(name):
        schedule_cls = importlib.import_module("transformers.optimization").AdafactorSchedule
        return schedule_cls(optimizer)
    from diffusers.optimization import get_scheduler  # heavy import, only when building

    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=decay_steps,
            num_cycles=num_cycles,
            power=power,
        )
    except ValueError as exc:
        raise ConfigError(f"lr_scheduler '{name}': {exc}") from exc
