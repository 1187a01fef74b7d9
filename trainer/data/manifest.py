"""JSON manifest as a `data_root`: a list of images with their captions and settings.

Format (EveryDream2's, which is broken in its own HEAD and works here):

    [
      {"image": "imgs/a.jpg", "caption": "a photo of ted, smiling"},
      {"image": "/abs/b.png", "main_prompt": "a dog", "tags": ["grass", {"tag": "sun", "weight": 2}],
       "multiply": 2, "flip_p": 0.5},
      {"image": "c.webp", "caption": {"main_prompt": "...", "tags": ["..."]}},
      {"image": "d.jpg", "caption": "captions/d.txt"}
    ]

Relative `image` paths resolve against the manifest's folder. `caption` may be caption text, a
mapping of the per-image keys, or the relative path of a .txt/.caption/.yaml/.yml/.json file.
An entry without a caption falls back to the file-name caption, as folder images do.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.captions import (
    Report,
    Settings,
    SettingsFileError,
    load_settings_file,
    merge,
    read_text,
    settings_from_dict,
)
from trainer.runtime.errors import DataError

_CAPTION_FILE_SUFFIXES = (".txt", ".caption", ".yaml", ".yml", ".json")


def _caption_file(text: str, base: Path) -> Path | None:
    """A `caption` string that names an existing caption/settings file (EveryDream2 allows it)."""
    if "\n" in text or not text.lower().endswith(_CAPTION_FILE_SUFFIXES):
        return None
    candidate = Path(text) if Path(text).is_absolute() else base / text
    return candidate if candidate.is_file() else None


def _entry(entry, index: int, manifest: Path, report: Report) -> tuple[Path, Settings] | None:
    where = f"{manifest} entry {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
        report.problem(where, f"expected a mapping with an 'image' path, got {entry!r}; entry skipped")
        return None
    image = Path(entry["image"])
    image = image if image.is_absolute() else manifest.parent / image
    if not image.is_file():
        report.problem(str(image), f"listed in {where} but no such file; entry skipped")
        return None
    caption = entry.get("caption")
    caption_path = _caption_file(caption, manifest.parent) if isinstance(caption, str) else None
    data = {k: v for k, v in entry.items() if not (k == "caption" and caption_path is not None)}
    settings = settings_from_dict(data, where, report, extra_keys=("image",))
    if caption_path is not None:
        try:
            settings = merge(load_settings_file(caption_path, report), settings)
        except SettingsFileError as e:
            report.problem(e.path, f"{e.message}; image {image} (from {where}) skipped")
            return None
        except OSError as e:
            report.problem(caption_path, f"cannot read: {e.strerror}; image {image} (from {where}) skipped")
            return None
    return image, settings


def read_manifest(manifest: Path, report: Report) -> list[tuple[Path, Settings]]:
    """Entries of a manifest as (absolute image path, settings). Raises DataError if the file
    itself is unusable; bad entries are reported and skipped."""
    try:
        data = json.loads(read_text(manifest))
    except json.JSONDecodeError as e:
        raise DataError(
            f"data_root manifest {manifest} is not valid JSON: {e}. Expected a list of "
            '{"image": ..., "caption": ...} entries.'
        ) from e
    except OSError as e:
        raise DataError(f"cannot read data_root manifest {manifest}: {e}") from e
    if not isinstance(data, list):
        raise DataError(
            f"data_root manifest {manifest} must be a JSON list of entries like "
            f'{{"image": "a.jpg", "caption": "..."}}, got a {type(data).__name__}.'
        )
    entries = (_entry(e, i, manifest.resolve(), report) for i, e in enumerate(data))
    return [e for e in entries if e is not None]
