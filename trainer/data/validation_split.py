"""Validation sets from EveryDream2's `validation_config` JSON, split without touching global RNG.

Modes (EveryDream2's):
  * automatic: sort the training items by path, shuffle them with `random.Random(seed)`, and
    move `max(1, ceil(auto_split_proportion * n))` of them out of training;
  * manual: the images under `manual_data_root` (discovered like `data_root`);
  * none: no validation set.
`extra_manual_datasets` ({name: folder}) add named validation sets while validation is on.
`stabilize_training_loss` picks a same-proportion subset of the remaining training items
(they are still trained on) to measure training loss with a fixed seed.

Validation and stabilize items get multiply 1, flip_p 0 and cond_dropout 0 (deterministic
loss); their caption, batch_id and loss_scale are kept. An image that is both in a validation
set and in the training data is removed from training and reported: validation images are
never trained on. The shuffle draws from one `random.Random(seed)` in EveryDream2's order, so
the same seed picks the same images as EveryDream2 for the same files.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.data.discovery import discover, require_trainable
from trainer.data.items import ImageItem, Problem
from trainer.runtime.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_LEGACY_KEYS = {"val_split_proportion": "auto_split_proportion", "val_data_root": "manual_data_root"}


class ValidationConfig(BaseModel):
    """EveryDream2's validation_default.json; defaults are EveryDream2's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    documentation: dict | None = Field(None, description="EveryDream2 ships help text here; ignored.")
    validate_training: bool = True
    val_split_mode: Literal["automatic", "manual", "none"] = "automatic"
    auto_split_proportion: float = Field(0.15, gt=0, lt=1, description="legacy name: val_split_proportion")
    manual_data_root: str | None = Field(None, description="legacy name: val_data_root")
    extra_manual_datasets: dict[str, str] = Field(default_factory=dict)
    stabilize_training_loss: bool = False
    stabilize_split_proportion: float = Field(0.15, gt=0, le=1)
    every_n_epochs: float = Field(1.0, gt=0, description="<1 validates several times per epoch")
    seed: int = 555
    use_relative_loss: bool = Field(False, description="accepted for compatibility; unused")
    batch_size: int | None = Field(None, ge=1, description="None = the training batch_size")

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in _LEGACY_KEYS.items():
            if old in data:
                if new in data and data[new] != data[old]:
                    raise ValueError(
                        f"both '{old}' (legacy name) and '{new}' are set and differ; keep only '{new}'"
                    )
                data[new] = data.pop(old)
        return data

    @model_validator(mode="after")
    def _check(self):
        if "val" in self.extra_manual_datasets:
            raise ValueError(
                "extra_manual_datasets may not use the name 'val' (it is the main validation set)"
            )
        if (
            self.validate_training
            and self.val_split_mode == "manual"
            and not (self.manual_data_root or self.extra_manual_datasets)
        ):
            raise ValueError("val_split_mode 'manual' needs 'manual_data_root' (or 'extra_manual_datasets')")
        return self


def _explain(e: ValidationError, path: str | Path) -> str:
    known = list(ValidationConfig.model_fields) + list(_LEGACY_KEYS)
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(file)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"validation_config {path}: " + "; ".join(lines)


def load_validation_config(path: str | Path | None) -> ValidationConfig | None:
    """Parse a validation config file; None when no path is given. Raises ConfigError."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"validation_config {path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"validation_config {path}: not valid JSON: {e}") from e
    if isinstance(data, dict):
        data = _bool_strings(data, path)
    try:
        cfg = ValidationConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, path)) from e
    if "use_relative_loss" in data:
        logger.warning("validation_config %s: 'use_relative_loss' is accepted but has no effect here.", path)
    return cfg


def _bool_strings(data: dict, path) -> dict:
    """EveryDream2 reads `"validate_training": "true"` (its cfgs/validation_coco.json) as true:
    accept the strings "true"/"false" for boolean keys, loudly; anything else stays an error."""
    out = dict(data)
    for key, value in data.items():
        field_info = ValidationConfig.model_fields.get(key)
        if field_info is None or field_info.annotation is not bool or not isinstance(value, str):
            continue
        if value.strip().lower() in ("true", "false"):
            out[key] = value.strip().lower() == "true"
            logger.warning(
                "validation_config %s: '%s' is the string %r; read as %s. Write it without quotes.",
                path,
                key,
                value,
                str(out[key]).lower(),
            )
    return out


@dataclass
class DataSplit:
    """Training items, validation sets by name ("val" + extra datasets), stabilize subset."""

    train: list[ImageItem]
    val: dict[str, list[ImageItem]] = field(default_factory=dict)
    stabilize: list[ImageItem] = field(default_factory=list)


def _for_validation(item: ImageItem) -> ImageItem:
    return replace(item, multiply=1.0, flip_p=0.0, cond_dropout=0.0)


def _take(items: list[ImageItem], proportion: float, rng: random.Random) -> tuple[list, list]:
    shuffled = sorted(items, key=lambda i: i.path)
    rng.shuffle(shuffled)
    n = max(1, math.ceil(proportion * len(shuffled)))
    return shuffled[:n], shuffled[n:]


def _by_path(items) -> list[ImageItem]:
    return sorted(items, key=lambda i: i.path)


def _discover_set(key: str, root: str, scan_cache, problems: list[Problem], rng: random.Random | None):
    result = discover(root, scan_cache=scan_cache)
    problems += result.problems
    try:
        require_trainable(result, root)
    except DataError as e:
        raise DataError(f"validation_config '{key}': {e}") from e
    items = _by_path(result.items)
    if rng is not None:  # EveryDream2 shuffles the manual set; keeps the RNG stream aligned with it
        rng.shuffle(items)
    return [_for_validation(i) for i in items]


def split_dataset(
    items: list[ImageItem], cfg: ValidationConfig | None, *, scan_cache=None
) -> tuple[DataSplit, list[Problem]]:
    """Split `items` per `cfg` (None = no validation). Returns the split and the problems found
    while discovering manual/extra validation folders."""
    if cfg is None:
        return DataSplit(train=_by_path(items)), []
    rng = random.Random(cfg.seed)
    problems: list[Problem] = []
    train = _by_path(items)
    val: dict[str, list[ImageItem]] = {}
    mode = cfg.val_split_mode if cfg.validate_training else "none"
    if mode == "automatic":
        picked, train = _take(train, cfg.auto_split_proportion, rng)
        if not train:
            raise DataError(
                f"the automatic validation split takes {len(picked)} of {len(picked)} images, leaving none to "
                "train on; add images, or set val_split_mode to 'none' in the validation_config."
            )
        val["val"] = [_for_validation(i) for i in picked]
        logger.info("Moved %d of %d images out of training for validation.", len(picked), len(items))
    elif mode == "manual" and cfg.manual_data_root:
        val["val"] = _discover_set("manual_data_root", cfg.manual_data_root, scan_cache, problems, rng)
    if cfg.validate_training:
        for name, root in sorted(cfg.extra_manual_datasets.items()):
            val[name] = _discover_set(f"extra_manual_datasets.{name}", root, scan_cache, problems, None)
    val = {name: _by_path(v) for name, v in val.items()}
    held_out = {os.path.realpath(i.path): name for name, v in val.items() for i in v}
    overlap = [i for i in train if os.path.realpath(i.path) in held_out]
    for i in overlap:
        problems.append(
            Problem(
                i.path, f"is also in validation set '{held_out[os.path.realpath(i.path)]}'; not trained on"
            )
        )
    train = _by_path(i for i in train if os.path.realpath(i.path) not in held_out)
    if not train:
        raise DataError("every training image is also in a validation set; nothing left to train on.")
    stabilize: list[ImageItem] = []
    if cfg.stabilize_training_loss:
        picked, _ = _take(train, cfg.stabilize_split_proportion, rng)
        stabilize = _by_path(_for_validation(i) for i in picked)
    return DataSplit(train=train, val=val, stabilize=stabilize), problems
