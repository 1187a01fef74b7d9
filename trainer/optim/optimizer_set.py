"""One optimizer + LR scheduler per trained component (UNet, text encoder), stepped together.

Separate optimizers (not one optimizer with two param groups) so that adaptive optimizers
(D-Adaptation, Prodigy) estimate d from one component's gradients and never see mixed LRs.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from trainer.optim.component import ComponentOptimizer, StepResult
from trainer.optim.freezing import (
    apply_text_encoder_freeze,
    plan_text_encoder_freeze,
    text_encoder_num_layers,
)
from trainer.optim.protocol import TrainingOptimizer
from trainer.optim.registry import build_optimizer, get_spec
from trainer.optim.resolve import (
    TEXT_ENCODER,
    UNET,
    ResolvedComponent,
    TrainOptimSettings,
    resolve_components,
)
from trainer.optim.schedule_free import TrainEvalSwitch, restore, set_train_mode_flag, snapshot
from trainer.optim.schedules import build_lr_scheduler
from trainer.optim.schema import OptimizerFile
from trainer.optim.state_io import load_with_new_settings
from trainer.optim.stochastic_rounding import StochasticRounding
from trainer.runtime.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def build_optimizers(
    opt_file: OptimizerFile,
    settings: TrainOptimSettings,
    *,
    unet: nn.Module,
    text_encoder: nn.Module,
    total_optimizer_steps: int,
    rounding: StochasticRounding | None = None,
) -> OptimizerSet:
    """Freeze what must not train (requires_grad=False), then build one optimizer + scheduler
    per trained component. `rounding` (bf16 weights) replaces each `optimizer.step()`."""
    assert not (settings.disable_unet_training and settings.disable_textenc_training), (
        "nothing would train (train.json validation refuses both disable_*_training)"
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
    return OptimizerSet(
        components,
        clip_grad_norm=settings.clip_grad_norm,
        log_grad_norm=opt_file.log_grad_norm,
        rounding=rounding,
    )


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
        if not isinstance(optimizer, TrainEvalSwitch):
            raise ConfigError(f"optimizer '{spec.name}' is listed as schedule-free but has no train()/eval()")
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


class OptimizerSet(TrainingOptimizer):
    """The trained components' optimizers, stepped as one unit by the training loop."""

    state_key = "components"
    fused_back_pass = False

    def __init__(
        self,
        components: dict[str, ComponentOptimizer],
        *,
        clip_grad_norm: float | None,
        log_grad_norm: bool = True,
        rounding: StochasticRounding | None = None,
    ):
        self.components = components
        self.clip_grad_norm = clip_grad_norm
        self.log_grad_norm = log_grad_norm
        # bf16 weights (weight_dtype bf16): a StochasticRounding whose step() replaces optimizer.step().
        self.rounding = rounding
        # Schedule-free train-mode weights while `schedule_free.eval_weights` is active.
        self.train_weights: dict[str, list[torch.Tensor]] | None = None
        self.stopped_layouts: dict[str, str] = {}  # stop_component (trainer/run/te_stop.py)

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
        active_scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if active_scaler is not None:
            for comp in comps:
                active_scaler.unscale_(comp.optimizer)
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
        if active_scaler is not None:
            active_scaler.update()
        for comp in comps:
            if comp.schedule_advances(updated=finite):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
                    comp.lr_scheduler.step()
            comp.optimizer.zero_grad(set_to_none=True)
        return StepResult(skipped=not finite, grad_norms=norms)

    def representative(self, name: str):
        comp = self.components[name]
        return comp.optimizer, comp.lr_scheduler

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [comp.optimizer for comp in self.components.values()]

    def _entries_state(self) -> dict[str, Any]:
        return {
            name: {
                "optimizer_name": comp.spec.name,
                "param_names": list(comp.param_names),
                "optimizer": self._optimizer_state(comp),
                "lr_scheduler": comp.lr_scheduler.state_dict(),
                **self._train_weights_entry(comp),
            }
            for name, comp in self.components.items()
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

    def _saved_pair(self, entry: dict[str, Any]) -> tuple[dict, dict | None]:
        return entry["optimizer"], entry["lr_scheduler"]

    def _load_entries(self, saved: dict[str, Any]) -> None:
        """Changed optimizer, trained parameters or fixed option is a CheckpointError; the LR,
        schedule and changeable options are this run's (state_io.load_with_new_settings)."""
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
            load_with_new_settings(
                comp.optimizer, comp.lr_scheduler, *self._saved_pair(saved[name]), self.resume_rules(name)
            )
            if comp.spec.schedule_free:  # the weights loaded from the pipeline are eval-mode ones
                if "schedule_free_train_weights" not in saved[name]:
                    raise CheckpointError(
                        f"optimizer state: {name} uses schedule-free '{comp.spec.name}' but the checkpoint has "
                        "no train-mode weights for it, so it cannot resume exactly. Start a new run from its "
                        "pipeline weights instead."
                    )
                restore(comp.params, saved[name]["schedule_free_train_weights"])
