"""The one interface the training loop, checkpointing and observers use for an optimizer set.

Two implementations: `OptimizerSet` (optimizer_set.py: one optimizer per component, stepped
after the window's backwards) and `FusedOptimizerSet` (fused_backward.py: one optimizer per
parameter, stepped inside backward). The loop calls `backward(loss, scaler)` for every
micro-batch and `step(scaler)` at each window end and never needs to know which one it holds;
checks and quirks both share (state format, which components train, the stochastic-rounding
stream, LRs, the start-up table) are written here once.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from typing import Any

import torch

from trainer.optim.component import ComponentOptimizer, StepResult, effective_lr
from trainer.optim.state_io import GroupSettings, ResumeRules, resume_rules
from trainer.optim.stochastic_rounding import StochasticRounding
from trainer.optim.table import render_summary
from trainer.runtime.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class TrainingOptimizer(ABC):
    """What steps the trained components. Subclasses set `components` (the per-component
    settings, parameters and, for the plain set, optimizers), `clip_grad_norm`,
    `log_grad_norm`, `rounding` (bf16 stochastic rounding or None, fixed at construction) and
    `state_key` (the key of their per-component entries in `state_dict()`)."""

    components: dict[str, ComponentOptimizer]
    clip_grad_norm: float | None
    log_grad_norm: bool
    rounding: StochasticRounding | None
    state_key: str
    fused_back_pass: bool
    stopped_layouts: dict[str, str]  # components whose training stopped mid-run: name -> layout

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        """The backward of one micro-batch's loss (scaled when a GradScaler is on)."""
        (scaler.scale(loss) if scaler is not None else loss).backward()

    @abstractmethod
    def step(self, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """End of an accumulation window: the optimizer step (or its report), LR schedules."""

    def layout(self) -> dict[str, str]:
        """Per trained component: optimizer name and a hash of its trainable parameter names (the
        resume guard compares it). A component whose training stopped keeps its place."""
        layout = {}
        for name, comp in self.components.items():
            digest = hashlib.sha256("\n".join(comp.param_names).encode()).hexdigest()[:12]
            layout[name] = f"{comp.spec.name} ({len(comp.param_names)} tensors, {digest})"
        return layout | self.stopped_layouts

    def stop_component(self, name: str) -> None:
        """Stop stepping `name` (stop_text_encoder_training): its optimizer and LR schedule are
        dropped and their state (two moments per weight for AdamW) freed now, not when the last
        reference goes; its layout stays in `layout()`. Idempotent."""
        if name not in self.components:
            return
        self.stopped_layouts[name] = self.layout()[name]
        self.components.pop(name).optimizer.state.clear()

    def close(self) -> None:
        """Release what ties this set to its parameters beyond its own lifetime: the fused back
        pass's per-parameter hooks (FusedOptimizerSet). Nothing to release for `OptimizerSet`;
        idempotent. Call it when the run is over (the session's close)."""
        return  # a default, not an abstract method: most sets hold nothing to release

    @abstractmethod
    def representative(self, name: str) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """An optimizer and scheduler whose LR is the component's (all of a fused set's agree)."""

    @abstractmethod
    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """Every torch optimizer that updates parameters."""

    @abstractmethod
    def _entries_state(self) -> dict[str, Any]:
        """Per-component state under `state_key`."""

    @abstractmethod
    def _load_entries(self, saved: dict[str, Any]) -> None:
        """Restore per-component state (the component set is already checked), under this run's
        changeable settings (`load_with_new_settings` with `resume_rules(name)`)."""

    @abstractmethod
    def _saved_pair(self, entry: dict[str, Any]) -> tuple[dict, dict | None]:
        """One saved per-component entry's optimizer and scheduler state (for a fused set, its
        first parameter's: all of a component's agree)."""

    def learning_rates(self) -> dict[str, float]:
        """Effective LR per component (d*lr for D-Adaptation/Prodigy, Adafactor's own LR).
        Syncs; call at log time."""
        return {
            name: effective_lr(comp.resolved, comp.spec, *self.representative(name))
            for name, comp in self.components.items()
        }

    def nominal_learning_rates(self) -> dict[str, float]:
        """The scheduled `lr` of each component's param group (the multiplier for adaptive ones)."""
        return {
            name: float(self.representative(name)[0].param_groups[0]["lr"] or 0.0) for name in self.components
        }

    def lr_schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {name: self.representative(name)[1] for name in self.components}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "stochastic_rounding": self.rounding.state_dict() if self.rounding is not None else None,
            self.state_key: self._entries_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact restore of what training learned (moments, step counters, adaptive estimates)
        under this run's changeable settings: its LR base, schedule, betas / eps / weight decay
        (state_io.py; docs/CHECKPOINTS.md "What may change on resume"). A changed format,
        fused_back_pass or set of trained components is a CheckpointError naming the setting;
        the subclass checks optimizer, parameters and fixed options."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"optimizer state: unsupported format {state.get('format')!r} (expected {STATE_FORMAT})"
            )
        if self.state_key not in state:
            saved_mode = "false" if self.fused_back_pass else "true"
            raise CheckpointError(
                f"optimizer state: the checkpoint was trained with fused_back_pass: {saved_mode}; resume it "
                f"with fused_back_pass: {saved_mode}."
            )
        saved = state[self.state_key]
        if set(saved) != set(self.components):
            raise CheckpointError(
                f"optimizer state: the checkpoint trains {sorted(saved)}, this run trains {sorted(self.components)}. "
                "Use the same disable_unet_training / disable_textenc_training as the checkpoint."
            )
        self._load_entries(saved)
        load_rounding_state(self.rounding, state.get("stochastic_rounding"))

    def resume_rules(self, name: str) -> ResumeRules:
        """What of component `name`'s saved state this run's settings may replace."""
        comp = self.components[name]
        return resume_rules(name, comp.spec, comp.resolved)

    def saved_settings(self, state: dict[str, Any]) -> dict[str, GroupSettings]:
        """Per component this set trains: LR base, LR at the step and changeable options as saved
        in `state` (a `state_dict()` of this kind of set; read only, nothing is loaded)."""
        saved = state[self.state_key]
        return {name: GroupSettings.of_state(*self._saved_pair(saved[name])) for name in self.components}

    def current_settings(self) -> dict[str, GroupSettings]:
        """The same, from the live optimizers: what the next update uses."""
        return {name: GroupSettings.of_live(*self.representative(name)) for name in self.components}

    def trainable_parameter_count(self) -> dict[str, tuple[int, int]]:
        return {name: (c.trainable_count, c.frozen_count) for name, c in self.components.items()}

    def resolved_config(self) -> dict[str, dict[str, Any]]:
        """The fully resolved per-component settings of this run (train.json's lr, the automatic
        warmup/decay). Only logged in the start-up table; the run folder's
        optimizer_effective.json holds optimizer.json's own values (`OptimizerFile.as_dict`)."""
        return {name: comp.resolved.as_dict() for name, comp in self.components.items()}

    def summary_table(self) -> str:
        return render_summary(self.components, self.clip_grad_norm)


def load_rounding_state(rounding, saved: dict | None) -> None:
    """Continue the checkpoint's stochastic-rounding stream; a checkpoint without one (trained
    with fp32 weights) starts a fresh stream from the seed, which is said in the log."""
    if rounding is None:
        return
    if saved is None:
        logger.info(
            "weight_dtype bf16: the checkpoint has no stochastic-rounding state; seeding a new stream"
        )
        return
    rounding.load_state_dict(saved)
