"""kohya -> this trainer: learning rates, optimizer, clipping (run length and schedule: map_schedule).

These keys depend on each other (a warmup fraction needs the run length, Adafactor's adaptive
mode decides the scheduler and whether an LR is written), so one function converts them together
and writes one row per source key. Rules (docs/MIGRATING.md):

* UNet LR = `unet_lr` if set, else `learning_rate`; text-encoder LR = `learning_rate_te` /
  `text_encoder_lr` if set, else `learning_rate`. Both are written explicitly into optimizer.json
  (`base.lr`, `text_encoder_overrides.lr`), so this trainer's precedence has nothing to decide.
  A text-encoder LR of 0 (or `train_text_encoder = false`) freezes the text encoder.
* Run length, warmup and decay: see map_schedule.
"""

from __future__ import annotations

import ast
import typing
from typing import Any

from trainer.importing.map_schedule import run_length, schedule
from trainer.importing.rows import CHECK, DEFAULT, NOT_SUPPORTED, OFF, Row
from trainer.optim.registry import REGISTRY, get_spec, normalize_name
from trainer.optim.schema import SectionConfig
from trainer.runtime.errors import ConfigError

# kohya optimizer_type (lowercased) -> ours, plus options kohya sets for that name.
KOHYA_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "adamw8bit": ("adamw8bit", {}),
    "pagedadamw": ("paged_adamw", {}),
    "pagedadamw32bit": ("paged_adamw", {}),
    "pagedadamw8bit": ("paged_adamw8bit", {}),
    "lion": ("lion", {}),
    "lion8bit": ("lion8bit", {}),
    "pagedlion8bit": ("paged_lion8bit", {}),
    "sgdnesterov": ("sgd", {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": ("sgd8bit", {"nesterov": True, "momentum": 0.9}),
    "dadaptadam": ("dadapt_adam", {}),
    "dadaptadagrad": ("dadapt_adagrad", {}),
    "dadaptadan": ("dadapt_adan", {}),
    "dadaptlion": ("dadapt_lion", {}),
    "dadaptsgd": ("dadapt_sgd", {}),
    "prodigy": ("prodigy", {}),
    "adafactor": ("adafactor", {}),
}
_ARG_RENAMES = {"eps": "epsilon"}

KEYS = [
    "learning_rate",
    "unet_lr",
    "text_encoder_lr",
    "learning_rate_te",
    "train_text_encoder",
    "optimizer",
    "optimizer_type",
    "use_8bit_adam",
    "use_lion_optimizer",
    "optimizer_args",
    "max_grad_norm",
    "lr_scheduler",
    "lr_warmup",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "epoch",
    "max_train_epochs",
    "max_train_steps",
]


def convert_training(ctx) -> None:
    """Convert the KEYS group; `ctx` is the engine's context (values, result, steps_per_epoch)."""
    total = run_length(ctx)
    optimizer, adaptive_lr = _optimizer(ctx)
    _learning_rates(ctx, optimizer, adaptive_lr)
    schedule(ctx, total, adaptive_lr)
    _clipping(ctx)


def _optimizer(ctx) -> tuple[str, bool]:
    """Write base.optimizer and the optimizer_args; returns (name, whether Adafactor picks the LR)."""
    key = "optimizer" if ctx.has("optimizer") else "optimizer_type"
    raw = ctx.get(key) or ""
    extra: dict[str, Any] = {}
    if not raw and ctx.get("use_8bit_adam"):
        key, raw = "use_8bit_adam", "AdamW8bit"
    elif not raw and ctx.get("use_lion_optimizer"):
        key, raw = "use_lion_optimizer", "Lion"
    for legacy in ("use_8bit_adam", "use_lion_optimizer"):
        if ctx.has(legacy) and legacy != key:
            ctx.row(Row(legacy, ctx.raw(legacy), OFF, note=f"{key} names the optimizer"))
    name, extra, problem = _optimizer_name(raw or "AdamW")
    status = NOT_SUPPORTED if problem else ("mapped" if ctx.has(key) else DEFAULT)
    note = problem or ("kohya's default is AdamW" if not ctx.has(key) else "")
    ctx.result.set_optim("base", "optimizer", name, key, raw or ctx.raw(key), note, status=status)
    for opt_key, value in extra.items():
        ctx.result.base[opt_key] = value
    args = _optimizer_args(ctx, name)
    adaptive = name == "adafactor" and args.get("relative_step", True)
    return name, adaptive


def _optimizer_name(raw: str) -> tuple[str, dict[str, Any], str]:
    if "." in raw:  # kohya accepts any class by dotted path
        module, _, cls = raw.rpartition(".")
        ours = normalize_name(cls)
        if module in ("torch.optim", "bitsandbytes.optim") and ours in REGISTRY:
            return ours, {}, ""
        return (
            "adamw",
            {},
            f"class '{raw}' has no counterpart; replaced by adamw (docs/OPTIMIZERS.md lists the choices)",
        )
    found = KOHYA_OPTIMIZERS.get(raw.lower())
    if found is None:
        return (
            "adamw",
            {},
            f"'{raw}' has no counterpart here; replaced by adamw (docs/OPTIMIZERS.md lists the choices)",
        )
    name, extra = found
    return name, dict(extra), ""


def parse_optimizer_args(value: Any) -> list[tuple[str, Any, str]]:
    """kohya's `k=v` items (a GUI string or a TOML list) -> [(key, value, raw item)], values as
    Python literals (`betas=0.9,0.999` is a tuple), like sd-scripts' ast.literal_eval."""
    items = value.split() if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        key, eq, text = str(item).partition("=")
        if not eq:
            raise ConfigError(f"optimizer_args: '{item}' is not key=value")
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = text
        out.append((key.strip(), parsed, str(item)))
    return out


def _optimizer_args(ctx, name: str) -> dict[str, Any]:
    if not ctx.has("optimizer_args"):
        return {}
    parsed = parse_optimizer_args(ctx.get("optimizer_args"))
    if not parsed:
        ctx.row(Row("optimizer_args", ctx.raw("optimizer_args"), OFF, note="empty"))
    accepted = get_spec(name).keys
    kept: dict[str, Any] = {}
    for key, value, item in parsed:
        ours = _ARG_RENAMES.get(key, key)
        source = f"optimizer_args: {key}"
        if ours not in accepted:
            ctx.row(Row(source, item, NOT_SUPPORTED, note=f"{name} here takes: {', '.join(accepted)}"))
            continue
        value = _coerce(ours, value)
        kept[ours] = value
        ctx.result.set_optim("base", ours, value, source, item, "the text encoder copies it")
    return kept


def _coerce(key: str, value: Any) -> Any:
    """JSON-ready values of the field's type (optimizer.json is parsed strictly)."""
    if isinstance(value, tuple):
        return [float(v) for v in value]
    if float in typing.get_args(SectionConfig.model_fields[key].annotation) and isinstance(value, int):
        return float(value) if not isinstance(value, bool) else value
    return value


def _learning_rates(ctx, optimizer: str, adaptive: bool) -> None:
    base_lr = ctx.get("learning_rate")
    if base_lr is None:
        base_lr = 2e-6  # sd-scripts' default
        ctx.row(Row("learning_rate", "(absent)", DEFAULT, note="sd-scripts' default 2e-6"))
    te_key = "learning_rate_te" if ctx.get("learning_rate_te") is not None else "text_encoder_lr"
    unet_lr, te_lr = ctx.get("unet_lr"), ctx.get(te_key)
    if isinstance(te_lr, list):  # sd-scripts takes one per SDXL text encoder
        te_lr = te_lr[0] if te_lr else None
    if ctx.kind == "gui" and (unet_lr is None) != (te_lr is None) and ctx.has("unet_lr"):
        # the GUI trains only the component whose LR is non-zero when the other one is 0
        if unet_lr is None:
            unet_lr = 0.0
        elif te_key == "text_encoder_lr":
            te_lr = 0.0
    if adaptive:
        ctx.row(Row("learning_rate", base_lr, OFF, note="Adafactor with relative_step computes its own LR"))
    elif ctx.has("learning_rate") and unet_lr is not None and te_lr is not None:
        ctx.row(Row("learning_rate", base_lr, OFF, note="overridden by unet_lr and the text-encoder LR"))
    for comp, lr, key in (("unet", unet_lr, "unet_lr"), ("text_encoder", te_lr, te_key)):
        lr = base_lr if lr is None else lr
        source = key if ctx.has(key) else "learning_rate"
        if comp == "text_encoder" and ctx.get("train_text_encoder") is False:
            ctx.result.set_train("disable_textenc_training", True, "train_text_encoder", False)
            continue
        if lr == 0:
            flag = "disable_unet_training" if comp == "unet" else "disable_textenc_training"
            ctx.result.set_train(flag, True, source, lr, "an LR of 0 trains nothing: the component is frozen")
            continue
        if adaptive:
            continue
        section = "base" if comp == "unet" else "text_encoder"
        if source != "learning_rate":
            ctx.result.set_optim(section, "lr", float(lr), source, ctx.raw(key))
        else:
            ctx.result.set_optim(section, "lr", float(lr), f"learning_rate ({comp})", base_lr)
    _lora_rates_check(ctx)
    if ctx.has("train_text_encoder") and ctx.get("train_text_encoder") is not False:
        ctx.row(
            Row(
                "train_text_encoder",
                ctx.raw("train_text_encoder"),
                OFF,
                note="the text encoder trains by default",
            )
        )
    for key in ("unet_lr", "text_encoder_lr", "learning_rate_te"):
        if ctx.has(key) and ctx.get(key) is None:
            ctx.row(Row(key, ctx.raw(key), OFF, note="unset: learning_rate applies"))


# Above this, an LR is a LoRA-sized step: full fine-tunes of SD use about 1e-6 to 2e-6.
FULL_FINETUNE_LR_LIMIT = 1e-5
_LORA_MARKERS = ("network_dim", "network_module", "LoRA_type", "network_alpha")


def _lora_rates_check(ctx) -> None:
    """A LoRA configuration's LRs move a small network; applied to all weights they fry the model."""
    lrs = [v for v in (ctx.result.base.get("lr"), ctx.result.text_encoder.get("lr")) if v is not None]
    if any(ctx.has(k) for k in _LORA_MARKERS) and lrs and max(lrs) > FULL_FINETUNE_LR_LIMIT:
        ctx.row(
            Row(
                "(LoRA learning rates)",
                max(lrs),
                CHECK,
                note=(
                    "this is a LoRA configuration: its learning rates are imported as they are, but a full fine-tune "
                    "of all weights usually wants about 1e-6 to 2e-6 (docs/OPTIMIZERS.md); lower base.lr and "
                    "text_encoder_overrides.lr in optimizer.json"
                ),
            )
        )


def _clipping(ctx) -> None:
    if not ctx.has("max_grad_norm"):
        ctx.result.set_train(
            "clip_grad_norm",
            1.0,
            "max_grad_norm (absent)",
            "(absent)",
            "sd-scripts clips at 1.0 by default",
            status=DEFAULT,
        )
        return
    value = ctx.get("max_grad_norm")
    if not value:
        ctx.result.set_train(
            "clip_grad_norm", None, "max_grad_norm", ctx.raw("max_grad_norm"), "0 = no clipping"
        )
    else:
        ctx.result.set_train("clip_grad_norm", float(value), "max_grad_norm", value)
