"""`sdtrainer --help`: every train.json key with its type, default and one line, generated.

The text comes from `TrainConfig`'s fields (type, range, default, description: the same source
as docs/CONFIG.md's key table), grouped by the section comments of the class body
(`# --- optimisation ---`), so the help cannot drift from the keys the config accepts.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap

from trainer.config import FIELDS, TrainConfig, allowed_text

SUBCOMMANDS_HELP = """usage: sdtrainer [train] --config train.json [--optimizer_config optimizer.json] [--KEY VALUE ...]
       sdtrainer plan --config train.json [--vram GiB] [--json] [--KEY VALUE ...]
       sdtrainer extract-lora --base MODEL --tuned CHECKPOINT --out FILE [--rank N] ...
       sdtrainer preview --config train.json          (what training will see, no model)
       sdtrainer import-config kohya.json --out DIR   (kohya_ss / sd-scripts -> train.json + optimizer.json)
       sdtrainer convert ...                          (diffusers folder <-> single file)
       python train.py ... is `sdtrainer train ...`; `sdtrainer SUBCOMMAND --help` for each.

Every train.json key can be given as --KEY VALUE (read as the key's type: booleans true/false
and a bare --flag = true, lists as JSON or repeated values, null where the key allows it). The
command line wins over the JSON file, the file over the defaults. docs/CONFIG.md explains each."""

_SECTION = re.compile(r"^\s*# --- (.+?) -*\s*$")
_FIELD = re.compile(r"^\s{4}([a-z_0-9]+)\s*:")


def key_groups() -> list[tuple[str, list[str]]]:
    """(section title, keys) in the order of the class body."""
    groups: list[tuple[str, list[str]]] = [("general", [])]
    for line in inspect.getsource(TrainConfig).splitlines():
        if section := _SECTION.match(line):
            groups.append((section.group(1).strip(), []))
        elif (field := _FIELD.match(line)) and field.group(1) in FIELDS:
            groups[-1][1].append(field.group(1))
    return [(title, keys) for title, keys in groups if keys]


def keys_help(width: int = 100) -> str:
    """One entry per key: `--key TYPE (default D)` and the first sentence of its description."""
    out = []
    for title, keys in key_groups():
        out.append(f"\n{title}:")
        for key in keys:
            field = FIELDS[key]
            line = (field.description or "").split(". ")[0].rstrip(".")
            out.append(f"  --{key}  {allowed_text(key)}  (default {json.dumps(field.default)})")
            if line:
                out.extend(textwrap.wrap(line, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


def train_help() -> str:
    return SUBCOMMANDS_HELP + "\n\ntrain.json keys:" + keys_help()
