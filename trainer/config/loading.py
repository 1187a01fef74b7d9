"""Reading train.json and the command line into a `TrainConfig`, and the messages for what is
wrong: each names the file or the command line, the key, the value and its JSON type, what the
key allows and, for unknown keys and names, the closest valid one."""

from __future__ import annotations

import difflib
import json
import logging
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from trainer.config.schema import FIELDS, IGNORED_KEY_TYPE, IGNORED_KEYS, TrainConfig
from trainer.config.values import accepts, cli_value, json_kind, type_text, unquote_hint
from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)


def closest_key(name: str, candidates: list[str] | None = None) -> str | None:
    """The most similar valid key, for 'did you mean' messages."""
    pool = candidates if candidates is not None else [*FIELDS, *IGNORED_KEYS]
    matches = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _unknown_key_message(key: str, source: str) -> str:
    hint = closest_key(key)
    suggestion = f"; did you mean '{hint}'?" if hint else "; see docs/CONFIG.md for the valid keys"
    return f"{source}: unknown key '{key}'{suggestion}"


def read_json_config(path: str | Path) -> dict[str, Any]:
    """Read train.json; errors name the file and, for syntax errors, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing train.json with --config")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of key/value pairs, got {type(data).__name__}")
    return data


def parse_cli_overrides(argv: list[str]) -> dict[str, Any]:
    """Parse `--key value`, `--key=value`, bare `--flag` (true) and repeated list values.

    Each text is read as its key's type (`--batch_size 4` is the integer 4, `--lr 1e-3` a
    number, `--cache_latents true` a boolean, `--project_name 2024` the text "2024", `null` is
    null where the key takes it); text that is not of the key's type stays text and validation
    refuses it, naming the key. Lists: repeated values or one JSON list.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: unexpected argument '{token}'; options look like --key value")
        key, eq, inline = token[2:].partition("=")
        key = key.replace("-", "_") if key.replace("-", "_") in FIELDS else key
        if key not in FIELDS and key not in IGNORED_KEYS:
            raise ConfigError(_unknown_key_message(key, "command line"))
        values: list[str] = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        annotation = FIELDS[key].annotation if key in FIELDS else IGNORED_KEY_TYPE
        out[key] = cli_value(key, annotation, values)
    return out


def build_config(json_values: dict[str, Any], cli_values: dict[str, Any], *, source: str) -> TrainConfig:
    """Merge defaults < JSON < CLI and validate. Raises ConfigError naming the key."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, values in ((source, json_values), ("command line", cli_values)):
        for key, value in values.items():
            if key in IGNORED_KEYS:
                if value not in (None, False):
                    log.warning(
                        "%s: key '%s' is accepted but does nothing here (%s)", origin, key, IGNORED_KEYS[key]
                    )
                continue
            if key == "config":
                continue
            if key not in FIELDS:
                raise ConfigError(_unknown_key_message(key, origin))
            if value is None and not _accepts_none(key):
                merged.pop(key, None)  # ED2 ships null for keys that need a value: use the default
                continue
            merged[key] = value
            origins[key] = origin
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, merged, origins, source)) from exc


def _accepts_none(key: str) -> bool:
    return type(None) in typing.get_args(FIELDS[key].annotation)


def allowed_text(key: str) -> str:
    """Human description of a field's type and constraints, e.g. 'int, >= 64, <= 2048, multiple of 64'."""
    field = FIELDS[key]
    parts = [type_text(field.annotation)]
    for meta in field.metadata:
        for attr, label in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("multiple_of", "multiple of"),
        ):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{label} {getattr(meta, attr)}")
    return ", ".join(parts)


def _format_validation_error(
    exc: ValidationError, values: dict[str, Any], origins: dict[str, str], source: str
) -> str:
    """One line per key: where it was given, the value and its JSON type, pydantic's reason, what
    the key allows, and a fix where one is clear (drop the quotes; the closest valid name)."""
    by_key: dict[str, list[ErrorDetails]] = {}
    lines = []
    for err in exc.errors():
        key = err["loc"][0] if err["loc"] else None
        if key in FIELDS:
            by_key.setdefault(key, []).append(err)
        else:
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
    for key, errs in by_key.items():
        # A union reports each of its types; the one that took the type says the real reason.
        err = next((e for e in errs if not e["type"].endswith("_type")), errs[0])
        given = values.get(key, "<missing>")
        hint = unquote_hint(key, given, FIELDS[key].annotation)
        if err["type"] == "literal_error" and isinstance(given, str):
            close = closest_key(given, [str(v) for v in accepts(FIELDS[key].annotation).literals])
            hint += f"; did you mean '{close}'?" if close else ""
        lines.append(
            f"{origins.get(key, source)}: key '{key}' = {given!r} ({json_kind(given)}): {err['msg']} "
            f"(allowed: {allowed_text(key)}){hint}",
        )
    return "\n".join(lines)


def load_config(config_path: str | None, cli_argv: list[str]) -> TrainConfig:
    """Entry point: read --config (if any), apply CLI overrides, validate."""
    json_values = read_json_config(config_path) if config_path else {}
    cli_values = parse_cli_overrides(cli_argv)
    return build_config(json_values, cli_values, source=str(config_path or "defaults"))


def config_to_json(cfg: TrainConfig) -> str:
    """The effective configuration as written into the run folder (loadable with --config)."""
    return json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True)


def keys_markdown() -> str:
    """docs/CONFIG.md's key table, generated from the fields so docs and code cannot drift."""
    rows = ["| key | type and range | default | meaning |", "|---|---|---|---|"]
    for name, field in FIELDS.items():
        default = json.dumps(field.default)
        allowed = allowed_text(name).replace("|", "\\|")
        rows.append(f"| `{name}` | {allowed} | `{default}` | {field.description or ''} |")
    ignored = ["| key | why it does nothing here |", "|---|---|"]
    ignored += [f"| `{k}` | {why} |" for k, why in IGNORED_KEYS.items()]
    return (
        "\n".join(rows)
        + "\n\n### Accepted for EveryDream2 compatibility, with a warning\n\n"
        + "\n".join(ignored)
    )
