"""optimizer.json: EveryDream2's schema, parsed strictly.

The file keeps ED2's layout (`base`, `text_encoder_overrides`, `text_encoder_lr_scale`,
`text_encoder_freezing`, `apply_grad_scaler_step_tweaks`, `log_grad_norm`, an ignored `doc`).
Unlike ED2, an unknown or misspelled key is an error naming the key path and the closest
valid key, a key the chosen optimizer does not take is an error listing the keys it does take,
and a missing file is an error rather than a TypeError. Values are strict: a JSON value of
another type (`"lr": "1e-4"`, `"amsgrad": 1`) is an error naming the value, its type and what
the key takes (an integer is a valid float), and so is Infinity or NaN for any number, options
passed through to pytorch_optimizer included. `None` for the path (no
`optimizer_config`) means the documented defaults: adamw8bit, betas (0.9, 0.999), weight decay
0.01, epsilon 1e-8.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from trainer.config.values import json_kind, type_text
from trainer.optim.bridge import is_bridge_name
from trainer.optim.registry import closest_key, get_spec, normalize_name
from trainer.optim.schedules import SCHEDULER_NAMES
from trainer.optim.spec import ED2_ALWAYS_PRESENT_KEYS
from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "adamw8bit"
# strict: a JSON value is taken only as the type it is; allow_inf_nan: Infinity / NaN (which
# JSON readers accept) are refused for every float key.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class SectionConfig(BaseModel):
    """One optimizer section (`base` or `text_encoder_overrides`). null / absent = unset."""

    model_config = _STRICT

    optimizer: str | None = None
    lr: float | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    lr_decay_steps: int | None = None
    lr_scheduler_num_cycles: int | None = None
    lr_scheduler_power: float | None = None
    betas: tuple[float, ...] | None = None
    epsilon: float | None = None
    weight_decay: float | None = None
    # torch / bitsandbytes options
    amsgrad: bool | None = None
    maximize: bool | None = None
    foreach: bool | None = None
    fused: bool | None = None
    capturable: bool | None = None
    lr_decay: float | None = None
    initial_accumulator_value: float | None = None
    alpha: float | None = None
    momentum: float | None = None
    centered: bool | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    bias_correction: bool | None = None
    adam_w_mode: bool | None = None
    max_unorm: float | None = None
    min_8bit_size: int | None = None
    is_paged: bool | None = None
    # lion-pytorch
    use_triton: bool | None = None
    decoupled_weight_decay: bool | None = None
    # D-Adaptation / Prodigy
    d0: float | None = None
    d_coef: float | None = None
    growth_rate: float | None = None
    decouple: bool | None = None
    use_bias_correction: bool | None = None
    safeguard_warmup: bool | None = None
    beta3: float | None = None
    slice_p: int | None = None
    log_every: int | None = None
    no_prox: bool | None = None
    # Adafactor
    eps2: float | None = None
    clip_threshold: float | None = None
    decay_rate: float | None = None
    beta1: float | None = None
    relative_step: bool | None = None
    scale_parameter: bool | None = None
    warmup_init: bool | None = None
    # schedule-free (schedulefree)
    warmup_steps: int | None = None
    r: float | None = None
    weight_lr_power: float | None = None
    silent_sgd_phase: bool | None = None
    # Prodigy + schedule-free (prodigy-plus-schedule-free)
    weight_decay_by_lr: bool | None = None
    d_limiter: bool | None = None
    prodigy_steps: int | None = None
    schedulefree_c: float | None = None
    split_groups: bool | None = None
    split_groups_mean: bool | None = None
    factored: bool | None = None
    factored_fp32: bool | None = None
    use_stableadamw: bool | None = None
    use_schedulefree: bool | None = None
    use_speed: bool | None = None
    stochastic_rounding: bool | None = None
    use_cautious: bool | None = None
    use_grams: bool | None = None
    use_adopt: bool | None = None
    use_orthograd: bool | None = None
    use_focus: bool | None = None
    # CAME / ADOPT (pytorch-optimizer)
    weight_decouple: bool | None = None
    fixed_decay: bool | None = None
    ams_bound: bool | None = None
    eps1: float | None = None
    # pytorch_optimizer.<Name>: keys of that class's signature that are not fields above; checked
    # against the signature (closest-match errors) in check_section_keys.
    bridge_options: dict[str, Any] | None = None

    def set_values(self) -> dict[str, Any]:
        """The keys the user set to a non-null value (bridge options flattened in)."""
        values = self.model_dump(exclude_none=True, exclude={"bridge_options"})
        values.update({k: v for k, v in (self.bridge_options or {}).items() if v is not None})
        return values


class FreezingConfig(BaseModel):
    """`text_encoder_freezing`: which CLIP text-encoder parts stay trainable (see freezing.py)."""

    model_config = _STRICT

    unfreeze_last_n_layers: int | None = None
    freeze_front_n_layers: int | None = None
    freeze_embeddings: bool | None = None
    freeze_final_layer_norm: bool | None = None


class OptimizerFile(BaseModel):
    """A validated optimizer.json. `source` names the file in every later error message."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    doc: Any = None
    base: SectionConfig = SectionConfig()
    text_encoder_overrides: SectionConfig | None = None
    text_encoder_lr_scale: float | None = None
    text_encoder_freezing: FreezingConfig = FreezingConfig()
    apply_grad_scaler_step_tweaks: bool = True
    log_grad_norm: bool = True
    _source: str = PrivateAttr(default="optimizer.json")

    @property
    def source(self) -> str:
        return self._source

    def as_dict(self) -> dict[str, Any]:
        """The effective file in ED2's schema, defaults filled in, for the run folder.

        Loading this dict again gives the same settings. Per-run resolution (train lr, auto
        warmup/decay) is in `OptimizerSet.resolved_config()`.
        """
        base = self.base.set_values()
        base.setdefault("optimizer", DEFAULT_OPTIMIZER)
        te = self.text_encoder_overrides.set_values() if self.text_encoder_overrides else None
        return {
            "base": base,
            "text_encoder_overrides": te,
            "text_encoder_lr_scale": self.text_encoder_lr_scale,
            # Only the keys the file set: a present `unfreeze_last_n_layers` (even null) overrides
            # freeze_front_n_layers, so writing the null default back would change the settings.
            "text_encoder_freezing": self.text_encoder_freezing.model_dump(exclude_unset=True),
            "apply_grad_scaler_step_tweaks": self.apply_grad_scaler_step_tweaks,
            "log_grad_norm": self.log_grad_norm,
        }


# What "no optimizer_config" means (ED2 docs): adamw8bit, betas (0.9, 0.999), wd 0.01, eps 1e-8.
DEFAULT_BASE = {"optimizer": DEFAULT_OPTIMIZER, "betas": (0.9, 0.999), "epsilon": 1e-8, "weight_decay": 0.01}


def default_optimizer_file() -> OptimizerFile:
    opt_file = OptimizerFile(base=SectionConfig.model_validate(DEFAULT_BASE))
    opt_file._source = "<default optimizer settings>"
    return opt_file


def load_optimizer_file(path: str | Path | None) -> OptimizerFile:
    """Read and validate an optimizer.json; `None` gives the documented defaults."""
    if path is None:
        return default_optimizer_file()
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise ConfigError(
            f"{label}: optimizer config file not found. Fix `optimizer_config` (train.json or "
            f"--optimizer_config), or set it to null to use the defaults ({DEFAULT_OPTIMIZER})."
        )
    text = path.read_text(encoding="utf-8")
    return parse_optimizer_json(text, label)


def parse_optimizer_json(text: str, label: str = "optimizer.json") -> OptimizerFile:
    """Validate optimizer.json text; every error names `label` and the key path."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if raw is None:
        return default_optimizer_file()
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a JSON object at the top level, got {type(raw).__name__}")
    if _collect_bridge_options(raw, label):
        text = json.dumps(raw)
    try:
        parsed = OptimizerFile.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label)) from exc
    parsed._source = label
    validate_sections(parsed)
    return parsed


def _collect_bridge_options(raw: dict[str, Any], label: str) -> bool:
    """For `pytorch_optimizer.<Name>` sections, move keys that are not SectionConfig fields into
    `bridge_options` (checked against that class's signature later) instead of refusing them.
    Done on the raw JSON so validation stays in JSON mode (strict tuples accept JSON arrays).
    Their values have no declared type, so only non-finite numbers are refused here.
    Returns whether anything moved."""
    moved = False
    base_opt = raw.get("base", {}).get("optimizer") if isinstance(raw.get("base"), dict) else None
    for key in ("base", "text_encoder_overrides"):
        section = raw.get(key)
        if not isinstance(section, dict) or not is_bridge_name(
            str(section.get("optimizer") or base_opt or "")
        ):
            continue
        extra = {k: v for k, v in section.items() if k not in SectionConfig.model_fields}
        for name, value in extra.items():
            _refuse_non_finite(value, f"{label}: {key}.{name}")
        if extra:
            raw[key] = {k: v for k, v in section.items() if k not in extra} | {"bridge_options": extra}
            moved = True
    return moved


def _refuse_non_finite(value: Any, where: str) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: Input should be a finite number; got {value!r} ({json_kind(value)})")


_MODELS_BY_PATH: dict[tuple[str, ...], type[BaseModel]] = {
    (): OptimizerFile,
    ("base",): SectionConfig,
    ("text_encoder_overrides",): SectionConfig,
    ("text_encoder_freezing",): FreezingConfig,
}


def _format_validation_error(exc: ValidationError, label: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            model = _MODELS_BY_PATH.get(loc[:-1])
            fields = list(model.model_fields) if model else []
            close = closest_key(loc[-1], fields)
            hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(fields)}"
            lines.append(f"{label}: {path}: unknown key{hint}")
        else:
            given = err["input"]
            lines.append(
                f"{label}: {path}: {err['msg']}; got {given!r} ({json_kind(given)}), expected {_expected(loc)}"
            )
    return "\n".join(lines)


def _expected(loc: tuple[str, ...]) -> str:
    """The annotation of the field at `loc` (a key path, list positions after the field)."""
    for depth in range(len(loc) - 1, -1, -1):
        model = _MODELS_BY_PATH.get(loc[:depth])
        if model is not None and loc[depth] in model.model_fields:
            return type_text(model.model_fields[loc[depth]].annotation)
    return "see docs/OPTIMIZERS.md"


def check_section_keys(section: dict[str, Any], optimizer: str, where: str) -> dict[str, Any]:
    """Check that every set key is one `optimizer` takes; return the keys to use.

    ED2 files always carry betas/epsilon (ED2 crashed without them), so a non-null value of
    those that the optimizer does not use is dropped with a warning; any other foreign key is
    an error listing what the optimizer accepts.
    """
    spec = get_spec(optimizer, f"{where}.optimizer")
    accepted = spec.accepted_keys
    kept: dict[str, Any] = {}
    for key, value in section.items():
        if key in accepted:
            kept[key] = value
        elif key in ED2_ALWAYS_PRESENT_KEYS:
            logger.warning("%s.%s: optimizer '%s' does not use %s; ignored", where, key, spec.name, key)
        else:
            close = closest_key(key, accepted)
            hint = f" Did you mean '{close}'?" if close else ""
            raise ConfigError(
                f"{where}.{key}: optimizer '{spec.name}' does not take '{key}'.{hint} "
                f"Keys it takes: {', '.join(accepted)}."
            )
    if "betas" in kept and len(kept["betas"]) != spec.betas_len:
        raise ConfigError(
            f"{where}.betas: optimizer '{spec.name}' needs {spec.betas_len} values, got {kept['betas']}"
        )
    sched = kept.get("lr_scheduler")
    if sched is not None and sched not in SCHEDULER_NAMES:
        close = closest_key(sched, SCHEDULER_NAMES)
        hint = f" Did you mean '{close}'?" if close else ""
        raise ConfigError(
            f"{where}.lr_scheduler: unknown scheduler '{sched}'.{hint} Known: {', '.join(SCHEDULER_NAMES)}."
        )
    for key in ("lr_warmup_steps", "lr_scheduler_num_cycles"):
        if kept.get(key, 0) < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0, got {kept[key]}")
    if kept.get("lr", 0.0) < 0:
        raise ConfigError(f"{where}.lr: must be >= 0, got {kept['lr']}")
    return kept


def validate_sections(opt_file: OptimizerFile) -> None:
    """Fail at load time, naming the file, for bad names and foreign keys in either section."""
    label = opt_file.source
    base = opt_file.base.set_values()
    base_opt = normalize_name(base.get("optimizer", DEFAULT_OPTIMIZER))
    check_section_keys(base, base_opt, f"{label}: base")
    if opt_file.text_encoder_overrides is not None:
        te = opt_file.text_encoder_overrides.set_values()
        te_opt = normalize_name(te.get("optimizer", base_opt))
        check_section_keys(te, te_opt, f"{label}: text_encoder_overrides")
    if opt_file.text_encoder_lr_scale is not None and opt_file.text_encoder_lr_scale < 0:
        raise ConfigError(
            f"{label}: text_encoder_lr_scale: must be >= 0, got {opt_file.text_encoder_lr_scale}"
        )
