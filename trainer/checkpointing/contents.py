"""What a checkpoint contains: how it is written (save) and read back (restore).

Contents: `pipeline/` (diffusers StableDiffusionPipeline folder of the live weights),
`pipeline_ema/` when EMA is on, `<name>.safetensors` (+ `-ema`) in the original single-file
layout unless `no_save_ckpt`, and `training_state.pt` when `save_optimizer` (resumable): the
resume guard, the schedule horizon, optimizer/scheduler/scaler/EMA state, progress counters and
every rank's RNG state. The directory mechanics (temporary name, manifest last, rename) are
`store.py`'s; whether a checkpoint is resumed exactly is `resume.py`'s.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.checkpointing.resume import (
    PIPELINE_DIR,
    ResumePlan,
    resume_guard,
    schedule_horizon,
    warn_horizon_change,
)
from trainer.checkpointing.store import TRAINING_STATE, apply_retention, save_training_state, write_checkpoint
from trainer.config import config_to_json
from trainer.errors import CheckpointError
from trainer.fileperm import apply_umask
from trainer.models import save_pipeline, save_single_file
from trainer.optim.schedule_free import eval_weights
from trainer.state import TrainingState, capture_global_rng, restore_global_rng

log = logging.getLogger(__name__)


class TrainingRun(Protocol):
    """What saving reads of a run (trainer.session.Session has it; named here so that this
    package never imports the session above it)."""

    cfg: Any
    accelerator: Any
    run: Any
    model: Any
    data: Any
    optim: Any
    scaler: Any
    ema: Any
    state: TrainingState
    total_optimizer_steps: int
    export_precision: Any


def config_hash(cfg) -> str:
    return hashlib.sha256(config_to_json(cfg).encode()).hexdigest()[:16]


def checkpoint_name(project: str, epoch: int, step: int) -> str:
    return f"{project}-ep{epoch:03d}-gs{step:06d}"


def save_checkpoint(session: TrainingRun, reason: str) -> Path | None:
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


def training_state_dict(session: TrainingRun, all_rng: list[dict]) -> dict:
    """`training_state.pt`: everything besides the weights that an exact resume restores."""
    return {
        "guard": resume_guard(
            session.cfg,
            world_size=session.accelerator.num_processes,
            data_fingerprint=session.data.fingerprint(),
            optim=session.optim,
        ),
        "horizon": schedule_horizon(session.optim, session.total_optimizer_steps),
        "optimizers": session.optim.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler is not None else None,
        "ema": session.ema.state_dict() if session.ema is not None else None,
        "progress": session.state.state_dict(),
        "rng": all_rng,
    }


def gather_rng_states(accelerator) -> list[dict]:
    """Every rank's global RNG state, indexed by rank (collective: all ranks must call)."""
    mine = capture_global_rng()
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtype(cfg) -> torch.dtype:
    """Floating-point dtype of the single-file exports: save_precision (kohya's key), else fp16,
    or fp32 with save_full_precision. The pipeline/ folders keep the training dtype (resume)."""
    if cfg.save_precision is not None:
        return EXPORT_DTYPES[cfg.save_precision]
    return torch.float32 if cfg.save_full_precision else torch.float16


def _unwrapped_components(session: TrainingRun):
    acc = session.accelerator
    m = session.model
    return replace(m, unet=acc.unwrap_model(m.unet), text_encoder=acc.unwrap_model(m.text_encoder))


def restore_training_state(
    plan: ResumePlan,
    *,
    optim,
    scaler,
    ema,
    progress: TrainingState,
    total_optimizer_steps: int,
    rank: int,
) -> None:
    """Exact resume: restore optimizer, scheduler, scaler, EMA, counters and this rank's RNG
    from `plan`'s training state (its settings were already compared: `check_settings`)."""
    state, ckpt = plan.state, plan.checkpoint
    optim.load_state_dict(state["optimizers"])
    warn_horizon_change(state.get("horizon"), optim, total_optimizer_steps)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"'{ckpt.path}' has no EMA state but EMA is enabled now")
        ema.load_state_dict(state["ema"])
    progress.load_state_dict(state["progress"])
    restore_global_rng(state["rng"][rank])
    log.info(
        "resumed %s at epoch %d, batch %d, step %d",
        ckpt.path,
        progress.epoch,
        progress.batch_in_epoch,
        progress.global_step,
    )
