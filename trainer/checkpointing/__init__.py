"""Checkpoints and what resuming means: read this package to know what a resume restores.

* `store.py`: the folder store. One directory per checkpoint, written under a temporary name
  with its manifest last, then renamed; `open_checkpoint` validates one, `find_last` finds the
  newest, `apply_retention` deletes old ones. Knows nothing about models.
* `contents.py`: what a checkpoint holds (pipeline folders, single files, `training_state.pt`
  with optimizer, scheduler, scaler, EMA, counters and every rank's RNG) and how it is saved
  (`save_checkpoint`) and restored (`restore_training_state`).
* `resume.py`: how a run starts from an earlier one: `plan_resume` maps `resume_ckpt`
  (a path or `findlast`) to a `ResumePlan`; `check_settings` compares the resume guard (settings
  the training state depends on) and decides exact resume, weights only, or an error.
* `policy.py`: when periodic saves are due (`SavePolicy`).
* `saves.py`: every save of a run (`RunSaves`): never non-finite weights, the early free-space
  warning, the last good state.
"""

from trainer.checkpointing.contents import (
    checkpoint_name,
    config_hash,
    gather_rng_states,
    restore_training_state,
    save_checkpoint,
    training_state_dict,
)
from trainer.checkpointing.policy import SavePolicy
from trainer.checkpointing.resume import (
    EXACT,
    NEW,
    PIPELINE_DIR,
    WEIGHTS,
    ResumePlan,
    check_settings,
    plan_resume,
    random_seed,
    resolve_seed,
    resume_guard,
)
from trainer.checkpointing.store import CheckpointInfo, find_last, list_checkpoints, open_checkpoint

__all__ = [
    "EXACT",
    "NEW",
    "PIPELINE_DIR",
    "WEIGHTS",
    "CheckpointInfo",
    "ResumePlan",
    "SavePolicy",
    "check_settings",
    "checkpoint_name",
    "config_hash",
    "find_last",
    "gather_rng_states",
    "list_checkpoints",
    "open_checkpoint",
    "plan_resume",
    "random_seed",
    "resolve_seed",
    "restore_training_state",
    "resume_guard",
    "save_checkpoint",
    "training_state_dict",
]
