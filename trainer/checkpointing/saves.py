"""Every save of one run: never non-finite weights, an early word when the disk is short, and
the run's last good state for the stop after non-finite steps.

The loop saves through `RunSaves.save`. A save that finds NaN or Inf in the trained weights
writes nothing and stops the run (`TrainingStopped`, exit 3): a skipped step never repairs
weights, so every later step would be skipped too. The stop names the last good state, which
is always a checkpoint with finite weights:

* the newest checkpoint this run wrote (every save is checked, so every one is finite);
* else the checkpoint an exact resume started from (its weights are checked at the start);
* else the run's starting weights, written now as a weights-only checkpoint from a host copy.

The host copy is the cost of that last case: one copy of the trained parameters (SD1.5 in
fp32: about 3.4 GB of host memory), taken at the start of a run that has no checkpoint yet and
dropped at its first save. A copy refreshed at every optimizer step would hold later weights,
but copying a GB-sized model to the host each step costs more than the step; an exact resume
needs no copy, since its checkpoint is on disk.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpointing.contents import TrainingRun, nonfinite_names, save_checkpoint, trained_tensors
from trainer.checkpointing.state import TrainingState
from trainer.checkpointing.store import format_bytes, space_shortfall
from trainer.runtime.errors import ModelLoadError, NonFiniteWeights, TrainingStopped

log = logging.getLogger(__name__)

CAUSES = (
    "Likely causes: learning rate too high, fp16 overflow (try mixed_precision bf16 or no), a broken input "
    "image, or a diverged adaptive optimizer."
)


@dataclass
class LastGood:
    """The newest state of this run known to hold finite weights: a checkpoint, or (rank 0's)
    host copy of the trained parameters with the counters they belong to."""

    step: int
    checkpoint: Path | None = None
    origin: str = ""  # how the checkpoint came to be, for the message
    params: list[torch.Tensor] | None = None  # the live parameters the host copy belongs to
    host_copy: list[torch.Tensor] | None = None
    progress: TrainingState | None = None


class RunSaves:
    """The loop's one way to save (see the module docstring)."""

    def __init__(self, last_good: LastGood) -> None:
        self.last_good = last_good
        self.space_warned = False

    @classmethod
    def start(cls, s: Any) -> RunSaves:
        """Check the starting weights and decide where the last good state is until the first save.
        `s` is the session (a `TrainingRun` with `plan`, `resumed_from`)."""
        bad = nonfinite_names(trained_tensors(s, ema=False))
        if bad:
            raise ModelLoadError(
                f"the weights this run starts from ({s.resumed_from or s.plan.spec}) hold NaN or Inf in "
                f"{len(bad)} trained tensors (e.g. {', '.join(bad[:3])}): every training step would be "
                "skipped. Start from an earlier checkpoint or another model."
            )
        step = s.state.global_step
        if s.resumed_from is not None:
            return cls(LastGood(step, s.resumed_from, "the checkpoint this run resumed from"))
        return cls(_host_copy(s, keep=s.accelerator.is_main_process))

    def save(self, s: TrainingRun, reason: str) -> Path:
        """Save now; non-finite weights stop the run with the last good state named."""
        self._warn_if_short(s)
        try:
            path = save_checkpoint(s, reason)
        except NonFiniteWeights as exc:
            raise self.stop(s, str(exc)) from None
        self.last_good = LastGood(s.state.global_step, path, "saved earlier in this run")  # drops a host copy
        return path

    def stop_after_nonfinite_steps(self, s: TrainingRun) -> TrainingStopped:
        """`max_nonfinite_steps` in a row: save the last good state and say where it is."""
        in_row = s.state.nonfinite_in_row
        head = f"{in_row} optimizer steps in a row had non-finite losses or gradients"
        try:
            path = save_checkpoint(s, "nonfinite")
        except NonFiniteWeights as exc:
            return self.stop(s, f"{head}; {exc}")
        updated = s.state.global_step - in_row  # skipped steps leave the weights as this step made them
        return TrainingStopped(
            f"{head}. The weights are finite, so the last good state is {path} (step {updated}'s weights, "
            f"unchanged by the skipped steps, with the training state of step {s.state.global_step}). {CAUSES}"
        )

    def stop(self, s: TrainingRun, why: str) -> TrainingStopped:
        """The weights are non-finite: name the last good checkpoint, writing it first from the
        host copy when the run has none."""
        last = self.last_good
        if last.checkpoint is not None:
            where = f"{last.checkpoint} (step {last.step}, {last.origin})"
            resume = f"--resume_ckpt {last.checkpoint}"
        else:
            path = self._save_host_copy(s)
            where = (
                f"{path} (step {last.step}, written now from the weights this run started with; weights only: "
                "resuming it starts a new run from them)"
            )
            resume = f"--resume_ckpt {path}"
        return TrainingStopped(
            f"{why}. The last good state is {where}. {CAUSES} Fix the cause, then continue from it with {resume}."
        )

    def _save_host_copy(self, s: TrainingRun) -> Path:
        """Put the host copy back into the model (rank 0; the run is over, its weights are NaN)
        and save it as a weights-only checkpoint (collective)."""
        last = self.last_good
        if last.host_copy is not None and last.params is not None:  # kept together
            with torch.no_grad():
                for param, saved in zip(last.params, last.host_copy, strict=True):
                    param.copy_(saved)
        path = save_checkpoint(s, "last_good", progress=last.progress, weights_only=True)
        self.last_good = LastGood(last.step, path, "written from the starting weights")
        return path

    def _warn_if_short(self, s: TrainingRun) -> None:
        """Once per run: the free space is below the last checkpoint's size, so this save will
        likely fail (and stop the run) unless space is freed first."""
        if self.space_warned or not s.accelerator.is_main_process:
            return
        short = space_shortfall(s.run.checkpoints)
        if short is None:
            return
        needed, free = short
        self.space_warned = True
        log.warning(
            "the checkpoint of step %d will not fit: %s free on the disk of %s, and the last checkpoint took %s. "
            "Free space now, or the save will fail and stop the run (keep_last_checkpoints deletes old "
            "checkpoints only after a new one is complete). Said once per run.",
            s.state.global_step,
            format_bytes(free),
            s.run.checkpoints,
            format_bytes(needed),
        )


def _host_copy(s: Any, *, keep: bool) -> LastGood:
    """The trained parameters as they are now, copied to the host when `keep` (rank 0, which
    writes), with the counters they belong to (every rank: the save is collective)."""
    progress = copy.copy(s.state)
    if not keep:
        return LastGood(progress.global_step, progress=progress)
    params = [p for comp in s.optim.components.values() for p in comp.params]
    saved = [p.detach().to("cpu", copy=True) for p in params]
    log.info(
        "keeping a host copy of the %d trained tensors (%s) until this run's first checkpoint: if the weights "
        "turn non-finite before it, that copy is saved as the last good state",
        len(saved),
        format_bytes(sum(t.numel() * t.element_size() for t in saved)),
    )
    return LastGood(progress.global_step, params=params, host_copy=saved, progress=progress)
