"""Read a kohya_ss GUI JSON, an sd-scripts `--config_file` TOML or a `--dataset_config` TOML.

Errors name the file and, for syntax errors, the line (json and tomllib both report it).
sd-scripts flattens its config file one level: top-level keys and the keys of every section
(`[model_arguments]`, `[optimizer_arguments]`, ...) become one namespace; so does this reader.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from trainer.runtime.errors import ConfigError


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    return path.read_text(encoding="utf-8-sig")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of key/value pairs, got {type(data).__name__}")
    return data


def read_source(path: str | Path) -> tuple[str, dict[str, Any]]:
    """('gui', keys) for a kohya_ss GUI .json, ('toml', flattened keys) for an sd-scripts .toml."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        flat: dict[str, Any] = {}
        for key, value in read_toml(path).items():
            if isinstance(value, dict):
                for inner, inner_value in value.items():
                    if inner in flat:
                        raise ConfigError(f"{path}: key '{inner}' is set twice (in two sections)")
                    flat[inner] = inner_value
            else:
                flat[key] = value
        return "toml", flat
    if path.suffix.lower() == ".json":
        return "gui", read_json(path)
    raise ConfigError(f"{path}: expected a kohya_ss GUI .json or an sd-scripts --config_file .toml")
