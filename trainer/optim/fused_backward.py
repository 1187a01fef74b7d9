"""Optimizer step fused into the backward pass: each parameter is updated as soon as its gradient
is complete, and the gradient is freed right after.

Why: a normal step keeps every parameter's gradient alive until `optimizer.step()`, so peak
memory holds weights + optimizer state + **all** gradients (SD1.5 UNet fp32: 3.4 GB of
gradients). Stepping one parameter inside its `register_post_accumulate_grad_hook` keeps at most
the gradients still being produced, saving most of that (see docs/PERFORMANCE.md). The
technique is PyTorch's "optimizer step in backward" recipe: one optimizer (and LR scheduler) per
parameter.

Constraints. train.json's own (validated once, in trainer/config/; asserted here):

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

from trainer.optim.component import StepResult
from trainer.optim.optimizer_set import OptimizerSet, build_component_scheduler
from trainer.optim.protocol import TrainingOptimizer
from trainer.optim.registry import build_optimizer, get_spec
from trainer.optim.schedules import mirrors_optimizer_lr
from trainer.optim.state_io import ResumeRules, load_optimizer_state, load_with_new_settings
from trainer.runtime.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None
StepFn = Callable[[torch.optim.Optimizer], None]

STATE_FORMAT = 1
# What an LR scheduler writes into its optimizer's param group (torch's LRScheduler).
_SCHEDULED_KEYS = ("lr", "initial_lr")


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
    """Per-parameter optimizers stepped from post-accumulate-grad hooks, under one LR schedule.

    After a backward every trained parameter has stepped once and has `.grad is None`.

    The LR schedule is a pure function of the step, so one scheduler (`scheduler`, built on the
    first parameter's optimizer) serves every parameter: it advances once per backward, from a
    callback the first hook queues for the end of that backward (stepping ~880 schedulers in
    Python, one per parameter, was issue 32's waste), and its LR (and `initial_lr`) is then
    written into every per-parameter optimizer's param group: the values each parameter's own
    scheduler computed, bit for bit. A schedule that reads the optimizer's state
    (`schedule_reads_state`: Adafactor's own, which reports the LR Adafactor computed) is stepped
    in the first parameter's hook right after its update instead, and copies nothing (Adafactor
    in that mode ignores the group's LR). The end-of-backward callback assumes a non-reentrant
    backward (the trainer's gradient checkpointing is non-reentrant: trainer/parts/builder.py);
    a reentrant one would advance the schedule when its inner backward ends.

    The hooks hold this object (parameter -> hook -> closure -> self -> parameter), a cycle
    through C++ that Python's collector cannot break: `close()` removes them.
    """

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        make_optimizer: MakeOptimizer,
        lr_scheduler_factory: MakeScheduler,
        step_fn: StepFn | None = None,
        track_grad_norm: bool = False,
        *,
        schedule_reads_state: bool = False,
    ) -> None:
        if not named_params:
            raise ConfigError("fused backward: no trainable parameters were given")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self.scheduler = lr_scheduler_factory(self.optimizers[0]) if lr_scheduler_factory else None
        self._schedule_reads_state = schedule_reads_state and self.scheduler is not None
        self._copy_schedule()  # the schedule's LR at step 0 (and initial_lr) into every group
        self._step_fn = step_fn or (lambda opt: opt.step())
        self._track_grad_norm = track_grad_norm
        self._grad_sq: torch.Tensor | None = None  # sum of squared gradients since take_grad_norm
        self._advance_queued_in: int | None = None  # the backward (graph task) that will advance the schedule
        self._handles = []
        for index, p in enumerate(self.params):
            if not p.requires_grad:
                raise ConfigError(f"fused backward: parameter '{self.names[index]}' does not require grad")
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    @property
    def schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler | None]:
        """The schedule of each parameter: the one `scheduler`, shared."""
        return [self.scheduler] * len(self.params)

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        optimizer = self.optimizers[index]
        steps_schedule = self._schedule_reads_state and index == 0

        def step_and_free(param: torch.Tensor) -> None:
            if self._track_grad_norm:  # stays on the device: no sync
                # fp32 accumulation inside the norm kernel: no fp32 copy of a bf16 gradient
                # a post-accumulate-grad hook runs right after autograd wrote `param.grad`
                assert param.grad is not None, "post-accumulate-grad hook without a gradient"
                sq = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32).square()
                self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            if self.scheduler is not None and not self._schedule_reads_state:
                self._advance_at_end_of_backward()
            self._step_fn(optimizer)
            if steps_schedule:
                self._step_scheduler()  # reads the update just made; before zero_grad, as it checks .grad
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    def _advance_at_end_of_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._advance_queued_in:  # once per backward
            self._advance_queued_in = task
            torch.autograd.Variable._execution_engine.queue_callback(self.advance_schedulers)

    def _step_scheduler(self) -> None:
        # Called only with a schedule: advance_schedulers checks, `_schedule_reads_state` implies one.
        assert self.scheduler is not None, "no LR schedule to step"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()

    def _copy_schedule(self) -> None:
        """The scheduled values of the first parameter's group into every other's."""
        if self.scheduler is None:
            return
        source = self.optimizers[0].param_groups[0]
        values = [(key, source[key]) for key in _SCHEDULED_KEYS if key in source]
        for optimizer in self.optimizers[1:]:
            group = optimizer.param_groups[0]
            for key, value in values:
                group[key] = value.clone() if torch.is_tensor(value) else value

    def take_grad_norm(self) -> torch.Tensor | None:
        """Total gradient norm over the hooks since the last call (0-dim, on the device), or None."""
        sq, self._grad_sq = self._grad_sq, None
        return None if sq is None else sq.sqrt()

    def advance_schedulers(self) -> None:
        """Advance the LR schedule one step: at the end of each backward, and without an update
        for a skipped step (LR = f(step))."""
        if self.scheduler is None:
            return
        self._step_scheduler()
        if not self._schedule_reads_state:
            self._copy_schedule()

    def close(self) -> None:
        """Remove the post-accumulate-grad hooks: backward no longer steps these parameters (their
        gradients accumulate as usual), and nothing but this object's holders keeps it, its
        optimizers and their states alive. Idempotent; state_dict() still works."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    @property
    def closed(self) -> bool:
        return not self._handles

    def learning_rates(self) -> dict[str, float]:
        return {n: float(o.param_groups[0]["lr"]) for n, o in zip(self.names, self.optimizers, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Every parameter's optimizer state and schedule (the one schedule, under each parameter:
        the format of the per-parameter schedulers this replaced, whose states were all equal)."""
        schedule = self.scheduler.state_dict() if self.scheduler is not None else None
        return {
            "format": STATE_FORMAT,
            "params": {
                name: {"optimizer": opt.state_dict(), "lr_scheduler": schedule}
                for name, opt in zip(self.names, self.optimizers, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any], rules: ResumeRules | None = None) -> None:
        """Restore every parameter's optimizer and the schedule (the first parameter's saved one:
        all agree). With `rules` (a training resume), the optimizers keep this run's changeable
        options and the schedule this run's LR base and shape (state_io.load_with_new_settings);
        without, everything is the saved state's."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"fused backward state: unsupported format {state.get('format')!r}")
        saved = state["params"]
        if list(saved) != self.names:
            raise CheckpointError(
                f"fused backward state: {len(saved)} saved parameters vs {len(self.names)} now; the trained "
                "parameters changed (text_encoder_freezing, clip_skip or disable_*_training)."
            )
        for index, (name, opt) in enumerate(zip(self.names, self.optimizers, strict=True)):
            # the schedule with the first parameter's optimizer: it writes that one's group
            sched = self.scheduler if index == 0 else None
            saved_sched = saved[name]["lr_scheduler"] if sched is not None else None
            if rules is not None:
                load_with_new_settings(opt, sched, saved[name]["optimizer"], saved_sched, rules)
                continue
            load_optimizer_state(opt, saved[name]["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved[name]["lr_scheduler"])
        if not self._schedule_reads_state:
            self._copy_schedule()


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
    schedule_reads_state: bool = False,
) -> FusedBackward:
    """One optimizer per parameter (`make_optimizer([p])`), stepped in the parameter's
    post-accumulate-grad hook, then `.grad` set to None; one LR schedule for all
    (`lr_scheduler_factory(first optimizer)`, or None), advanced once per backward
    (`FusedBackward`). `params` may be parameters or (name, parameter) pairs (names are used in
    state_dict). `step_fn(opt)` replaces `opt.step()` (e.g. bf16 stochastic rounding). Raises
    ConfigError when the settings rule it out (see module docstring)."""
    check_fused_backward(
        uses_grad_scaler=uses_grad_scaler,
        world_size=world_size,
        optimizer_names=[optimizer_name] if optimizer_name else (),
    )
    items = list(params)
    named = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
    return FusedBackward(
        named,
        make_optimizer,
        lr_scheduler_factory,
        step_fn,
        track_grad_norm,
        schedule_reads_state=schedule_reads_state,
    )


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
            schedule_reads_state=mirrors_optimizer_lr(r.lr_scheduler),
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
        self.stopped_layouts = {}  # never filled: see stop_component
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
        self.closed = False

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        """Backward (which steps every parameter) only for a finite loss; a GradScaler is refused
        at construction, so `scaler` is None."""
        if self.closed:
            raise RuntimeError("fused back pass: backward after close(); nothing would step the parameters")
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

    def stop_component(self, name: str) -> None:
        raise NotImplementedError(
            "a fused back pass cannot stop a component: its per-parameter optimizers live inside "
            "backward (TrainConfig refuses stop_text_encoder_training with fused_back_pass)"
        )

    def close(self) -> None:
        """Remove every per-parameter hook (`FusedBackward.close`), so that the parameters no
        longer hold this set's optimizers and states; idempotent. The state stays readable
        (state_dict); backward() is refused afterwards."""
        for fused in self.fused.values():
            fused.close()
        self.closed = True

    def representative(self, name: str):
        fused = self.fused[name]
        return fused.optimizers[0], fused.scheduler

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
