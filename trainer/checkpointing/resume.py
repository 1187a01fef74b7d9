"""How a run starts from an earlier one: exact resume, or EveryDream2's chaining from weights.

`resume_ckpt` names where the weights come from. When it is a checkpoint of this trainer that
holds a training state and every setting the state depends on is unchanged, the run resumes
exactly (same run folder, step counter, optimizer, LR schedule, data position, RNG). With
`findlast` and anything less (EveryDream2's chaining: `save_optimizer: false` in the previous
run, or changed batch size / resolution / optimizer ...), the newest weights start a new run
and the warning says why; an explicit checkpoint path with changed settings is refused instead,
because naming one checkpoint says "continue exactly this".

`seed: -1` means "random" for a new run and "the recorded seed" for an exact resume, so the
shipped EveryDream2 train.json (seed -1) can still resume exactly.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.checkpointing.store import (
    TRAINING_STATE,
    CheckpointInfo,
    find_last,
    load_training_state,
    open_checkpoint,
)
from trainer.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

PIPELINE_DIR = "pipeline"
NEW, EXACT, WEIGHTS = "new run", "exact resume", "weights only"


@dataclass(frozen=True)
class ResumePlan:
    """Where the weights come from and whether the training state is restored."""

    spec: str  # model spec to load (a checkpoint's pipeline folder when it is one of ours)
    checkpoint: CheckpointInfo | None = None
    state: dict | None = None  # the loaded training state, only for an exact resume
    mode: str = NEW
    reason: str = ""
    findlast: bool = False

    @property
    def exact(self) -> bool:
        return self.mode == EXACT

    @property
    def source(self) -> CheckpointInfo:
        """The checkpoint this run continues (exact resume or weights only); a new run has none."""
        if self.checkpoint is None:
            raise ValueError(f"a {self.mode} run continues no checkpoint of this trainer")
        return self.checkpoint

    @property
    def saved_state(self) -> dict:
        """The loaded training state of an exact resume (dropped once restored)."""
        if self.state is None:
            raise ValueError("only an exact resume holds a training state, until it is restored")
        return self.state

    def recorded_seed(self) -> int | None:
        return None if self.state is None else self.state.get("guard", {}).get("seed")

    def weights_only(self, reason: str) -> ResumePlan:
        """Continue from this checkpoint's weights only; warn why and what starts anew."""
        log.warning(
            "resume_ckpt %s: continuing from the weights of %s only (EveryDream2 chaining): %s. The "
            "optimizer state, LR schedule, step counter and data order start anew in a new run folder.",
            "findlast" if self.findlast else self.spec,
            self.source.path,
            reason,
        )
        return replace(self, state=None, mode=WEIGHTS, reason=reason)

    def describe(self) -> str:
        """One line for the start-up summary."""
        if self.mode == EXACT:
            return f"start: exact resume of {self.source.path} at step {self.source.step}"
        if self.mode == WEIGHTS:
            return (
                f"start: weights of {self.source.path} (step {self.source.step}) only, "
                f"{self.reason}; optimizer, LR schedule and step counter start anew"
            )
        return f"start: new run from {self.spec}"


def plan_resume(resume_ckpt: str, logdir: str, project_name: str) -> ResumePlan:
    """Map `resume_ckpt` to a plan. Settings are compared later (`check_settings`)."""
    findlast = resume_ckpt == "findlast"
    if findlast:
        info = find_last(Path(logdir), project_name)
        log.info("findlast: newest checkpoint is %s (step %d)", info.path, info.step)
    else:
        path = Path(resume_ckpt)
        if path.is_dir() and path.name.startswith(".tmp-"):
            raise CheckpointError(
                f"'{path}' is an incomplete checkpoint (interrupted save); it cannot be loaded"
            )
        if not (path.is_dir() and (path / "manifest.json").exists()):
            return ResumePlan(spec=resume_ckpt)
        info = open_checkpoint(path)
    plan = ResumePlan(spec=str(info.path / PIPELINE_DIR), checkpoint=info, findlast=findlast)
    owner = info.manifest.get("project_name")
    if findlast and owner is not None and owner != project_name:
        return plan.weights_only(f"it belongs to project '{owner}', not '{project_name}'")
    if not info.resumable:
        if info.manifest.get("reason") == "last_good":
            return plan.weights_only(
                "it holds the starting weights of a run stopped by non-finite weights (no training state)"
            )
        if not findlast:
            return plan.weights_only("it holds no training state (saved with save_optimizer: false)")
        return plan.weights_only("it holds no training state (the previous run had save_optimizer: false)")
    return replace(plan, state=load_training_state(info.path / TRAINING_STATE), mode=EXACT)


def resolve_seed(seed: int, plan: ResumePlan, draw: Callable[[], int] | None = None) -> int:
    """-1: the recorded seed when resuming exactly, else a new random one from `draw` (logged).

    `draw` defaults to a fresh random seed; a multi-process run passes one that hands every
    process rank 0's draw (`trainer.run.session`), since the data order and each sample's noise
    derive from the seed and must be the same on every rank.
    """
    if seed != -1:
        return seed
    recorded = plan.recorded_seed()
    if plan.exact and recorded is not None:
        log.info("seed -1: resuming with the checkpoint's recorded seed %d", recorded)
        return int(recorded)
    chosen = draw() if draw is not None else random_seed()
    log.info("seed -1: using random seed %d (recorded in the run folder)", chosen)
    return chosen


def random_seed() -> int:
    """A new seed for `seed: -1`, in the range torch and numpy generators accept."""
    return secrets.randbelow(2**31)


def resume_guard(cfg, *, world_size: int, data_fingerprint: str, optim) -> dict[str, Any]:
    """Settings that must not change across an exact resume."""
    return {
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "world_size": world_size,
        "data": data_fingerprint,
        "resolution": cfg.resolution,
        "fused_back_pass": cfg.fused_back_pass,
        "trained": optim.layout(),
    }


def check_settings(plan: ResumePlan, current_guard: dict[str, Any]) -> ResumePlan:
    """Compare the saved guard with this run's. Keys an older checkpoint lacks are not compared."""
    if not plan.exact:
        return plan
    saved = plan.saved_state.get("guard", {})
    changed = {k: (saved[k], v) for k, v in current_guard.items() if k in saved and saved[k] != v}
    if not changed:
        return plan
    details = "; ".join(f"{k}: checkpoint {old!r} -> now {new!r}" for k, (old, new) in changed.items())
    if plan.findlast:
        return plan.weights_only(f"settings changed ({details})")
    raise CheckpointError(
        f"cannot resume '{plan.source.path}' exactly because settings changed ({details}). Restore them, "
        f"continue from its weights with --resume_ckpt findlast, or start a new run from its weights with "
        f"--resume_ckpt {plan.source.path / PIPELINE_DIR}"
    )


def schedule_horizon(optim, total_optimizer_steps: int) -> dict[str, Any]:
    """Each component's LR schedule and the run length it derives from (saved in the training
    state: the change table of a later resume compares against it, resume_changes.py). Older
    checkpoints lack it, or its cycles and power."""
    return {
        "total_optimizer_steps": total_optimizer_steps,
        "components": {
            name: {
                "lr_scheduler": comp.resolved.lr_scheduler,
                "lr_decay_steps": comp.resolved.lr_decay_steps,
                "lr_warmup_steps": comp.resolved.lr_warmup_steps,
                "lr_scheduler_num_cycles": comp.resolved.num_cycles,
                "lr_scheduler_power": comp.resolved.power,
            }
            for name, comp in optim.components.items()
        },
    }
