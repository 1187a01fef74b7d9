"""One optimizer + LR scheduler per trained component (UNet, text encoder), stepped together.

Separate optimizers (not one optimizer with two param groups) so that adaptive optimizers
(D-Adaptation, Prodigy) estimate d from one component's gradients and never see mixed LRs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from trainer.errors import CheckpointError, ConfigError
from trainer.optim.freezing import (
    apply_text_encoder_freeze,
    plan_text_encoder_freeze,
    text_encoder_num_layers,
)
from trainer.optim.registry import OptimizerSpec, build_optimizer, get_spec
from trainer.optim.resolve import (
    TEXT_ENCODER,
    UNET,
    ResolvedComponent,
    TrainOptimSettings,
    resolve_components,
)
from trainer.optim.schedule_free import restore, set_train_mode_flag, snapshot
from trainer.optim.schedules import build_lr_scheduler
from trainer.optim.schema import OptimizerFile
from trainer.optim.table import render_summary
from trainer.stochastic_rounding import fp32_state

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass
class StepResult:
    skipped: bool  # True if a non-finite gradient made us skip the update
    grad_norms: dict[str, torch.Tensor]  # pre-clip total grad norm per component (0-dim, on device)


@dataclass
class ComponentOptimizer:
    """A component's optimizer, scheduler and trainable parameters (in optimizer order)."""

    name: str
    resolved: ResolvedComponent
    spec: OptimizerSpec
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    param_names: list[str]
    params: list[nn.Parameter]
    trainable_count: int
    frozen_count: int
    freeze_description: str = ""

    def effective_lr(self) -> float:
        return effective_lr(self.resolved, self.spec, self.optimizer, self.lr_scheduler)


def effective_lr(resolved: ResolvedComponent, spec: OptimizerSpec, optimizer, lr_scheduler) -> float:
    """The step size actually applied: d*lr for D-Adaptation/Prodigy, Adafactor's own LR."""
    group = optimizer.param_groups[0]
    if resolved.lr_scheduler == "adafactor":
        return float(lr_scheduler.get_last_lr()[0])
    if spec.adaptive:
        return float(group["d"]) * float(group["lr"])
    return float(group["lr"])


def build_optimizers(
    opt_file: OptimizerFile,
    settings: TrainOptimSettings,
    *,
    unet: nn.Module,
    text_encoder: nn.Module,
    total_optimizer_steps: int,
) -> OptimizerSet:
    """Freeze what must not train (requires_grad=False), then build one optimizer + scheduler
    per trained component. Raises ConfigError if both components are disabled."""
    if settings.disable_unet_training and settings.disable_textenc_training:
        raise ConfigError(
            "disable_unet_training and disable_textenc_training are both true: nothing would train. "
            "Set at least one of them to false."
        )
    resolved = resolve_components(opt_file, settings, total_optimizer_steps)
    components: dict[str, ComponentOptimizer] = {}

    unet.requires_grad_(not settings.disable_unet_training)
    if not settings.disable_unet_training:
        components[UNET] = _build_component(resolved[UNET], unet, "")

    if settings.disable_textenc_training:
        text_encoder.requires_grad_(False)
    else:
        num_layers = text_encoder_num_layers(text_encoder)
        plan = plan_text_encoder_freeze(opt_file.text_encoder_freezing, num_layers, settings.clip_skip)
        apply_text_encoder_freeze(text_encoder, plan)
        if plan.unused_layers:
            logger.info(
                "clip_skip %d: text-encoder layers %s never affect the loss; frozen",
                settings.clip_skip,
                list(plan.unused_layers),
            )
        components[TEXT_ENCODER] = _build_component(resolved[TEXT_ENCODER], text_encoder, plan.describe())
    opt_set = OptimizerSet(
        components, clip_grad_norm=settings.clip_grad_norm, log_grad_norm=opt_file.log_grad_norm
    )
    return opt_set


def build_component_scheduler(
    resolved: ResolvedComponent, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """The component's resolved LR schedule on `optimizer` (also used per parameter by the fused back pass)."""
    return build_lr_scheduler(
        resolved.lr_scheduler,
        optimizer,
        warmup_steps=resolved.lr_warmup_steps,
        decay_steps=resolved.lr_decay_steps,
        num_cycles=resolved.num_cycles,
        power=resolved.power,
    )


def _build_component(
    resolved: ResolvedComponent, module: nn.Module, freeze_description: str
) -> ComponentOptimizer:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(
            f"{resolved.component}: every parameter is frozen, so there is nothing to optimize. Unfreeze "
            f"something in text_encoder_freezing or set disable_textenc_training / disable_unet_training."
        )
    spec = get_spec(resolved.optimizer)
    params = [p for _, p in named]
    optimizer = build_optimizer(spec, params, resolved.lr, resolved.options)
    if spec.schedule_free:
        optimizer.train()  # schedulefree's optimizers start in eval mode and refuse to step in it
    try:
        scheduler = build_component_scheduler(resolved, optimizer)
    except ConfigError as exc:
        raise ConfigError(f"{resolved.component}: {exc}") from exc
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in module.parameters())
    return ComponentOptimizer(
        name=resolved.component,
        resolved=resolved,
        spec=spec,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        param_names=[n for n, _ in named],
        params=params,
        trainable_count=trainable,
        frozen_count=total - trainable,
        freeze_description=freeze_description,
    )


class OptimizerSet:
    """The trained components' optimizers, stepped as one unit by the training loop."""

    def __init__(
        self,
        components: dict[str, ComponentOptimizer],
        *,
        clip_grad_norm: float | None,
        log_grad_norm: bool = True,
    ):
        self.components = components
        self.clip_grad_norm = clip_grad_norm
        self.log_grad_norm = log_grad_norm
        # bf16 weights (weight_dtype bf16): a StochasticRounding whose step() replaces optimizer.step().
        self.rounding = None
        # Schedule-free train-mode weights while `schedule_free.eval_weights` is active.
        self.train_weights: dict[str, list[torch.Tensor]] | None = None
        # Components whose training stopped mid-run (trainer/te_stop.py): name -> resume-guard layout.
        self.stopped_layouts: dict[str, str] = {}

    steps_in_backward = False  # FusedOptimizerSet updates inside backward instead

    def should_backward(self, loss: torch.Tensor) -> bool:
        """Always true: this set checks finiteness once per step, on the gradient norms (no sync here)."""
        return True

    def step(self, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """One optimizer step for every component, after the loop's micro-batch backwards.

        Order: scaler.unscale_ -> pre-clip grad norms -> one host sync on their finiteness ->
        clip (if clip_grad_norm) -> optimizer.step() -> scaler.update() -> LR schedulers ->
        zero_grad(set_to_none=True).

        A non-finite norm in any component skips the update of every component (with a scaler
        this is exactly what scaler.step() would do; we step the optimizers ourselves after our
        one sync instead of letting scaler.step() sync again per optimizer). This method calls
        scaler.update(): the loop must not. The LR schedules advance on skipped steps too, so the
        LR stays a function of the optimizer-step index (as with GradScaler skips in ED2).
        """
        comps = list(self.components.values())
        use_scaler = scaler is not None and scaler.is_enabled()
        if use_scaler:
            for comp in comps:
                scaler.unscale_(comp.optimizer)
        norms = {c.name: get_total_norm([p.grad for p in c.params if p.grad is not None]) for c in comps}
        device = comps[0].params[0].device
        finite = bool(
            torch.isfinite(torch.stack([n.to(device) for n in norms.values()])).all()
        )  # the one sync
        if finite:
            for comp in comps:
                if self.clip_grad_norm is not None:
                    clip_grads_with_norm_(comp.params, self.clip_grad_norm, norms[comp.name])
                if self.rounding is not None:
                    self.rounding.step(comp.optimizer)
                else:
                    comp.optimizer.step()
        else:
            logger.warning(
                "non-finite gradient norm %s: optimizer step skipped", {k: float(v) for k, v in norms.items()}
            )
        if use_scaler:
            scaler.update()
        for comp in comps:
            # AdafactorSchedule only mirrors the optimizer's own LR (and needs its state): nothing to advance.
            if finite or comp.resolved.lr_scheduler != "adafactor":
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
                    comp.lr_scheduler.step()
            comp.optimizer.zero_grad(set_to_none=True)
        return StepResult(skipped=not finite, grad_norms=norms)

    def learning_rates(self) -> dict[str, float]:
        """Effective LR per component (d*lr for D-Adaptation/Prodigy). Syncs; call at log time."""
        return {name: comp.effective_lr() for name, comp in self.components.items()}

    def nominal_learning_rates(self) -> dict[str, float]:
        """The scheduled `lr` of each component's param group (the multiplier for adaptive ones)."""
        return {
            name: float(comp.optimizer.param_groups[0]["lr"] or 0.0) for name, comp in self.components.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "stochastic_rounding": self.rounding.state_dict() if self.rounding is not None else None,
            "components": {
                name: {
                    "optimizer_name": comp.spec.name,
                    "param_names": list(comp.param_names),
                    "optimizer": self._optimizer_state(comp),
                    "lr_scheduler": comp.lr_scheduler.state_dict(),
                    **self._train_weights_entry(comp),
                }
                for name, comp in self.components.items()
            },
        }

    def _optimizer_state(self, comp: ComponentOptimizer) -> dict[str, Any]:
        state = comp.optimizer.state_dict()
        if comp.spec.schedule_free and self.train_weights is not None:
            return set_train_mode_flag(state)  # saved as in train mode, with the train weights below
        return state

    def _train_weights_entry(self, comp: ComponentOptimizer) -> dict[str, Any]:
        """Schedule-free: the exact train-mode weights (the checkpoint's pipeline has eval ones)."""
        if not comp.spec.schedule_free:
            return {}
        if self.train_weights is not None:
            return {"schedule_free_train_weights": self.train_weights[comp.name]}
        return {"schedule_free_train_weights": snapshot(comp.params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact restore. Changed components, optimizer or trained parameters is a CheckpointError."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"optimizer state: unsupported format {state.get('format')!r} (expected {STATE_FORMAT})"
            )
        if "components" not in state:
            raise CheckpointError(
                "optimizer state: the checkpoint was trained with fused_back_pass: true (per-parameter "
                "optimizers); resume it with fused_back_pass: true."
            )
        saved = state["components"]
        if set(saved) != set(self.components):
            raise CheckpointError(
                f"optimizer state: the checkpoint trains {sorted(saved)}, this run trains {sorted(self.components)}. "
                "Use the same disable_unet_training / disable_textenc_training as the checkpoint."
            )
        for name, comp in self.components.items():
            entry = saved[name]
            if entry["optimizer_name"] != comp.spec.name:
                raise CheckpointError(
                    f"optimizer state: {name} was trained with '{entry['optimizer_name']}', this run uses "
                    f"'{comp.spec.name}'. Resume with the same optimizer."
                )
            if entry["param_names"] != comp.param_names:
                missing = sorted(set(entry["param_names"]) - set(comp.param_names))[:5]
                extra = sorted(set(comp.param_names) - set(entry["param_names"]))[:5]
                raise CheckpointError(
                    f"optimizer state: {name} trainable parameters differ from the checkpoint "
                    f"({len(entry['param_names'])} saved, {len(comp.param_names)} now; e.g. only in checkpoint "
                    f"{missing}, only now {extra}). Did text_encoder_freezing or clip_skip change?"
                )
        for name, comp in self.components.items():
            with fp32_state([comp.optimizer]):  # fp32 moments stay fp32 next to bf16 weights
                comp.optimizer.load_state_dict(saved[name]["optimizer"])
            comp.lr_scheduler.load_state_dict(saved[name]["lr_scheduler"])
            if comp.spec.schedule_free:  # the weights loaded from the pipeline are eval-mode ones
                if "schedule_free_train_weights" not in saved[name]:
                    raise CheckpointError(
                        f"optimizer state: {name} uses schedule-free '{comp.spec.name}' but the checkpoint has "
                        "no train-mode weights for it, so it cannot resume exactly. Start a new run from its "
                        "pipeline weights instead."
                    )
                restore(comp.params, saved[name]["schedule_free_train_weights"])
        load_rounding_state(self.rounding, state.get("stochastic_rounding"))

    def trainable_parameter_count(self) -> dict[str, tuple[int, int]]:
        return {name: (c.trainable_count, c.frozen_count) for name, c in self.components.items()}

    def resolved_config(self) -> dict[str, dict[str, Any]]:
        """The fully resolved per-component settings (for the run folder and the table)."""
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
