"""Loading an optimizer's saved state: exactly as saved (dtypes), under this run's settings.

**Dtypes.** `torch.optim.Optimizer.load_state_dict` casts each floating-point state tensor to
its parameter's dtype. That is harmless when an optimizer keeps its state in the weights' dtype
and breaks exact resume whenever it does not:

* fp32 moments beside bf16 weights (`weight_dtype: bf16`): the cast rounds the moments to bf16;
* Prodigy + schedule-free keeps its `p0` and `s` in bf16 beside fp32 weights: after the cast,
  its in-place bf16 updates of `s` become fp32 ones, the adapted step size d drifts, and the
  resumed run leaves the straight one within a few steps.

`load_optimizer_state` lets torch load (it maps saved indices to parameters and moves tensors to
their device) and then puts back, for each entry whose dtype changed, the saved tensor itself on
the device torch chose. Entries torch kept in their dtype are left as torch loaded them.

**Changed settings** (docs/CHECKPOINTS.md, "What may change on resume"). Torch restores the
saved param groups and a scheduler its saved `base_lrs`, so a resume at another LR, betas or
weight decay would silently train with the old ones while the log shows the new. A user stops a
run that overfits or stalls to continue it differently, so `load_with_new_settings` keeps what
the run has learned (moments, step counters, D-Adaptation's / Prodigy's d: everything in
`state` and every group key outside `CHANGEABLE_GROUP_KEYS`) and takes from this run's freshly
built optimizer and scheduler what the user may change: the LR base (the schedule continues at
its step from the new base, with the new schedule's shape) and the `CHANGEABLE_OPTIONS`. Other
options change what the state means or holds (`amsgrad` adds a moment, `relative_step` makes
Adafactor compute its own LR): a change of one is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from trainer.optim.resolve import ResolvedComponent
from trainer.optim.schedules import mirrors_optimizer_lr
from trainer.optim.spec import OptimizerSpec
from trainer.runtime.errors import CheckpointError

if TYPE_CHECKING:
    from bitsandbytes.optim.optimizer import Optimizer8bit

# optimizer.json keys that a resume applies, and the param-group keys they are stored under
# (`epsilon` is torch's `eps`; Adafactor keeps epsilon and eps2 together as `eps`).
CHANGEABLE_OPTIONS = ("betas", "beta3", "epsilon", "eps2", "weight_decay", "log_every")
CHANGEABLE_GROUP_KEYS = ("betas", "beta3", "eps", "weight_decay", "log_every")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict(saved)`, with the saved dtype of every state tensor kept, and a
    paged bitsandbytes optimizer's states back in paged buffers.

    The training state is read with `map_location="cpu"`; bitsandbytes' own load would move its
    states to ordinary device memory, so a resumed `paged_*` run could run out of memory where
    the fresh run fit. Its states are copied into buffers from its own pager instead.
    """
    paged = _paged_bitsandbytes(optimizer)
    if paged is not None:
        paged.load_state_dict(saved, move_to_device=False)
    else:
        optimizer.load_state_dict(saved)
    by_index = dict(
        zip(
            chain.from_iterable(g["params"] for g in saved["param_groups"]),
            chain.from_iterable(g["params"] for g in optimizer.param_groups),
            strict=True,
        )
    )
    for index, entry in saved["state"].items():
        state = optimizer.state[by_index[index]]
        for key, value in entry.items():
            loaded = state.get(key)
            if torch.is_tensor(value) and torch.is_tensor(loaded) and loaded.dtype != value.dtype:
                state[key] = value.to(device=loaded.device)
    if paged is not None:
        _repage(paged)


def _paged_bitsandbytes(optimizer: torch.optim.Optimizer) -> Optimizer8bit | None:
    """`optimizer` when it is a paged bitsandbytes optimizer, else None."""
    if not getattr(optimizer, "is_paged", False):
        return None
    from bitsandbytes.optim.optimizer import Optimizer8bit  # loaded already: the optimizer is one

    # `is_paged` is bitsandbytes' own attribute, set by Optimizer8bit and its subclasses.
    assert isinstance(optimizer, Optimizer8bit), f"{type(optimizer).__name__} is paged but not bitsandbytes'"
    return optimizer


def _repage(optimizer: Optimizer8bit) -> None:
    """Move a paged optimizer's loaded states into its pager's buffers (by identity: a loaded
    tensor keeps the pickled `is_paged` tag, so the tag proves nothing)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p) or {}
            for key in ("state1", "state2"):
                value = state.get(key)
                if torch.is_tensor(value):
                    buffer = optimizer.get_state_buffer(p, dtype=value.dtype)
                    if buffer.device != value.device or buffer.data_ptr() != value.data_ptr():
                        buffer.copy_(value)
                        state[key] = buffer


@dataclass(frozen=True)
class ResumeRules:
    """How one component's saved optimizer state meets this run's settings."""

    component: str
    fixed_options: tuple[str, ...]  # param-group keys that may not differ from the checkpoint's
    rebase_lr: bool  # False for Adafactor's own schedule: it has no LR of ours to change


def resume_rules(component: str, spec: OptimizerSpec, resolved: ResolvedComponent) -> ResumeRules:
    """Every option the optimizer takes is fixed except the changeable ones."""
    fixed = tuple(key for key in spec.keys if key not in CHANGEABLE_OPTIONS)
    return ResumeRules(component, fixed, rebase_lr=not mirrors_optimizer_lr(resolved.lr_scheduler))


@dataclass(frozen=True)
class GroupSettings:
    """What an optimizer (its first param group) and its scheduler train with at a step: read
    from a checkpoint's state dicts or from the live objects, for the resume's change table."""

    step: int | None  # optimizer steps the schedule has taken (None: no scheduler)
    base_lr: float | None  # the schedule's base (None: Adafactor computes its own LR)
    lr: float | None  # the LR of the next update: base x the schedule at `step`
    options: dict[str, Any] = field(default_factory=dict)  # CHANGEABLE_GROUP_KEYS present

    @classmethod
    def of_state(cls, optimizer_state: dict, scheduler_state: dict | None) -> GroupSettings:
        group = optimizer_state["param_groups"][0]
        base = scheduler_state["base_lrs"][0] if scheduler_state is not None else None
        step = scheduler_state["last_epoch"] if scheduler_state is not None else None
        return cls._of(group, base, step)

    @classmethod
    def of_live(cls, optimizer: torch.optim.Optimizer, scheduler) -> GroupSettings:
        base = scheduler.base_lrs[0] if scheduler is not None else None
        return cls._of(
            optimizer.param_groups[0], base, scheduler.last_epoch if scheduler is not None else None
        )

    @classmethod
    def _of(cls, group: dict, base, step) -> GroupSettings:
        lr = group.get("lr")
        return cls(
            step=step,
            base_lr=None if lr is None or base is None else float(base),
            lr=None if lr is None else float(lr),
            options={k: group[k] for k in CHANGEABLE_GROUP_KEYS if k in group},
        )


def load_with_new_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    saved_optimizer: dict,
    saved_scheduler: dict | None,
    rules: ResumeRules,
) -> None:
    """Load the saved state into this run's freshly built `optimizer` and `scheduler`, keeping
    their LR base, schedule and changeable options (module docstring). With nothing changed
    the result equals a plain load bit for bit: the LR is recomputed as torch's LambdaLR does."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    _check_fixed_options(rules, fresh, saved_optimizer["param_groups"])
    new_base = list(scheduler.base_lrs) if scheduler is not None else []
    load_optimizer_state(optimizer, saved_optimizer)
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group.update({k: new[k] for k in CHANGEABLE_GROUP_KEYS if k in new and k in group})
    if scheduler is None:
        return
    if saved_scheduler is None:
        raise CheckpointError(
            f"optimizer state: {rules.component}: the checkpoint has no LR scheduler state to resume"
        )
    scheduler.load_state_dict(saved_scheduler)
    if rules.rebase_lr:
        _rebase_schedule(optimizer, scheduler, new_base)


def _check_fixed_options(rules: ResumeRules, fresh: list[dict], saved_groups: list[dict]) -> None:
    for new, old in zip(fresh, saved_groups, strict=True):
        for key in rules.fixed_options:
            if key in new and key in old and not _same(new[key], old[key]):
                raise CheckpointError(
                    f"optimizer state: {rules.component}: option '{key}' was {old[key]!r} in the checkpoint and "
                    f"is {new[key]!r} now; it changes what the optimizer's saved state means, so it cannot "
                    f"change on an exact resume. Set it back to {old[key]!r} in optimizer.json, or start a new "
                    "run from the checkpoint's weights (resume_ckpt: its pipeline folder)."
                )


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def _rebase_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    base_lrs: list[float | torch.Tensor],
) -> None:
    """The loaded scheduler keeps its step counter; its base becomes this run's and the LR is
    this run's schedule (lambda) at that step: `base * lambda(step)`, LambdaLR's own formula."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise TypeError(
            f"{type(scheduler).__name__}: only LambdaLR schedules can be continued from a new base"
        )
    scheduler.base_lrs = list(base_lrs)
    values = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, lambdas, strict=True)]
    for group, base, value in zip(optimizer.param_groups, base_lrs, values, strict=True):
        group["initial_lr"] = base
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
    # what get_last_lr() returns (copies, as torch keeps them, never the groups' own tensors)
    scheduler._last_lr = [
        lr.clone() if torch.is_tensor(lr) else lr for lr in (g["lr"] for g in optimizer.param_groups)
    ]
