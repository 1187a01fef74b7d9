"""What a config key's type annotation accepts: command-line text read as that type, and the
words error messages use for a value's type and for what a key expects.

Why this exists: train.json and optimizer.json are validated in pydantic's strict mode, so a
JSON value of the wrong type (`"batch_size": "4"`, `"cache_latents": "yes"`) is an error, as
docs/CONFIG.md promises. But every command-line value is text. Reading `--batch_size 4` as the
key's own type (here an int) before validation keeps the command line convenient without
loosening the files. Pure functions over annotations; shared by `config` and `optim.schema`.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from trainer.runtime.errors import ConfigError

_INT_TEXT = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Accepts:
    """The JSON shapes one annotation takes: scalar types, null, and a list's item type."""

    scalars: frozenset[type]  # among bool, int, float, str (a Literal adds its values' types)
    none: bool
    list_item: Any = None  # the item annotation when a list (or tuple) is accepted, else None
    literals: tuple = ()  # the values of a Literal, for "did you mean" messages


def accepts(annotation: Any) -> Accepts:
    """Walk unions, Optional, Annotated (StrictInt), Literal, list[...] and tuple[X, ...]."""
    scalars: set[type] = set()
    none, list_item, literals = False, None, ()
    pending = [annotation]
    while pending:
        ann = pending.pop()
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        if ann is type(None) or ann is None:
            none = True
        elif origin in (typing.Union, types.UnionType):
            pending += list(args)
        elif origin is typing.Annotated:
            pending.append(args[0])
        elif origin is Literal:
            scalars |= {type(v) for v in args}
            literals += args
        elif origin in (list, tuple):
            list_item = args[0] if args else Any
        elif ann in (bool, int, float, str):
            scalars.add(ann)
    return Accepts(frozenset(scalars), none, list_item, literals)


def typed_scalar(accepted: Accepts, text: str) -> Any:
    """`text` as the first type the key takes that it spells: null, true/false, an integer, a
    number. Otherwise the text itself: a text key takes it as is, and validation refuses it for
    any other key, naming the key, the text and what the key takes."""
    if accepted.none and text == "null":
        return None
    if bool in accepted.scalars and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if int in accepted.scalars and _INT_TEXT.fullmatch(text):
        return int(text)
    if float in accepted.scalars:
        try:
            return float(text)  # also "1e-3", "inf" and "nan": validation refuses the last two
        except ValueError:
            pass
    return text


def cli_value(key: str, annotation: Any, texts: list[str]) -> Any:
    """The value of `--key TEXT...` for a key with this annotation.

    A bare `--flag` is true. Several texts make a list, for keys that take one; a single text
    starting with `[` is read as a JSON list for those keys (`--data_root '["a", "b"]'`).
    """
    if not texts:
        return True
    accepted = accepts(annotation)
    if len(texts) > 1:
        if accepted.list_item is None:
            raise ConfigError(
                f"command line: --{key} takes one value, got {len(texts)}: {' '.join(texts)}. "
                "Quote a value that contains spaces."
            )
        item = accepts(accepted.list_item)
        return [typed_scalar(item, text) for text in texts]
    text = texts[0]
    if accepted.list_item is not None and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"command line: --{key} {text}: not a JSON list ({exc.msg})") from exc
    return typed_scalar(accepted, text)


def json_kind(value: Any) -> str:
    """A value's type in JSON's words, for messages ('a string', 'an integer', ...)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, list | tuple):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def type_text(annotation: Any) -> str:
    """An annotation as the docs show it: 'float | None', 'int', "Literal['a', 'b']", 'list[float]'."""
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    text = re.sub(r"Annotated\[(\w+), Strict\(strict=True\)\]", r"\1", text)  # StrictInt -> int
    text = re.sub(r"^Union\[(.*)\]$", lambda m: m.group(1).replace(", ", " | "), text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)
    text = re.sub(r"tuple\[(\w+), \.\.\.\]", r"list[\1]", text)  # JSON has arrays, not tuples
    return text.replace("NoneType", "None")


def unquote_hint(key: str, value: Any, annotation: Any) -> str:
    """For a quoted number or boolean ('"4"', '"true"') given to a key that takes one: how to
    write it; '' otherwise."""
    if not isinstance(value, str):
        return ""
    typed = typed_scalar(accepts(annotation), value)
    if isinstance(typed, str) or typed is None:
        return ""
    return f"; write {json.dumps(key)}: {json.dumps(typed)} without quotes"
