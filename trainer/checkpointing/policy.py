"""The save policy: when periodic checkpoints are due (epochs, minutes, steps). The loop asks, this answers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_MINUTES = 20


@dataclass
class SavePolicy:
    """Decides when periodic saves are due (epochs, minutes, steps); the loop asks, this answers."""

    every_n_epochs: int | None
    every_n_minutes: float | None
    from_epoch: int = 0
    _last_time: float = 0.0
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        self._last_time = time.monotonic()

    @classmethod
    def from_config(cls, cfg) -> SavePolicy:
        """EveryDream2's cadence: 0 turns a trigger off; with neither set, every 20 minutes."""
        epochs, minutes, steps = cfg.save_every_n_epochs, cfg.ckpt_every_n_minutes, cfg.save_every_n_steps
        if epochs is None and minutes is None and not steps:
            log.info("no save cadence set: saving every %d minutes (EveryDream2's default)", DEFAULT_MINUTES)
            minutes = DEFAULT_MINUTES
        return cls(epochs or None, minutes or None, cfg.save_ckpts_from_n_epochs, every_n_steps=steps or None)

    def step_due(self, global_step: int, total_steps: int) -> bool:
        """kohya's save_every_n_steps: after optimizer steps N, 2N, ...; not after the run's last
        step, which the final save covers."""
        n = self.every_n_steps
        return n is not None and global_step % n == 0 and global_step < total_steps

    def epoch_end_due(self, finished_epoch: int, max_epochs: int) -> bool:
        """After epoch index `finished_epoch` completes (the final save covers the last epoch)."""
        n = finished_epoch + 1
        return (
            self.every_n_epochs is not None
            and n < max_epochs
            and n % self.every_n_epochs == 0
            and n >= self.from_epoch
        )

    def time_due(self) -> bool:
        return (
            self.every_n_minutes is not None
            and time.monotonic() - self._last_time >= self.every_n_minutes * 60
        )

    def saved(self) -> None:
        self._last_time = time.monotonic()
