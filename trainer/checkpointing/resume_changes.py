"""The one table of what an exact resume changes, old -> new, logged at start-up.

What a user may change on an exact resume is applied (docs/CHECKPOINTS.md, "What may change on
resume"): the optimizer set takes this run's LR base, schedule and betas / eps / weight decay
when it loads the saved state (trainer/optim/state_io.py), and the loop reads max_epochs and
the save / sample / validation cadence from this run's config. This module only compares, so
that the log says what runs: one table, and nothing when nothing differs.

Old values come from the checkpoint, never from a guess:

* the saved optimizer and scheduler states (in every checkpoint): the LR base, the LR at the
  resume step, betas / eps / weight decay;
* the saved horizon (`resume.schedule_horizon`): schedule name, warmup, decay, cycles, power
  and the run's optimizer steps;
* the run folder's train_effective.json when it is the configuration the checkpoint was saved
  with (its hash is the manifest's `config_hash`; a later session of the run may have rewritten
  it): max_epochs and the cadence keys.

What a checkpoint does not record is named in a note instead of compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpointing.resume import ResumePlan, schedule_horizon

log = logging.getLogger(__name__)

HEADER = "settings differ from the checkpoint's"
RUN_SCOPE = "run"
# Run-level train.json keys that may change on a resume (the loop reads them from this run's config).
CADENCE_KEYS = (
    "save_every_n_epochs",
    "save_every_n_steps",
    "ckpt_every_n_minutes",
    "save_ckpts_from_n_epochs",
    "sample_steps",
    "sample_prompts",
    "validation_config",
)
# Param-group keys of the changeable optimizer options, as the table names them.
OPTION_LABELS = {
    "betas": "betas",
    "beta3": "beta3",
    "eps": "eps",
    "weight_decay": "weight decay",
    "log_every": "log_every",
}
# Schedules that ignore warmup / decay: a change of those does nothing for them and is not shown.
_IGNORE_WARMUP = ("constant", "adafactor")
_IGNORE_DECAY = ("constant", "constant_with_warmup", "adafactor")
_SCHEDULE_ROWS = ("lr", "scheduler", "warmup steps", "decay steps")


@dataclass(frozen=True)
class Change:
    """One row: `scope` is a component name or "run"; values as the table prints them."""

    scope: str
    setting: str
    old: str
    new: str


@dataclass(frozen=True)
class ResumeChanges:
    """What an exact resume changes (rows, old -> new) and what it could not compare (notes)."""

    step: int  # the resume step: the next update is step + 1
    rows: tuple[Change, ...]
    notes: tuple[str, ...]  # what the checkpoint does not record

    def render(self) -> str:
        lines = []
        if self.rows:
            lines.append(f"resume at step {self.step}: {HEADER} and apply from the next step (old -> new):")
            scope_w = max(len(c.scope) for c in self.rows)
            setting_w = max(len(c.setting) for c in self.rows)
            lines += [
                f"  {c.scope:<{scope_w}}  {c.setting:<{setting_w}}  {c.old} -> {c.new}" for c in self.rows
            ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def log_resume_changes(
    plan: ResumePlan, optim, cfg, total_optimizer_steps: int, config_path: Path
) -> ResumeChanges:
    """After the exact restore (`plan.state` still held): log the change table, or only the
    notes when nothing recorded differs. `config_path`: the run folder's train_effective.json,
    read before this session overwrites it."""
    previous, why_unknown = read_previous_config(config_path, plan.source.manifest)
    changes = collect_changes(plan.saved_state, optim, cfg, total_optimizer_steps, previous, why_unknown)
    if changes.rows:
        log.warning("%s", changes.render())  # the notes are its last lines
    else:
        for note in changes.notes:
            log.info("resume: %s", note)
    return changes


def read_previous_config(path: Path, manifest: dict) -> tuple[dict | None, str]:
    """The configuration the checkpoint was saved with, or None and why it is not known.

    train_effective.json holds exactly `config_to_json(cfg)` (trainer/run/folder.py `write_json` of its
    parsed text), whose hash the manifest records, so a matching hash identifies it."""
    if not path.is_file():
        return None, f"{path} does not exist"
    text = path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest()[:16] != manifest.get("config_hash"):
        return None, f"{path} is not the configuration this checkpoint was saved with (its hash differs)"
    return json.loads(text), ""


def collect_changes(
    state: dict,
    optim,
    cfg,
    total_optimizer_steps: int,
    previous_config: dict | None,
    why_unknown: str = "not given",
) -> ResumeChanges:
    """Compare a checkpoint's training `state` with this run after the restore: `optim` holds
    what the next update uses, `cfg` and `total_optimizer_steps` the run's settings."""
    horizon = state.get("horizon")
    saved_schedules = (horizon or {}).get("components", {})
    now = schedule_horizon(optim, total_optimizer_steps)["components"]
    old, new = optim.saved_settings(state["optimizers"]), optim.current_settings()
    rows, notes = [], []
    for name in optim.components:
        if name not in saved_schedules:
            notes.append(
                f"{name}: the checkpoint does not record its LR schedule (saved before schedules were "
                "recorded); scheduler, warmup and decay are not compared"
            )
        rows += component_changes(name, old[name], new[name], saved_schedules.get(name), now[name])
    old_total = horizon["total_optimizer_steps"] if horizon else None
    rows += run_changes(previous_config, cfg, old_total, total_optimizer_steps)
    if previous_config is None:
        notes.append(
            f"run-level settings of the checkpoint (max_epochs, {', '.join(CADENCE_KEYS)}) are not known "
            f"({why_unknown}); they are not compared"
        )
    return ResumeChanges(step=int(state["progress"]["global_step"]), rows=tuple(rows), notes=tuple(notes))


def component_changes(name: str, old, new, old_schedule: dict | None, new_schedule: dict) -> list[Change]:
    """Rows of one component. `old` / `new`: `GroupSettings` (trainer/optim/state_io.py);
    `old_schedule` / `new_schedule`: its `schedule_horizon` entries (old None: not recorded).
    When the schedule or the LR changed, the LR at the resume step under both closes the rows."""
    pairs: list[tuple[str, Any, Any]] = [("lr", old.base_lr, new.base_lr)]
    if old_schedule is not None:
        pairs.append(("scheduler", schedule_name(old_schedule), schedule_name(new_schedule)))
        if new_schedule["lr_scheduler"] not in _IGNORE_WARMUP:
            pairs.append(("warmup steps", old_schedule["lr_warmup_steps"], new_schedule["lr_warmup_steps"]))
        if new_schedule["lr_scheduler"] not in _IGNORE_DECAY:
            pairs.append(("decay steps", old_schedule["lr_decay_steps"], new_schedule["lr_decay_steps"]))
    for key, label in OPTION_LABELS.items():
        if key in old.options or key in new.options:
            pairs.append((label, old.options.get(key), new.options.get(key)))
    rows = [Change(name, label, fmt(a), fmt(b)) for label, a, b in pairs if a != b]
    if old.lr != new.lr or any(row.setting in _SCHEDULE_ROWS for row in rows):
        rows.append(Change(name, f"lr at step {new.step}", fmt(old.lr), fmt(new.lr)))
    return rows


def run_changes(previous_config: dict | None, cfg, old_total: int | None, total: int) -> list[Change]:
    """Run-level rows: max_epochs, the run's optimizer steps (from the horizon) and the cadence."""
    pairs: list[tuple[str, Any, Any]] = []
    if previous_config is not None and "max_epochs" in previous_config:
        pairs.append(("max_epochs", previous_config["max_epochs"], cfg.max_epochs))
    if old_total is not None:
        pairs.append(("total optimizer steps", old_total, total))
    for key in CADENCE_KEYS if previous_config is not None else ():
        if previous_config is not None and key in previous_config:
            pairs.append((key, previous_config[key], getattr(cfg, key)))
    return [Change(RUN_SCOPE, label, fmt(a), fmt(b)) for label, a, b in pairs if a != b]


def schedule_name(entry: dict) -> str:
    """The schedule as the start-up table names it (cycles / power where they matter)."""
    name = entry["lr_scheduler"]
    if name == "cosine_with_restarts" and "lr_scheduler_num_cycles" in entry:
        return f"{name} (cycles {entry['lr_scheduler_num_cycles']})"
    if name == "polynomial" and "lr_scheduler_power" in entry:
        return f"{name} (power {fmt(entry['lr_scheduler_power'])})"
    return name


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(fmt(v) for v in value) + ")"
    return str(value)
