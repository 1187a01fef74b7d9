"""Optimizer step fused into the backward pass: each parameter is updated as soon as its gradient
is complete, and the gradient is freed right after.

Why: a normal step keeps every parameter's gradient alive until `optimizer.step()`, so peak
memory holds weights + optimizer state + **all** gradients (SD1.5 UNet fp32: 3.4 GB of
gradients). Stepping one parameter inside its `register_post_accumulate_grad_hook` keeps at most
the gradients still being produced, saving most of that (see docs/PERFORMANCE.md). The
technique is PyTorch's "optimizer step in backward" recipe: one optimizer (and LR scheduler) per
parameter.

Constraints. train.json's own (validated once, in trainer/config.py; asserted here):

* `grad_accum == 1`: the step happens during the backward of every micro-batch, so gradients
  cannot accumulate over several (nothing here accumulates: the check is config.py's alone).
* no `clip_grad_norm`: clipping needs the total norm over all gradients before any step.

Those known only once the run is built (checked by `check_fused_backward`, ConfigError):

* no fp16 GradScaler: unscaling and the inf/NaN skip need all gradients first (use bf16).
* one process: under DDP the hook would fire on the local gradient before the all-reduce.
* per-parameter optimizers only: D-Adaptation and Prodigy estimate their step size from all
  parameters together, so a per-parameter instance is a different algorithm; they are refused.
* no schedule-free optimizer: its eval-mode weights (what is sampled and saved) are switched
  per OptimizerSet (schedule_free.py), not per parameter; refused rather than saving y weights.

Also: the non-finite-gradient skip of `OptimizerSet.step` cannot happen (each parameter has
already stepped when the last gradient appears); check the loss for finiteness before calling
backward instead.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from trainer.errors import CheckpointError, ConfigError
from trainer.optim.component import StepResult
from trainer.optim.optimizer_set import OptimizerSet, build_component_scheduler
from trainer.optim.protocol import TrainingOptimizer
from trainer.optim.registry import build_optimizer, get_spec
from trainer.optim.state_io import ResumeRules, load_optimizer_state, load_with_new_settings

logger = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None
StepFn = Callable[[torch.optim.Optimizer], None]

STATE_FORMAT = 1


def check_fused_backward(
    *,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    optimizer_names: Iterable[str] = (),
) -> None:
    """Raise ConfigError naming the setting that rules out a fused backward step (those that
    depend on the device, the process count and optimizer.json; train.json's are config.py's)."""
    problems = []
    if uses_grad_scaler:
        problems.append("fp16 mixed precision with a GradScaler (use mixed_precision bf16 or no)")
    if world_size != 1:
        problems.append(f"{world_size} processes (the hook would step before the DDP all-reduce)")
    for name in optimizer_names:
        spec = get_spec(name)
        if spec.adaptive:
            problems.append(f"optimizer '{spec.name}' (adapts its step size over all parameters together)")
        elif spec.schedule_free:
            problems.append(
                f"optimizer '{spec.name}' (schedule-free: samples, validation and checkpoints switch its "
                "weights to eval mode through the OptimizerSet, which per-parameter optimizers bypass; "
                "set fused_back_pass: false)"
            )
    if problems:
        raise ConfigError("fused backward optimizer step is not possible with: " + "; ".join(problems))


class FusedBackward:
    """Per-parameter optimizers and schedulers stepped from post-accumulate-grad hooks.

    `steps_taken` counts hook calls per parameter; after a backward every trained parameter has
    stepped once and has `.grad is None`.
    """

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        make_optimizer: MakeOptimizer,
        lr_scheduler_factory: MakeScheduler,
        step_fn: StepFn | None = None,
        track_grad_norm: bool = False,
    ) -> None:
        if not named_params:
            raise ConfigError("fused backward: no trainable parameters were given")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self.schedulers = [lr_scheduler_factory(o) if lr_scheduler_factory else None for o in self.optimizers]
        self._step_fn = step_fn or (lambda opt: opt.step())
        self._track_grad_norm = track_grad_norm
        self._grad_sq: torch.Tensor | None = None  # sum of squared gradients since take_grad_norm
        self._handles = []
        for index, p in enumerate(self.params):
            if not p.requires_grad:
                raise ConfigError(f"fused backward: parameter '{self.names[index]}' does not require grad")
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        optimizer, scheduler = self.optimizers[index], self.schedulers[index]

        def step_and_free(param: torch.Tensor) -> None:
            if self._track_grad_norm:  # stays on the device: no sync
                # fp32 accumulation inside the norm kernel: no fp32 copy of a bf16 gradient
                sq = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32).square()
                self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            self._step_fn(optimizer)
            if scheduler is not None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
                    scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    def take_grad_norm(self) -> torch.Tensor | None:
        """Total gradient norm over the hooks since the last call (0-dim, on the device), or None."""
        sq, self._grad_sq = self._grad_sq, None
        return None if sq is None else sq.sqrt()

    def advance_schedulers(self) -> None:
        """Step every LR schedule once without an update (a skipped step keeps LR = f(step))."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            for scheduler in self.schedulers:
                if scheduler is not None:
                    scheduler.step()

    def learning_rates(self) -> dict[str, float]:
        return {n: float(o.param_groups[0]["lr"]) for n, o in zip(self.names, self.optimizers, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "params": {
                name: {
                    "optimizer": opt.state_dict(),
                    "lr_scheduler": sched.state_dict() if sched is not None else None,
                }
                for name, opt, sched in zip(self.names, self.optimizers, self.schedulers, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any], rules: ResumeRules | None = None) -> None:
        """Restore every parameter's optimizer and schedule. With `rules` (a training resume),
        each keeps this run's LR base, schedule and changeable options
        (state_io.load_with_new_settings); without, everything is the saved state's."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"fused backward state: unsupported format {state.get('format')!r}")
        saved = state["params"]
        if list(saved) != self.names:
            raise CheckpointError(
                f"fused backward state: {len(saved)} saved parameters vs {len(self.names)} now; the trained "
                "parameters changed (text_encoder_freezing, clip_skip or disable_*_training)."
            )
        for name, opt, sched in zip(self.names, self.optimizers, self.schedulers, strict=True):
            if rules is not None:
                load_with_new_settings(
                    opt, sched, saved[name]["optimizer"], saved[name]["lr_scheduler"], rules
                )
                continue
            load_optimizer_state(opt, saved[name]["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved[name]["lr_scheduler"])


def attach_fused_backward(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    make_optimizer: MakeOptimizer,
    *,
    lr_scheduler_factory: MakeScheduler,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    optimizer_name: str | None = None,
    step_fn: StepFn | None = None,
    track_grad_norm: bool = False,
) -> FusedBackward:
    """One optimizer per parameter (`make_optimizer([p])`), stepped in the parameter's
    post-accumulate-grad hook, with its scheduler (`lr_scheduler_factory(opt)`, or None), then
    `.grad` set to None. `params` may be parameters or (name, parameter) pairs (names are used in
    state_dict). `step_fn(opt)` replaces `opt.step()` (e.g. bf16 stochastic rounding). Raises
    ConfigError when the settings rule it out (see module docstring)."""
    check_fused_backward(
        uses_grad_scaler=uses_grad_scaler,
        world_size=world_size,
        optimizer_names=[optimizer_name] if optimizer_name else (),
    )
    items = list(params)
    named = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
    return FusedBackward(named, make_optimizer, lr_scheduler_factory, step_fn, track_grad_norm)


def fused_backward_from_optimizer_set(
    optim,
    *,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    step_fn: StepFn | None = None,
    track_grad_norm: bool = False,
) -> dict[str, FusedBackward]:
    """Fused backward for each component of an `OptimizerSet`, with the same resolved optimizer,
    options, LR and schedule as its (then unused) component optimizer. Build the OptimizerSet
    first (it applies the freezing); never call its `step()` afterwards."""
    assert optim.clip_grad_norm is None, (
        "fused_back_pass with clip_grad_norm (refused by train.json validation)"
    )
    out = {}
    for name, comp in optim.components.items():
        r = comp.resolved
        spec = get_spec(r.optimizer)

        def make_optimizer(ps, spec=spec, r=r):
            return build_optimizer(spec, ps, r.lr, r.options)

        def make_scheduler(opt, r=r):
            return build_component_scheduler(r, opt)

        out[name] = attach_fused_backward(
            list(zip(comp.param_names, comp.params, strict=True)),
            make_optimizer,
            lr_scheduler_factory=make_scheduler,
            uses_grad_scaler=uses_grad_scaler,
            world_size=world_size,
            optimizer_name=r.optimizer,
            step_fn=step_fn,
            track_grad_norm=track_grad_norm,
        )
    logger.info("fused backward: %s", {n: len(f.params) for n, f in out.items()})
    return out


class FusedOptimizerSet(TrainingOptimizer):
    """What the loop steps when `fused_back_pass` is on: every update is done inside backward
    by one `FusedBackward` per component.

    Built from an `OptimizerSet` (which did the freezing, resolved the settings and holds the
    stochastic rounding; its own optimizers stay unused and, being lazily initialised, hold no
    state). The non-finite skip moves before backward: `backward(loss)` makes the step's one
    host sync and skips the backward of a non-finite loss, so no parameter is touched; the LR
    schedules still advance, as in `OptimizerSet.step`. A non-finite gradient from a finite loss
    cannot be caught (every parameter has stepped by then); this mode refuses fp16, the usual
    source of those.
    """

    state_key = "fused"
    fused_back_pass = True

    def __init__(self, base: OptimizerSet, *, uses_grad_scaler: bool, world_size: int) -> None:
        self.components = base.components
        self.clip_grad_norm = None
        self.log_grad_norm = base.log_grad_norm
        self.rounding = base.rounding
        self.fused = fused_backward_from_optimizer_set(
            base,
            uses_grad_scaler=uses_grad_scaler,
            world_size=world_size,
            step_fn=base.rounding.step if base.rounding is not None else None,
            track_grad_norm=base.log_grad_norm,
        )
        self._skip_pending = False

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        """Backward (which steps every parameter) only for a finite loss; a GradScaler is refused
        at construction, so `scaler` is None."""
        finite = bool(torch.isfinite(loss.detach()).all())  # the step's one host sync
        self._skip_pending |= not finite
        if finite:
            loss.backward()

    def step(self, scaler=None):
        """Finish the optimizer step whose updates happened in backward: report skip and norms."""
        skipped, self._skip_pending = self._skip_pending, False
        if skipped:  # otherwise each parameter's schedule advanced in its hook
            for name, fused in self.fused.items():
                if self.components[name].schedule_advances(updated=False):
                    fused.advance_schedulers()
        norms = {name: n for name, f in self.fused.items() if (n := f.take_grad_norm()) is not None}
        return StepResult(skipped=skipped, grad_norms=norms)

    def representative(self, name: str):
        fused = self.fused[name]
        return fused.optimizers[0], fused.schedulers[0]

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for fused in self.fused.values() for opt in fused.optimizers]

    def _entries_state(self) -> dict[str, Any]:
        return {name: fused.state_dict() for name, fused in self.fused.items()}

    def _saved_pair(self, entry: dict[str, Any]) -> tuple[dict, dict | None]:
        first = next(iter(entry["params"].values()))
        return first["optimizer"], first["lr_scheduler"]

    def _load_entries(self, saved: dict[str, Any]) -> None:
        for name, fused in self.fused.items():
            fused.load_state_dict(saved[name], self.resume_rules(name))
