"""EveryDream2's `apply_grad_scaler_step_tweaks`: make the fp16 GradScaler calmer as training goes on.

Early on, the loss scale must find its range quickly (growth x2 every 25 steps); later, frequent
growth attempts mean frequent overflow-skipped steps. ED2 (optimizers.py:276-296) changes the
scaler at fixed global steps; this is that schedule as a pure function so the loop can apply it
and tests can pin it.
"""

from __future__ import annotations

import torch

# global_step -> (growth_factor, backoff_factor, growth_interval)
_TWEAKS: dict[int, tuple[float, float, int]] = {
    500: (1.8, 1 / 1.8, 100),
    1000: (1.6, 1 / 1.6, 200),
    2000: (1.3, 1 / 1.3, 500),
    4000: (1.15, 1 / 1.15, 2000),
}


def grad_scaler_tweak(global_step: int) -> tuple[float, float, int] | None:
    """The (growth_factor, backoff_factor, growth_interval) to apply at `global_step`, else None."""
    return _TWEAKS.get(global_step)


def apply_grad_scaler_tweak(scaler: torch.amp.GradScaler, global_step: int) -> bool:
    """Apply the tweak for `global_step` to `scaler` (public setters); True if one applied."""
    tweak = grad_scaler_tweak(global_step)
    if tweak is None:
        return False
    growth, backoff, interval = tweak
    scaler.set_growth_factor(growth)
    scaler.set_backoff_factor(backoff)
    scaler.set_growth_interval(interval)
    return True
