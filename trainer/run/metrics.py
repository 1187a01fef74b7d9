"""The one metrics interface: TensorBoard always, optional wandb mirror, nothing on other ranks.

The loop and the components report scalars, images and text through `Metrics`; nothing else in
the trainer opens a SummaryWriter. Tag names are stable and documented in docs/LOGGING.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where the writer is made (rank 0 only)
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class Metrics:
    """Writes metrics for the main process; a no-op on other ranks (`enabled=False`).

    `purge_step` is the first step of this session: when resuming, TensorBoard discards any
    events at or after it that an interrupted previous session wrote past its last checkpoint,
    so the curves continue without a jump or a duplicated segment.
    """

    def __init__(self, log_dir: Path, *, enabled: bool = True, purge_step: int | None = None, wandb_cfg=None):
        self.enabled = enabled
        self._writer: SummaryWriter | None = None  # None on other ranks and once closed
        self._wandb: Any = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard loads only on rank 0

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=20)
        if wandb_cfg is not None:
            self._wandb = _start_wandb(wandb_cfg)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """Log a PIL image (HWC uint8)."""
        if self._writer is None:
            return
        array = np.asarray(image.convert("RGB"))
        self._writer.add_image(tag, array, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writers; finish the wandb run. Safe to call twice."""
        if self.enabled and self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None
            self.enabled = False  # the run is over: nothing may be written after its end


def config_text(config: dict) -> str:
    """A config as TensorBoard text (markdown): indented, so it renders as a code block."""
    return "\n".join("    " + line for line in json.dumps(config, indent=2, sort_keys=True).splitlines())


def _start_wandb(cfg: dict):
    """Start a wandb run mirroring TensorBoard. Asked for but not installed is an error, not a skip."""
    try:
        import wandb
    except ImportError as exc:
        from trainer.runtime.errors import ConfigError

        raise ConfigError("wandb: true but the 'wandb' package is not installed; pip install wandb") from exc
    return wandb.init(project=cfg["project"], name=cfg.get("name"), config=cfg.get("config"))
