"""What a checkpoint contains: how it is written (save) and read back (restore).

Contents: `pipeline/` (diffusers StableDiffusionPipeline folder of the live weights),
`pipeline_ema/` when EMA is on, `<name>.safetensors` (+ `-ema`) in the original single-file
layout unless `no_save_ckpt`, and `training_state.pt` when `save_optimizer` (resumable): the
resume guard, the schedule horizon, optimizer/scheduler/scaler/EMA state, progress counters and
every rank's RNG state. The directory mechanics (temporary name, manifest last, rename) are
`store.py`'s; whether a checkpoint is resumed exactly is `resume.py`'s.

The manifest records the run's base model (`base_model`: the source the first run of a chain
started from, carried through exact resume and weights-only chaining), so that a layer above
can relate any checkpoint to it. That layer's `CheckpointExtra` (train.json's
`extract_lora_rank`: trainer/export/checkpoint_lora.py), handed to the session, writes into each
folder once it is complete (rank 0), from the weights just saved; this package never imports it.
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
from accelerate import Accelerator

from trainer.checkpointing.resume import (
    PIPELINE_DIR,
    ResumePlan,
    resume_guard,
    schedule_horizon,
)
from trainer.checkpointing.state import TrainingState, capture_global_rng, restore_global_rng
from trainer.checkpointing.store import (
    MANIFEST,
    TRAINING_STATE,
    apply_retention,
    open_checkpoint,
    save_training_state,
    write_checkpoint,
)
from trainer.config import TrainConfig, config_to_json
from trainer.data import LoadedDataset
from trainer.models import SDComponents, save_pipeline, save_single_file
from trainer.models.loading import BUILTIN_PREFIX
from trainer.optim import TrainingOptimizer
from trainer.optim.schedule_free import eval_weights
from trainer.runtime.errors import CheckpointError, CheckpointWriteError, NonFiniteWeights, TrainerError
from trainer.runtime.fileperm import apply_umask

log = logging.getLogger(__name__)

BASE_MODEL = "base_model"  # manifest key: the model source the run's chain started from


class CheckpointExtra(Protocol):
    """Something a layer above writes into every complete checkpoint folder (rank 0), from the
    weights just saved (`model`: SDComponents, unwrapped, on the training device). It reports
    its own failures; one that escapes is logged, never a failed save."""

    def __call__(self, checkpoint: Path, model: Any, *, step: int, base_model: str | None) -> Any: ...


class TrainingRun(Protocol):
    """What saving reads of a run (trainer.run.session.Session has it; named here so that this
    package never imports the session above it). Read-only: saving never replaces a part."""

    cfg: TrainConfig
    state: TrainingState
    checkpoint_extra: CheckpointExtra | None

    @property
    def accelerator(self) -> Accelerator: ...
    @property
    def run(self) -> Any: ...  # trainer.run.folder.RunFolder (a layer above)
    @property
    def model(self) -> SDComponents: ...
    @property
    def data(self) -> LoadedDataset: ...
    @property
    def optim(self) -> TrainingOptimizer: ...
    @property
    def scaler(self) -> torch.amp.GradScaler | None: ...
    @property
    def ema(self) -> Any: ...  # trainer.parts.ema.EMA | None (a layer above)
    @property
    def total_optimizer_steps(self) -> int: ...
    @property
    def export_precision(self) -> Any: ...  # trainer.parts.placement.ExportPrecision | None
    @property
    def plan(self) -> ResumePlan: ...  # the plan the run started from (its base model: `base_model_of`)


def recorded_source(spec: str) -> str:
    """A model source as the manifest records it: builtin:NAME as it is, a path that exists
    made absolute (a resume from another working directory still finds it)."""
    if spec.startswith(BUILTIN_PREFIX):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def base_model_of(plan) -> str | None:
    """The base model of a run that starts with `plan`: the one recorded in the checkpoint it
    starts from (exact resume, weights-only chaining, or a path inside a checkpoint folder of
    this trainer, e.g. its `pipeline/`), else the source itself. None when that checkpoint
    records none (written by an older version)."""
    checkpoint = plan.checkpoint
    if checkpoint is None:
        folder = Path(plan.spec).expanduser().parent
        if plan.spec.startswith(BUILTIN_PREFIX) or not (folder / MANIFEST).is_file():
            return recorded_source(plan.spec)
        try:
            checkpoint = open_checkpoint(folder)
        except CheckpointError as exc:
            log.warning("the base model of %s is unknown: %s", plan.spec, exc)
            return None
    return checkpoint.manifest.get(BASE_MODEL)


def config_hash(cfg) -> str:
    return hashlib.sha256(config_to_json(cfg).encode()).hexdigest()[:16]


def checkpoint_name(project: str, epoch: int, step: int) -> str:
    return f"{project}-ep{epoch:03d}-gs{step:06d}"


def save_checkpoint(
    session: TrainingRun, reason: str, *, progress: TrainingState | None = None, weights_only: bool = False
) -> Path:
    """Save a checkpoint (collective: every rank calls; rank 0 checks and writes). Returns its
    path, on every rank.

    Weights with NaN or Inf are never written: `NonFiniteWeights`, raised on every rank (a
    checkpoint of them loads and samples as noise, and findlast would pick it). A filesystem
    failure is a `CheckpointWriteError`, also on every rank, so that no rank waits for a save
    that will not come. `progress` (default: the run's counters) names and describes the
    checkpoint; `weights_only` writes the weights without EMA or training state (the non-finite
    stop saves the run's starting weights this way: no optimizer state belongs to them)."""
    all_rng = gather_rng_states(session.accelerator)
    progress = progress or session.state
    name = checkpoint_name(session.cfg.project_name, progress.epoch, progress.global_step)
    failure = None
    if session.accelerator.is_main_process:
        try:
            _write_on_main(session, reason, name, progress, all_rng, weights_only=weights_only)
        except (NonFiniteWeights, CheckpointWriteError) as exc:
            failure = exc
    _raise_on_every_rank(session.accelerator, failure)
    return session.run.checkpoints / name


def _write_on_main(
    session: TrainingRun, reason: str, name: str, progress: TrainingState, all_rng, *, weights_only: bool
) -> None:
    cfg = session.cfg
    bad = nonfinite_names(trained_tensors(session, ema=not weights_only))
    if bad:
        log.warning(
            "not saving the %s checkpoint at step %d: its weights are non-finite",
            reason,
            progress.global_step,
        )
        raise NonFiniteWeights(
            f"the trained weights at step {progress.global_step} hold NaN or Inf ({len(bad)} tensors, e.g. "
            f"{', '.join(bad[:3])}), so no checkpoint was written (the {reason} save)"
        )
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
        if session.ema is not None and not weights_only:
            with session.ema.swapped_in({"unet": components.unet, "text_encoder": components.text_encoder}):
                save_pipeline(components, tmp / f"{PIPELINE_DIR}_ema")
                if not cfg.no_save_ckpt:
                    save_single_file(components, tmp / f"{name}-ema.safetensors", dtype=dtype)
        if cfg.save_optimizer and not weights_only:
            save_training_state(tmp / TRAINING_STATE, training_state_dict(session, all_rng))
        apply_umask(tmp)  # safetensors writes 0600 files

    manifest = checkpoint_manifest(session, reason, progress)
    # Schedule-free: save the eval weights, resume from the train weights. Not for weights_only:
    # its weights are a fresh optimizer's, where both are the same.
    with nullcontext() if weights_only else eval_weights(session.optim):
        path = write_checkpoint(session.run.checkpoints, name, write, manifest)
        removed = apply_retention(session.run.checkpoints, cfg.keep_last_checkpoints)
        log.info(
            "saved checkpoint %s (%s, %.1fs)%s",
            path,
            reason,
            time.monotonic() - started,
            f", removed {len(removed)} old" if removed else "",
        )
        _write_extra(session, path, progress.global_step, manifest[BASE_MODEL])


def checkpoint_manifest(session: TrainingRun, reason: str, progress: TrainingState) -> dict:
    """manifest.json's own keys (the store adds the format, the time and the file list)."""
    return {
        "project_name": session.cfg.project_name,
        "global_step": progress.global_step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "samples_seen": progress.samples_seen,
        "reason": reason,
        "config_hash": config_hash(session.cfg),
        "model_family": session.model.family,
        "world_size": session.accelerator.num_processes,
        BASE_MODEL: base_model_of(session.plan),
    }


def _write_extra(session: TrainingRun, path: Path, step: int, base_model: str | None) -> None:
    """The session's `CheckpointExtra` into the complete folder `path`, with the weights as
    saved (eval weights, loaded values of half-precision frozen weights). Written after the
    manifest and not listed in it: the checkpoint is complete before it starts, and a failure
    (or a crash) here leaves it intact."""
    extra = session.checkpoint_extra
    if extra is None:
        return
    components = _unwrapped_components(session)
    try:
        with session.export_precision.restored(components) if session.export_precision else nullcontext():
            extra(path, components, step=step, base_model=base_model)
    except Exception as exc:  # the extra logs its own failures: this guards the save against a bug in it
        log.error(
            "checkpoint %s is saved and complete, but writing beside it failed: %s: %s",
            path,
            type(exc).__name__,
            exc,
        )


def _raise_on_every_rank(accelerator, failure: TrainerError | None) -> None:
    """Rank 0's save failure, raised on every rank (the others learn it by broadcast, which also
    holds them until rank 0's save is over, as a barrier would)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = [None if failure is None else (type(failure).__name__, str(failure))]
        broadcast_object_list(holder, from_process=0)
        if failure is None and holder[0] is not None:
            kind, message = holder[0]
            failure = {"NonFiniteWeights": NonFiniteWeights, "CheckpointWriteError": CheckpointWriteError}[
                kind
            ](message)
    if failure is not None:
        raise failure


def trained_tensors(session: TrainingRun, *, ema: bool = True) -> dict[str, torch.Tensor]:
    """The tensors training changes, by name: every trained parameter and, with `ema`, the EMA
    shadow weights. Frozen weights are as loaded and need no check."""
    tensors: dict[str, torch.Tensor] = {
        f"{comp}/{name}": param
        for comp, c in session.optim.components.items()
        for name, param in zip(c.param_names, c.params, strict=True)
    }
    if ema and session.ema is not None:
        tensors |= {
            f"ema/{comp}/{n}": t for comp, shadow in session.ema.shadow.items() for n, t in shadow.items()
        }
    return tensors


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that hold a NaN or Inf, in order.

    One elementwise pass over each tensor on its own device and one host sync per device (the
    flags are stacked before they are read): cheap next to writing the checkpoint."""
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in tensors.items():
        by_device.setdefault(tensor.device, []).append(name)
    finite: dict[str, bool] = {}
    for names in by_device.values():
        flags = torch.stack([torch.isfinite(tensors[n].detach()).all() for n in names]).tolist()
        finite.update(zip(names, flags, strict=True))
    return [name for name in tensors if not finite[name]]


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
    state, ckpt = plan.saved_state, plan.source
    optim.load_state_dict(state["optimizers"])
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
