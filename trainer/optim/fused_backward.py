"""Optimizer step fused into the backward pass: each parameter is updated as soon as its gradient
is complete, and the gradient is freed right after.

Why: a normal step keeps every parameter's gradient alive until `optimizer.step()`, so peak
memory holds weights + optimizer state + **all** gradients (SD1.5 UNet fp32: 3.4 GB of
gradients). Stepping one parameter inside its `register_post_accumulate_grad_hook` keeps at most
the gradients still being produced, saving most of that (see docs/PERFORMANCE.md). The
technique is PyTorch's "optimizer step in backward" recipe: one optimizer (and LR scheduler) per
parameter.

Constraints (checked by `check_fused_backward`, ConfigError otherwise):

* `grad_accum == 1`: the step happens during the backward of every micro-batch, so gradients
  cannot accumulate over several.
* no `clip_grad_norm`: clipping needs the total norm over all gradients before any step.
* no fp16 GradScaler: unscaling and the inf/NaN skip need all gradients first (use bf16).
* one process: under DDP the hook would fire on the local gradient before the all-reduce.
* per-parameter optimizers only: D-Adaptation and Prodigy estimate their step size from all
  parameters together, so a per-parameter instance is a different algorithm; they are refused.

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
from trainer.optim.registry import build_optimizer, get_spec
from trainer.optim.schedules import build_lr_scheduler

logger = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None
StepFn = Callable[[torch.optim.Optimizer], None]

STATE_FORMAT = 1


def check_fused_backward(
    *,
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    optimizer_names: Iterable[str] = (),
) -> None:
    """Raise ConfigError naming the setting that rules out a fused backward step."""
    problems = []
    if grad_accum != 1:
        problems.append(f"grad_accum={grad_accum} (needs 1: gradients are consumed during each backward)")
    if clip_grad_norm is not None:
        problems.append(f"clip_grad_norm={clip_grad_norm} (needs null: clipping needs all gradients first)")
    if uses_grad_scaler:
        problems.append("fp16 mixed precision with a GradScaler (use mixed_precision bf16 or no)")
    if world_size != 1:
        problems.append(f"{world_size} processes (the hook would step before the DDP all-reduce)")
    for name in optimizer_names:
        spec = get_spec(name)
        if spec.adaptive:
            problems.append(f"optimizer '{spec.name}' (adapts its step size over all parameters together)")
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
    ) -> None:
        if not named_params:
            raise ConfigError("fused backward: no trainable parameters were given")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.optimizers = [make_optimizer([p]) for p in self.params]
        self.schedulers = [lr_scheduler_factory(o) if lr_scheduler_factory else None for o in self.optimizers]
        self._step_fn = step_fn or (lambda opt: opt.step())
        self._handles = []
        for index, p in enumerate(self.params):
            if not p.requires_grad:
                raise ConfigError(f"fused backward: parameter '{self.names[index]}' does not require grad")
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        optimizer, scheduler = self.optimizers[index], self.schedulers[index]

        def step_and_free(param: torch.Tensor) -> None:
            self._step_fn(optimizer)
            if scheduler is not None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
                    scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    def remove(self) -> None:
        """Detach the hooks (the parameters then get ordinary `.grad` again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"fused backward state: unsupported format {state.get('format')!r}")
        saved = state["params"]
        if list(saved) != self.names:
            raise CheckpointError(
                f"fused backward state: {len(saved)} saved parameters vs {len(self.names)} now; the trained "
                "parameters changed (text_encoder_freezing, clip_skip or disable_*_training)."
            )
        for name, opt, sched in zip(self.names, self.optimizers, self.schedulers, strict=True):
            opt.load_state_dict(saved[name]["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved[name]["lr_scheduler"])


def attach_fused_backward(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    make_optimizer: MakeOptimizer,
    *,
    lr_scheduler_factory: MakeScheduler,
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    optimizer_name: str | None = None,
    step_fn: StepFn | None = None,
) -> FusedBackward:
    """One optimizer per parameter (`make_optimizer([p])`), stepped in the parameter's
    post-accumulate-grad hook, with its scheduler (`lr_scheduler_factory(opt)`, or None), then
    `.grad` set to None. `params` may be parameters or (name, parameter) pairs (names are used in
    state_dict). `step_fn(opt)` replaces `opt.step()` (e.g. bf16 stochastic rounding). Raises
    ConfigError when the settings rule it out (see module docstring)."""
    check_fused_backward(
        grad_accum=grad_accum,
        clip_grad_norm=clip_grad_norm,
        uses_grad_scaler=uses_grad_scaler,
        world_size=world_size,
        optimizer_names=[optimizer_name] if optimizer_name else (),
    )
    items = list(params)
    named = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
    return FusedBackward(named, make_optimizer, lr_scheduler_factory, step_fn)


def fused_backward_from_optimizer_set(
    optim,
    *,
    grad_accum: int = 1,
    uses_grad_scaler: bool = False,
    world_size: int = 1,
    step_fn: StepFn | None = None,
) -> dict[str, FusedBackward]:
    """Fused backward for each component of an `OptimizerSet`, with the same resolved optimizer,
    options, LR and schedule as its (then unused) component optimizer. Build the OptimizerSet
    first (it applies the freezing); never call its `step()` afterwards."""
    out = {}
    for name, comp in optim.components.items():
        r = comp.resolved
        spec = get_spec(r.optimizer)

        def make_optimizer(ps, spec=spec, r=r):
            return build_optimizer(spec, ps, r.lr, r.options)

        def make_scheduler(opt, r=r):
            return build_lr_scheduler(
                r.lr_scheduler,
                opt,
                warmup_steps=r.lr_warmup_steps,
                decay_steps=r.lr_decay_steps,
                num_cycles=r.num_cycles,
                power=r.power,
            )

        out[name] = attach_fused_backward(
            list(zip(comp.param_names, comp.params, strict=True)),
            make_optimizer,
            lr_scheduler_factory=make_scheduler,
            grad_accum=grad_accum,
            clip_grad_norm=optim.clip_grad_norm,
            uses_grad_scaler=uses_grad_scaler,
            world_size=world_size,
            optimizer_name=r.optimizer,
            step_fn=step_fn,
        )
    logger.info("fused backward: %s", {n: len(f.params) for n, f in out.items()})
    return out
