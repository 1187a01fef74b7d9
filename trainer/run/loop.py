"""The training loop: when to step, log, checkpoint and stop. The maths lives elsewhere.

One optimizer step = one accumulation window of the epoch plan (up to `grad_accum` batches;
the last window of an epoch may be shorter and is still stepped). Each micro-batch's loss is
its per-sample losses summed and divided by the number of samples in the window, so every
sample weighs the same whatever the batch sizes. Checkpoints are only taken at window
boundaries, which is what makes resume exact. Every save goes through `RunSaves`, which never
writes non-finite weights and knows the run's last good state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.checkpointing import SavePolicy
from trainer.checkpointing.saves import RunSaves
from trainer.data import make_run_loader
from trainer.data.batch import Batch
from trainer.optim import apply_grad_scaler_tweak
from trainer.plan.check import out_of_memory_report
from trainer.run.progress import StepTracker
from trainer.run.session import Session
from trainer.run.te_stop import stop_text_encoder_if_due
from trainer.runtime.errors import TrainingStopped
from trainer.runtime.signals import StopFlag

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    status: str  # "finished" | "stop_at_step" (both normal ends) | "interrupted" (a signal)
    global_step: int
    epoch: int
    seconds: float
    samples_seen: int
    final_loss: float | None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    checkpoints: list[Path] = field(default_factory=list)
    nonfinite_steps: int = 0


def train(s: Session, stop: StopFlag | None = None) -> RunSummary:
    """Run to max_epochs, stop_at_step or `stop.requested` (set by the signal handlers that the
    caller installed: trainer.cli does; an in-process caller without a flag keeps its own)."""
    cfg, st = s.cfg, s.state
    saves = RunSaves.start(s)  # refuses non-finite starting weights before anything runs
    policy = SavePolicy.from_config(cfg)
    tracker = StepTracker(
        s.metrics,
        reduce_sum=(lambda t: s.accelerator.reduce(t, reduction="sum"))
        if s.accelerator.num_processes > 1
        else None,
        log_step=cfg.log_step,
        total_steps=s.total_optimizer_steps,
        start_step=st.global_step,
        batch_size=cfg.batch_size,
        enabled=s.accelerator.is_main_process,
    )
    stop, saved, started = stop or StopFlag(), [], time.monotonic()
    loader = make_run_loader(s.data, latent_cache=s.latent_cache, pin_memory=s.device.type == "cuda")
    try:
        s.observers.on_start()
        while st.epoch < cfg.max_epochs:
            plan = s.data.epoch_plan(st.epoch)
            window_of_end = {end - 1: i for i, (_, end) in enumerate(plan.windows)}
            window_paths: list[str] = []
            for batch in loader.epoch(st.epoch, start_batch=st.batch_in_epoch):
                is_end = batch.window_end
                _micro_step(s, batch, sync=is_end, tracker=tracker)
                window_paths += batch.paths
                if not is_end:
                    continue
                _optimizer_step(s, tracker, window_paths, saves)
                stop_text_encoder_if_due(cfg, s.parts, s.accelerator, st.global_step)
                s.observers.after_step(window_of_end[batch.batch_index], len(plan.windows))
                window_paths = []
                at_limit = cfg.stop_at_step is not None and st.global_step >= cfg.stop_at_step
                if at_limit:  # the same step on every rank: no need to agree
                    saved.append(saves.save(s, "stop_at_step"))
                    log.info(
                        "finished at stop_at_step %d; resume with --resume_ckpt findlast", st.global_step
                    )
                    return _summary(s, "stop_at_step", started, tracker, saved)
                stop_now, time_due = _agree(s, bool(stop.requested), policy.time_due())
                if stop_now and not stop.requested:
                    stop.requested = "another process's stop request"
                step_due = policy.step_due(st.global_step, s.total_optimizer_steps)
                if stop.requested or time_due or step_due:
                    reason = "interrupted" if stop.requested else "timed" if time_due else "steps"
                    saved.append(saves.save(s, reason))
                    policy.saved()
                if stop.requested:
                    log.warning(
                        "stopped by %s at step %d; resume with --resume_ckpt findlast",
                        stop.requested,
                        st.global_step,
                    )
                    return _summary(s, "interrupted", started, tracker, saved)
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            tracker.epoch_end(st.global_step, _lr_values(s), st.epoch)
            s.observers.on_epoch_end(st.epoch - 1)
            if policy.epoch_end_due(st.epoch - 1, cfg.max_epochs):
                saved.append(saves.save(s, "epoch"))
        saved.append(saves.save(s, "final"))
        return _summary(s, "finished", started, tracker, saved)
    except torch.OutOfMemoryError as exc:  # nothing saved from a failed step: the last checkpoint stays
        raise TrainingStopped(out_of_memory_report(cfg, s.opt_file, s.device.type, st.global_step)) from exc
    finally:
        tracker.close()
        s.metrics.flush()


def _micro_step(s: Session, batch: Batch, *, sync: bool, tracker: StepTracker) -> None:
    """Forward + backward of one micro-batch; gradients sync across ranks only at window ends."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for module in s.trainable_modules().values():
                stack.enter_context(s.accelerator.no_sync(module))
        out = s.step(batch)
        # Every sample of the window (across all ranks) weighs the same; DDP averages over ranks.
        loss = out.loss.sum() * s.accelerator.num_processes / batch.global_window_samples
        s.optim.backward(loss, s.scaler)
    tracker.micro_batch(out.loss, out.timesteps)
    s.state.batch_in_epoch += 1
    s.state.samples_seen += len(batch) * s.accelerator.num_processes


def _optimizer_step(s: Session, tracker: StepTracker, window_paths: list[str], saves: RunSaves) -> None:
    st = s.state
    result = s.optim.step(s.scaler)
    st.global_step += 1
    if result.skipped:
        st.nonfinite_in_row += 1
        st.nonfinite_total += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row); images: %s",
            st.global_step,
            st.nonfinite_in_row,
            ", ".join(window_paths),
        )
        s.metrics.scalars({"problems/nonfinite_steps": st.nonfinite_total}, st.global_step)
        if st.nonfinite_in_row >= s.cfg.max_nonfinite_steps:
            raise saves.stop_after_nonfinite_steps(s)
    else:
        st.nonfinite_in_row = 0
        if s.ema is not None:
            s.ema.maybe_update(st.global_step)
    if s.scaler is not None and s.opt_file.apply_grad_scaler_step_tweaks:
        apply_grad_scaler_tweak(s.scaler, st.global_step)
    norms = result.grad_norms if s.optim.log_grad_norm else {}
    tracker.optimizer_step(st.global_step, norms, lambda: _lr_values(s), st.epoch)


def _agree(s: Session, *flags: bool) -> tuple[bool, ...]:
    """Flags true on any rank are true on all (signals and clocks differ between processes)."""
    if s.accelerator.num_processes == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=s.device)
    return tuple(bool(v) for v in s.accelerator.reduce(t, reduction="sum") > 0)


def _lr_values(s: Session) -> dict[str, float]:
    """Nominal LR per component (lr/...), effective LR (d*lr for adaptive optimizers), grad scale."""
    values = dict(s.optim.nominal_learning_rates())
    values.update({f"lr_effective/{k}": v for k, v in s.optim.learning_rates().items()})
    if s.scaler is not None:
        values["precision/grad_scale"] = float(s.scaler.get_scale())
    return values


def _summary(s: Session, status: str, started: float, tracker: StepTracker, saved: list) -> RunSummary:
    return RunSummary(
        status=status,
        global_step=s.state.global_step,
        epoch=s.state.epoch,
        seconds=time.monotonic() - started,
        samples_seen=s.state.samples_seen,
        final_loss=tracker.last_loss,
        final_val_loss=s.observers.last_val,
        best_val_loss=s.observers.best_val,
        checkpoints=list(saved),
        nonfinite_steps=s.state.nonfinite_total,
    )
