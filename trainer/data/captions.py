"""Captions and per-image settings in EveryDream2's formats, and how they merge.

Every source of settings (a `global.yaml`, a `local.yaml`, a `multiply.txt`, an image's
`.txt` / `.caption` / `.yaml` / `.yml` sidecar, a manifest entry, the file name) becomes one
`Settings` layer. Layers are merged from least to most specific with `merge`, and the result
becomes an `ImageItem`'s caption and settings. Keeping every source in the same shape is what
makes the merge rules one small, testable function instead of special cases per file type.

Bad values never stop the scan: they are recorded in a `Report` (a `Problem` with the file and
the reason) and the offending key is ignored, so the user sees every mistake in one run.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.data.items import CaptionSpec, Problem

logger = logging.getLogger(__name__)

DEFAULT_MAX_CAPTION_LENGTH = 2048
_SCALARS = (
    "multiply",
    "cond_dropout",
    "flip_p",
    "shuffle_tags",
    "batch_id",
    "loss_scale",
    "max_caption_length",
)
SETTING_KEYS = ("main_prompt", "tags", "caption", *_SCALARS, "rating")
# Encodings tried in order: utf-8 (a BOM is dropped), then the legacy Windows and ISO encodings
# EveryDream2 also accepts. latin-1 decodes any byte string, so the chain always ends.
TEXT_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


class SettingsFileError(Exception):
    """A caption/settings file that cannot be parsed at all (bad yaml/json, not a mapping)."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


@dataclass
class Report:
    """Collects problems and once-per-kind warnings for one discovery run.

    Problems are kept (the caller shows them at start-up and in the run summary); warnings that
    could repeat for every image of a large dataset (an unknown key, `rating`) are logged once
    per kind with an example path, so the log stays readable at 100k images.
    """

    problems: list[Problem] = field(default_factory=list)
    _warned: set[str] = field(default_factory=set)

    def problem(self, path: str | Path, reason: str) -> None:
        self.problems.append(Problem(str(path), reason))

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s", message)


@dataclass(frozen=True)
class Settings:
    """One layer of captions/settings; `None` means "not set by this layer"."""

    main_prompts: tuple[str, ...] = ()
    tags: tuple[tuple[str, float], ...] = ()
    multiply: float | None = None
    cond_dropout: float | None = None
    flip_p: float | None = None
    shuffle_tags: bool | None = None
    batch_id: str | None = None
    loss_scale: float | None = None
    max_caption_length: int | None = None


def merge(base: Settings, override: Settings) -> Settings:
    """Merge a more specific layer over a less specific one.

    Scalars: the more specific value wins. Main prompts and tags: union, more specific sources
    first (EveryDream2's order), duplicates removed keeping the first, i.e. the most specific
    weight for a tag. Deterministic because layers are always merged in the same fixed order.
    """
    prompts = tuple(dict.fromkeys(override.main_prompts + base.main_prompts))
    tags: dict[str, float] = {}
    for name, weight in override.tags + base.tags:
        tags.setdefault(name, weight)
    scalars = {
        k: getattr(override, k) if getattr(override, k) is not None else getattr(base, k) for k in _SCALARS
    }
    return Settings(main_prompts=prompts, tags=tuple(tags.items()), **scalars)


def merge_all(layers: list[Settings]) -> Settings:
    """Fold layers given from least to most specific."""
    acc = Settings()
    for layer in layers:
        acc = merge(acc, layer)
    return acc


def parse_caption_text(text: str) -> Settings:
    """`main prompt, tag1, tag2` -> main prompt + tags (stripped, empty chunks and duplicates dropped)."""
    if not text.strip():
        return Settings()
    chunks = [c.strip() for c in text.split(",")]
    main = (chunks[0],) if chunks[0] else ()
    tags = tuple((t, 1.0) for t in dict.fromkeys(c for c in chunks[1:] if c))
    return Settings(main_prompts=main, tags=tags)


def filename_caption(image_path: str | Path) -> Settings:
    """EveryDream2's last-resort caption: the file name before the first `_`, comma-parsed."""
    return parse_caption_text(Path(image_path).stem.split("_")[0])


def read_text(path: str | Path) -> str:
    """Read a small text file as utf-8 (BOM allowed), falling back to cp1252 then latin-1.

    A fallback is logged with the path, because a mis-decoded caption trains the wrong text.
    """
    raw = Path(path).read_bytes()
    for encoding in TEXT_ENCODINGS:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding != TEXT_ENCODINGS[0]:
            logger.warning(
                "%s is not valid UTF-8; read it as %s. Re-save it as UTF-8 to silence this.", path, encoding
            )
        return text
    raise AssertionError("latin-1 decodes every byte string")  # pragma: no cover


def _number(value, key: str, lo: float | None, hi: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"'{key}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    return float(value)


def check_value(key: str, value):
    """Validate one setting value; raises ValueError naming the key, the value and what is allowed."""
    if key == "multiply":
        return _number(value, key, 0.0, None)
    if key in ("cond_dropout", "flip_p"):
        return _number(value, key, 0.0, 1.0)
    if key == "loss_scale":  # negative values are allowed ("unlearning"), as in EveryDream2
        return _number(value, key, None, None)
    if key == "max_caption_length":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'max_caption_length' must be a whole number >= 1, got {value!r}")
        return value
    if key == "shuffle_tags":
        if not isinstance(value, bool):
            raise ValueError(f"'shuffle_tags' must be true or false, got {value!r}")
        return value
    if key == "batch_id":
        if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
            raise ValueError(f"'batch_id' must be a non-empty text, got {value!r}")
        return str(value).strip()
    raise KeyError(key)


def _prompts(value, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
    raise ValueError(f"'{key}' must be a text or a list of texts, got {value!r}")


def _tags(value) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list):
        raise ValueError(f"'tags' must be a list of texts or {{tag, weight}} items, got {value!r}")
    out: dict[str, float] = {}
    for entry in value:
        if isinstance(entry, dict) and "tag" in entry and set(entry) <= {"tag", "weight"}:
            name, weight = str(entry["tag"]).strip(), entry.get("weight", 1.0)
            weight = 1.0 if weight is None else _number(weight, "tags.weight", 0.0, None)
        elif isinstance(entry, str | int | float) and not isinstance(entry, bool):
            name, weight = str(entry).strip(), 1.0
        else:
            raise ValueError(f"tag entry must be a text or {{tag: ..., weight: ...}}, got {entry!r}")
        if name:
            out.setdefault(name, weight)
    return tuple(out.items())


def settings_from_dict(
    data: dict, source: str | Path, report: Report, *, extra_keys: tuple[str, ...] = ()
) -> Settings:
    """Build a layer from a yaml/json mapping with EveryDream2's keys.

    A bad value is reported (file, key, value, what is allowed) and that key alone is ignored.
    `caption` may be caption text or a nested mapping of the same keys; it merges under the
    top-level keys. `rating` is accepted for compatibility and ignored (warned once).
    """
    layer_kwargs: dict = {}
    main: tuple[str, ...] = ()
    tags: tuple[tuple[str, float], ...] = ()
    for key, value in data.items():
        if key in extra_keys:
            continue
        if key not in SETTING_KEYS:
            close = difflib.get_close_matches(str(key), SETTING_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            report.warn_once(
                f"unknown-key:{key}",
                f"{source}: unknown key '{key}' ignored{hint}; known keys: {', '.join(SETTING_KEYS)}. "
                "Reported once even if other files have it.",
            )
            continue
        if value is None or key == "caption":
            continue
        if key == "rating":
            report.warn_once(
                "rating", f"{source}: 'rating' is accepted for EveryDream2 compatibility but ignored."
            )
            continue
        try:
            if key == "main_prompt":
                main = _prompts(value, key)
            elif key == "tags":
                tags = _tags(value)
            else:
                layer_kwargs[key] = check_value(key, value)
        except ValueError as e:
            report.problem(source, f"{e}; this setting is ignored")
    layer = Settings(main_prompts=main, tags=tags, **layer_kwargs)
    caption = data.get("caption")
    if caption is None:
        return layer
    if isinstance(caption, str):
        nested = parse_caption_text(caption)
    elif isinstance(caption, dict):
        nested = settings_from_dict(caption, f"{source} (caption)", report)
    else:
        report.problem(source, f"'caption' must be a text or a mapping, got {caption!r}; it is ignored")
        return layer
    return merge(nested, layer)


def load_mapping(path: str | Path, report: Report):
    """Parse a .yaml/.yml/.json file; raises SettingsFileError with the parser's message."""
    text = read_text(path)
    suffix = Path(path).suffix.lower()
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise SettingsFileError(path, f"malformed {kind}: {' '.join(str(e).split())}") from e
    return data


def load_settings_file(path: str | Path, report: Report) -> Settings:
    """A caption sidecar (.txt/.caption) or settings file (.yaml/.yml/.json) as one layer.

    A caption file with nothing but whitespace gives no caption, so the image falls back to
    its other sources (EveryDream2 does the same); it is reported, because an empty file is
    usually a captioning tool that failed, and the fallback trains text nobody wrote for it.
    """
    if Path(path).suffix.lower() in (".txt", ".caption"):
        text = read_text(path)
        if not text.strip():
            report.problem(
                path,
                "empty caption file (nothing but whitespace); image kept, captioned by its other sources "
                "(a .yaml sidecar, the folder's settings, or else its file name)",
            )
        return parse_caption_text(text)
    data = load_mapping(path, report)
    if data is None:  # an empty yaml file sets nothing
        return Settings()
    if not isinstance(data, dict):
        raise SettingsFileError(
            path, f"expected a mapping of settings (key: value), got {type(data).__name__}"
        )
    return settings_from_dict(data, path, report)


def build_caption(settings: Settings, image_path: str | Path, report: Report) -> tuple[CaptionSpec, Settings]:
    """Final caption for an image: file-name caption if no source gave a main prompt.

    Tags are ordered by weight, highest first (stable), as EveryDream2 does before training.
    Returns the caption and the settings with the file-name layer applied.
    """
    if not settings.main_prompts:
        settings = merge(settings, filename_caption(image_path))
    if len(settings.main_prompts) > 1:
        report.warn_once(
            "multiple-main-prompts",
            f"{image_path}: several main prompts {list(settings.main_prompts)}; the most specific one "
            f"('{settings.main_prompts[0]}') is used. Other images may have the same; reported once.",
        )
    main = settings.main_prompts[0] if settings.main_prompts else ""
    tags = tuple(sorted(settings.tags, key=lambda t: -t[1]))
    length = settings.max_caption_length or DEFAULT_MAX_CAPTION_LENGTH
    return CaptionSpec(main_prompt=main, tags=tags, max_caption_length=length), settings
