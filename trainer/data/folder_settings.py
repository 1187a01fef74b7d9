"""Per-folder settings in EveryDream2's layout: global/local yaml and one-value text files.

A folder may hold:
  * `global.yaml` / `global.yml`: applies to this folder and every subfolder (a subfolder's
    own global file is merged over its parent's);
  * `local.yaml` / `local.yml`: this folder only;
  * `multiply.txt`, `cond_dropout.txt`, `flip_p.txt`, `loss_scale.txt` (one number),
    `batch_id.txt` (one text), `shuffle_tags.txt` (its presence turns shuffling on): this
    folder only.
Within a folder the text files are the least specific, then `local.yaml`, then `local.yml`.
A file that cannot be parsed, or a value out of range, is reported and ignored: the images
are still trained with the remaining settings.
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.captions import (
    Report,
    Settings,
    SettingsFileError,
    check_value,
    load_settings_file,
    merge_all,
    read_text,
)

GLOBAL_FILES = ("global.yaml", "global.yml")
LOCAL_FILES = ("local.yaml", "local.yml")
NUMBER_FILES = {
    "multiply.txt": "multiply",
    "cond_dropout.txt": "cond_dropout",
    "flip_p.txt": "flip_p",
    "loss_scale.txt": "loss_scale",
}
FOLDER_FILES = frozenset((*GLOBAL_FILES, *LOCAL_FILES, *NUMBER_FILES, "batch_id.txt", "shuffle_tags.txt"))


def _yaml_layers(names: tuple[str, ...], files: dict[str, Path], report: Report) -> list[Settings]:
    layers = []
    for name in names:
        if name in files:
            try:
                layers.append(load_settings_file(files[name], report))
            except SettingsFileError as e:
                report.problem(e.path, f"{e.message}; the settings in this file are ignored")
            except OSError as e:
                report.problem(
                    files[name], f"cannot read: {e.strerror}; the settings in this file are ignored"
                )
    return layers


def global_layer(files: dict[str, Path], report: Report) -> Settings:
    """This folder's own `global.yaml` + `global.yml` (the caller merges it over the parent's)."""
    return merge_all(_yaml_layers(GLOBAL_FILES, files, report))


def _text_setting(path: Path, key: str, report: Report) -> Settings:
    try:
        text = read_text(path).strip()
    except OSError as e:
        report.problem(path, f"cannot read: {e.strerror}; this setting is ignored")
        return Settings()
    try:
        if key == "batch_id":
            value = check_value(key, text)
        else:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"'{key}' must be a number, got {text!r}") from None
            value = check_value(key, number)
    except ValueError as e:
        report.problem(path, f"{e}; this setting is ignored")
        return Settings()
    return Settings(**{key: value})


def local_layer(files: dict[str, Path], report: Report) -> Settings:
    """This folder's own settings: text files, then local.yaml, then local.yml (most specific)."""
    layers = [_text_setting(files[name], key, report) for name, key in NUMBER_FILES.items() if name in files]
    if "batch_id.txt" in files:
        layers.append(_text_setting(files["batch_id.txt"], "batch_id", report))
    if "shuffle_tags.txt" in files:
        layers.append(Settings(shuffle_tags=True))
    layers += _yaml_layers(LOCAL_FILES, files, report)
    return merge_all(layers)
