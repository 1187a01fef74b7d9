"""Precedence: which LR, schedule and options each component really gets (pure functions).

Rules (documented in docs/OPTIMIZERS.md, shown at start-up):

* UNet LR: train.json/CLI `lr` if set, else `base.lr`, else the optimizer's default (warning).
* Text-encoder LR: an explicit `text_encoder_overrides.lr` is used as is; neither the train
  `lr` nor `text_encoder_lr_scale` changes it (the scale is ignored with a warning). Otherwise
  the LR is copied from the UNet's source (train `lr`, else `base.lr`) and multiplied by
  `text_encoder_lr_scale` (default 1.0).
* Schedule keys (`lr_scheduler`, `lr_warmup_steps`, `lr_decay_steps`): the section value, else
  (for the TE) the base value, else the train.json/CLI value, else the default: ED2 keeps the
  optimizer.json value first for these, and train.json ships `lr_scheduler: constant`.
* Optimizer options: the TE copies base's options it accepts (all of them when the optimizer is
  the same); explicit TE values win.
* `0` is a value everywhere (ED2's `x or default` treated it as unset).
* Adafactor in adaptive mode (relative_step, the default) computes its own LR: any LR is
  ignored (warning) and the `adafactor` schedule is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trainer.config import TrainConfig
from trainer.optim.registry import get_spec, is_adafactor_adaptive, normalize_name
from trainer.optim.schedules import SCHEDULER_NAMES, resolve_decay_steps, resolve_warmup_steps
from trainer.optim.schema import DEFAULT_OPTIMIZER, OptimizerFile, check_section_keys
from trainer.optim.spec import SCHEDULE_KEYS
from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

UNET = "unet"
TEXT_ENCODER = "text_encoder"


@dataclass(frozen=True)
class TrainOptimSettings:
    """The train.json / CLI side of precedence (see module docstring)."""

    lr: float | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    lr_decay_steps: int | None = None
    clip_grad_norm: float | None = None
    disable_unet_training: bool = False
    disable_textenc_training: bool = False
    clip_skip: int = 0
    log_step: int = 25

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TrainOptimSettings:
        """The train.json side of the precedence, projected from the config (one copy: the
        builder and the memory plan both use it)."""
        return cls(
            lr=cfg.lr,
            lr_scheduler=cfg.lr_scheduler,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            clip_grad_norm=cfg.clip_grad_norm,
            disable_unet_training=cfg.disable_unet_training,
            disable_textenc_training=cfg.disable_textenc_training,
            clip_skip=cfg.clip_skip,
            log_step=cfg.log_step,
        )


@dataclass(frozen=True)
class ResolvedComponent:
    """Everything needed to build one component's optimizer and scheduler, with provenance."""

    component: str
    optimizer: str
    lr: float | None  # None only for Adafactor in adaptive mode
    lr_source: str
    lr_scheduler: str
    lr_warmup_steps: int
    lr_decay_steps: int
    num_cycles: int
    power: float
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "lr_source": self.lr_source,
            "lr_scheduler": self.lr_scheduler,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_scheduler_num_cycles": self.num_cycles,
            "lr_scheduler_power": self.power,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
        }


def _first(*values):
    return next((v for v in values if v is not None), None)


def check_text_encoder_lr_scale(
    opt_file: OptimizerFile, train_lr: float | None, *, text_encoder_trains: bool
) -> None:
    """Refuse a `text_encoder_lr_scale` that would do nothing because no LR is set anywhere.

    The scale multiplies the LR the text encoder copies from the UNet; with no train `lr`, no
    `base.lr` and no `text_encoder_overrides.lr`, both components fall back to the optimizer's
    default and the scale would be dropped silently. 1.0 (or null) changes nothing either way.
    Pure, so the session can call it before the model loads.
    """
    scale = opt_file.text_encoder_lr_scale
    if scale is None or scale == 1.0 or not text_encoder_trains:
        return
    te = opt_file.text_encoder_overrides.set_values() if opt_file.text_encoder_overrides else {}
    if train_lr is None and "lr" not in opt_file.base.set_values() and "lr" not in te:
        raise ConfigError(
            f"{opt_file.source}: text_encoder_lr_scale={scale} has nothing to scale: no LR is set (train.json/CLI "
            "lr, optimizer.json base.lr), so the text encoder would get its optimizer's default LR unscaled. "
            "Set lr or base.lr, or remove text_encoder_lr_scale."
        )


def resolve_components(
    opt_file: OptimizerFile, settings: TrainOptimSettings, total_optimizer_steps: int
) -> dict[str, ResolvedComponent]:
    """Resolve both components (whether or not they are trained; the caller picks)."""
    if total_optimizer_steps < 1:
        raise ConfigError(f"total_optimizer_steps must be >= 1, got {total_optimizer_steps}")
    label = opt_file.source
    base = opt_file.base.set_values()
    base_opt = normalize_name(base.get("optimizer", DEFAULT_OPTIMIZER))
    base = check_section_keys(base, base_opt, f"{label}: base")
    te_explicit = opt_file.text_encoder_overrides.set_values() if opt_file.text_encoder_overrides else {}
    te_opt = normalize_name(te_explicit.get("optimizer", base_opt))
    te_explicit = check_section_keys(te_explicit, te_opt, f"{label}: text_encoder_overrides")

    # UNet LR
    if settings.lr is not None:
        unet_lr, unet_src = settings.lr, "train lr (train.json/CLI)"
    elif "lr" in base:
        unet_lr, unet_src = base["lr"], "optimizer.json base.lr"
    else:
        unet_lr, unet_src = None, "default"

    # TE LR
    check_text_encoder_lr_scale(
        opt_file, settings.lr, text_encoder_trains=not settings.disable_textenc_training
    )
    scale = opt_file.text_encoder_lr_scale
    if "lr" in te_explicit:
        te_lr, te_src = te_explicit["lr"], "optimizer.json text_encoder_overrides.lr"
        if scale is not None:
            logger.warning(
                "%s: text_encoder_lr_scale=%s is ignored because text_encoder_overrides.lr=%s is set explicitly",
                label,
                scale,
                te_lr,
            )
        if settings.lr is not None and settings.lr != te_lr:
            logger.warning(
                "train lr %s (train.json/CLI) applies to the UNet only; the text encoder keeps its explicit "
                "%s: text_encoder_overrides.lr %s (EveryDream2 applied the train lr to both). Set "
                "text_encoder_overrides.lr to null to copy the train lr.",
                settings.lr,
                label,
                te_lr,
            )
    elif unet_lr is not None:
        te_lr = unet_lr * (1.0 if scale is None else scale)
        te_src = f"copied from {unet_src}" + (
            f" x text_encoder_lr_scale {scale}" if scale is not None else ""
        )
    else:
        te_lr, te_src = None, "default"

    # TE inherits base options it accepts; explicit TE values win.
    te_spec = get_spec(te_opt)
    inherited = {k: v for k, v in base.items() if k in te_spec.accepted_keys and k != "optimizer"}
    dropped = sorted(set(base) - set(inherited) - {"optimizer"} - set(te_explicit))
    if dropped:
        logger.info(
            "text encoder (%s) does not inherit base keys it does not take: %s", te_opt, ", ".join(dropped)
        )
    te_section = {**inherited, **te_explicit}

    return {
        UNET: _resolve_one(UNET, base_opt, base, unet_lr, unet_src, settings, total_optimizer_steps, label),
        TEXT_ENCODER: _resolve_one(
            TEXT_ENCODER, te_opt, te_section, te_lr, te_src, settings, total_optimizer_steps, label
        ),
    }


def _resolve_one(
    component: str,
    optimizer: str,
    section: dict[str, Any],
    lr: float | None,
    lr_source: str,
    settings: TrainOptimSettings,
    total_steps: int,
    label: str,
) -> ResolvedComponent:
    spec = get_spec(optimizer)
    options = {**spec.defaults, **{k: v for k, v in section.items() if k not in SCHEDULE_KEYS}}
    if spec.uses_log_every:
        options.setdefault("log_every", settings.log_step)
    where = f"{label}: {component}"

    scheduler = _scheduler_name(where, label, section, settings)
    if spec.schedule_free and options.get("use_schedulefree", True):
        _check_schedule_free_schedule(where, spec.name, section, settings, scheduler)
    if is_adafactor_adaptive(spec, options):
        if section.get("lr_scheduler") not in (None, "adafactor"):
            raise ConfigError(
                f"{where}: adafactor with relative_step=true computes its own LR and needs lr_scheduler "
                f"'adafactor' (or null), got '{section['lr_scheduler']}'. For a normal schedule set "
                f"relative_step=false and scale_parameter=false (constant mode) and an lr."
            )
        if scheduler != "adafactor":
            logger.warning(
                "%s: adafactor (adaptive) ignores lr_scheduler '%s'; using 'adafactor'", where, scheduler
            )
        if lr is not None:
            logger.warning(
                "%s: adafactor (adaptive, relative_step=true) ignores lr %s (%s)", where, lr, lr_source
            )
        scheduler, lr, lr_source = "adafactor", None, "adafactor relative_step (adaptive)"
    else:
        if scheduler == "adafactor":
            raise ConfigError(
                f"{where}: lr_scheduler 'adafactor' only works with optimizer 'adafactor' and "
                f"relative_step=true; got optimizer '{optimizer}'."
            )
        if lr is None:
            lr, lr_source = spec.default_lr, f"default for {optimizer}"
            logger.warning("%s: no lr set anywhere; using %s's default %s", where, optimizer, lr)

    decay = resolve_decay_steps(_first(section.get("lr_decay_steps"), settings.lr_decay_steps), total_steps)
    warmup = resolve_warmup_steps(_first(section.get("lr_warmup_steps"), settings.lr_warmup_steps), decay)
    if scheduler == "cosine" and decay < total_steps:
        logger.warning(
            "%s: cosine decays to 0 at lr_decay_steps=%d but the run has %d optimizer steps; after that the "
            "LR rises again (diffusers' cosine). Use a longer lr_decay_steps, or linear/cosine_with_restarts.",
            where,
            decay,
            total_steps,
        )
    return ResolvedComponent(
        component=component,
        optimizer=optimizer,
        lr=lr,
        lr_source=lr_source,
        lr_scheduler=scheduler,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        num_cycles=_first(section.get("lr_scheduler_num_cycles"), 1),
        power=_first(section.get("lr_scheduler_power"), 1.0),
        options=options,
    )


def _scheduler_name(where: str, label: str, section: dict[str, Any], settings: TrainOptimSettings) -> str:
    """optimizer.json's lr_scheduler over train.json's (as EveryDream2), said when they differ."""
    scheduler = _first(section.get("lr_scheduler"), settings.lr_scheduler, "constant")
    if settings.lr_scheduler is not None and scheduler != settings.lr_scheduler:
        logger.warning(
            "%s: train lr_scheduler '%s' (train.json/CLI) is overridden by optimizer.json's '%s': for the "
            "schedule keys optimizer.json wins, as in EveryDream2. Set lr_scheduler to null in %s to use '%s'.",
            where,
            settings.lr_scheduler,
            scheduler,
            label,
            settings.lr_scheduler,
        )
    if scheduler not in SCHEDULER_NAMES:
        raise ConfigError(
            f"train lr_scheduler: unknown scheduler '{scheduler}'. Known: {', '.join(SCHEDULER_NAMES)}."
        )
    return scheduler


def _check_schedule_free_schedule(
    where: str, optimizer: str, section: dict[str, Any], settings: TrainOptimSettings, scheduler: str
) -> None:
    """Schedule-free optimizers replace the LR schedule by iterate averaging: an outside schedule
    would change the algorithm (its averaging weights follow the LR), so only `constant` is
    allowed; warmup is the optimizer's own `warmup_steps` option."""
    if scheduler != "constant":
        source = "optimizer.json" if section.get("lr_scheduler") is not None else "train.json/CLI"
        raise ConfigError(
            f"{where}: optimizer '{optimizer}' is schedule-free and needs lr_scheduler 'constant', got "
            f"'{scheduler}' (from {source}). Set lr_scheduler to 'constant'; for a warmup use the "
            f"optimizer's own warmup_steps option (schedulefree AdamW/SGD; RAdam and Prodigy need none)."
        )
    warmup = _first(section.get("lr_warmup_steps"), settings.lr_warmup_steps)
    if warmup:
        logger.warning(
            "%s: lr_warmup_steps=%s does nothing with the constant schedule of schedule-free '%s'; use its "
            "own warmup_steps option instead",
            where,
            warmup,
            optimizer,
        )
