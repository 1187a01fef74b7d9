"""What an import produced: the target values, and one table row per source key.

A row is the unit the user reads: `source key = value -> target key = value`, or the reason a key
has no counterpart. Keeping rows next to the values they explain means a key cannot be converted
without being reported, and a key that is not converted cannot go unmentioned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAPPED = "mapped"
DEFAULT = "kohya default"  # key absent from the source; kohya's default differs from ours
OFF = "off"  # a feature we lack, but the source has it switched off: nothing is lost
NO_COUNTERPART = "no counterpart"
NOT_SUPPORTED = "not supported yet"
UNKNOWN = "unknown key"
CHECK = "check"  # imported as is, but probably not what a full fine-tune wants

LOSSY = (NOT_SUPPORTED, UNKNOWN, CHECK)  # statuses that change what training does: warned at the end


@dataclass(frozen=True)
class Row:
    """One source key and what happened to it."""

    source: str
    value: Any
    status: str
    target: str = ""  # e.g. "train.json lr_warmup_steps = 10"; empty when nothing was written
    note: str = ""


@dataclass
class ImportResult:
    """Everything an import produces; the writer turns it into files."""

    train: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # optimizer.json `base`
    text_encoder: dict[str, Any] = field(default_factory=dict)  # optimizer.json `text_encoder_overrides`
    folder_settings: dict[Path, dict[str, str]] = field(default_factory=dict)  # folder -> file -> text
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def set_train(
        self, key: str, value: Any, source: str, source_value: Any, note: str = "", status: str = MAPPED
    ):
        self.train[key] = value
        self.add(Row(source, source_value, status, f"train.json {key} = {_show(value)}", note))

    def set_optim(
        self,
        section: str,
        key: str,
        value: Any,
        source: str,
        source_value: Any,
        note: str = "",
        status: str = MAPPED,
    ):
        target = self.base if section == "base" else self.text_encoder
        target[key] = value
        name = "base" if section == "base" else "text_encoder_overrides"
        self.add(Row(source, source_value, status, f"optimizer.json {name}.{key} = {_show(value)}", note))

    def lossy_rows(self) -> list[Row]:
        return [r for r in self.rows if r.status in LOSSY]


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[Row]) -> str:
    """The import table as markdown (printed by the tool, pasted into docs/MIGRATING.md)."""
    lines = ["| source key | value | became | why / note |", "|---|---|---|---|"]
    for r in rows:
        became = f"`{_cell(r.target)}`" if r.target else f"*{r.status}*"
        note = r.note
        if r.target and r.status != MAPPED:
            note = f"({r.status}) {note}".strip()
        lines.append(f"| `{_cell(r.source)}` | `{_cell(_show(r.value))}` | {became} | {_cell(note)} |")
    return "\n".join(lines)
