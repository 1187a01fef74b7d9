"""What goes into a checkpoint directory, and when a save is due.

Contents: `pipeline/` (diffusers StableDiffusionPipeline folder of the live weights),
`pipeline_ema/` when EMA is on, `<name>.safetensors` (+ `-ema`) in the original single-file
layout unless `no_save_ckpt`, and `training_state.pt` when `save_optimizer` (resumable).
The directory mechanics (temporary name, manifest last, rename) are `checkpoint.py`'s.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.chaining import PIPELINE_DIR
from trainer.checkpoint import TRAINING_STATE, apply_retention, save_training_state, write_checkpoint
from trainer.fileperm import apply_umask
from trainer.models import save_pipeline, save_single_file
from trainer.optim.schedule_free import eval_weights
from trainer.session import Session, config_hash, gather_rng_states, training_state_dict

log = logging.getLogger(__name__)


def checkpoint_name(project: str, epoch: int, step: int) -> str:
    return f"{project}-ep{epoch:03d}-gs{step:06d}"


def save_checkpoint(session: Session, reason: str) -> Path | None:
    """Save a checkpoint (collective: every rank calls; rank 0 writes). Returns its path on rank 0."""
    all_rng = gather_rng_states(session.accelerator)
    if not session.accelerator.is_main_process:
        session.accelerator.wait_for_everyone()
        return None
    cfg, st = session.cfg, session.state
    name = checkpoint_name(cfg.project_name, st.epoch, st.global_step)
    started = time.monotonic()

    def write(tmp: Path) -> None:
        components = _unwrapped_components(session)
        with session.export_precision.restored(components) if session.export_precision else nullcontext():
            _write_exports(tmp, components)

    def _write_exports(tmp: Path, components) -> None:
        save_pipeline(components, tmp / PIPELINE_DIR)
        dtype = export_dtype(cfg)
        if not cfg.no_save_ckpt:
            save_single_file(components, tmp / f"{name}.safetensors", dtype=dtype)
        if session.ema is not None:
            with session.ema.swapped_in({"unet": components.unet, "text_encoder": components.text_encoder}):
                save_pipeline(components, tmp / f"{PIPELINE_DIR}_ema")
                if not cfg.no_save_ckpt:
                    save_single_file(components, tmp / f"{name}-ema.safetensors", dtype=dtype)
        if cfg.save_optimizer:
            save_training_state(tmp / TRAINING_STATE, training_state_dict(session, all_rng))
        apply_umask(tmp)  # safetensors writes 0600 files

    manifest = {
        "project_name": cfg.project_name,
        "global_step": st.global_step,
        "epoch": st.epoch,
        "batch_in_epoch": st.batch_in_epoch,
        "samples_seen": st.samples_seen,
        "reason": reason,
        "config_hash": config_hash(cfg),
        "model_family": session.model.family,
        "world_size": session.accelerator.num_processes,
    }
    with eval_weights(session.optim):  # schedule-free: save eval weights, resume from train weights
        path = write_checkpoint(session.run.checkpoints, name, write, manifest)
    removed = apply_retention(session.run.checkpoints, cfg.keep_last_checkpoints)
    log.info(
        "saved checkpoint %s (%s, %.1fs)%s",
        path,
        reason,
        time.monotonic() - started,
        f", removed {len(removed)} old" if removed else "",
    )
    session.accelerator.wait_for_everyone()
    return path


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtype(cfg) -> torch.dtype:
    """Floating-point dtype of the single-file exports: save_precision (kohya's key), else fp16,
    or fp32 with save_full_precision. The pipeline/ folders keep the training dtype (resume)."""
    if cfg.save_precision is not None:
        return EXPORT_DTYPES[cfg.save_precision]
    return torch.float32 if cfg.save_full_precision else torch.float16


def _unwrapped_components(session: Session):
    acc = session.accelerator
    m = session.model
    return replace(m, unet=acc.unwrap_model(m.unet), text_encoder=acc.unwrap_model(m.text_encoder))


DEFAULT_MINUTES = 20


@dataclass
class SavePolicy:
    """Decides when periodic saves are due (epochs, minutes); the loop asks, this answers."""

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
