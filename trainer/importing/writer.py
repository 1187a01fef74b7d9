"""Write the import: train.json, optimizer.json, optional dataset folder files, the table.

Both JSON files are validated with the trainer's own loaders before anything is written, so an
import that would not start a run fails here, naming the key. Dataset folder files are written
only when asked (`--write-dataset-settings`), and never over a different existing file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.config import build_config
from trainer.importing.rows import ImportResult
from trainer.optim.schema import parse_optimizer_json
from trainer.runtime.errors import ConfigError


def optimizer_document(result: ImportResult, source: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"doc": f"imported from {Path(source).name} by python -m trainer.importing.command"}
    doc["base"] = dict(result.base)
    doc["text_encoder_overrides"] = dict(result.text_encoder) if result.text_encoder else None
    return doc


def train_document(result: ImportResult, optimizer_path: Path) -> dict[str, Any]:
    return {**result.train, "optimizer_config": str(optimizer_path)}


def validate(train: dict[str, Any], optimizer: dict[str, Any], label: str) -> None:
    """Run both documents through the trainer's loaders (ConfigError names the key)."""
    parse_optimizer_json(json.dumps(optimizer), f"{label} -> optimizer.json")
    build_config(train, {}, source=f"{label} -> train.json")


def write_import(
    result: ImportResult, source: str, out_dir: str | Path, *, write_dataset: bool
) -> list[Path]:
    """Validate, then write the files; returns the paths written."""
    out = Path(out_dir)
    optimizer_path = out / "optimizer.json"
    optimizer = optimizer_document(result, source)
    train = train_document(result, optimizer_path)
    validate(train, optimizer, source)
    conflicts = [
        folder / name
        for folder, files in result.folder_settings.items()
        for name, text in files.items()
        if write_dataset and (folder / name).exists() and (folder / name).read_text(encoding="utf-8") != text
    ]
    if conflicts:
        raise ConfigError(
            "these dataset files exist with other contents and are not overwritten: "
            + ", ".join(map(str, conflicts))
            + "; merge the values by hand (the table lists them) or run without --write-dataset-settings"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "train.json", optimizer_path]
    (out / "train.json").write_text(json.dumps(train, indent=2) + "\n", encoding="utf-8")
    optimizer_path.write_text(json.dumps(optimizer, indent=2) + "\n", encoding="utf-8")
    if write_dataset:
        for folder, files in result.folder_settings.items():
            for name, text in files.items():
                if not folder.is_dir():
                    raise ConfigError(f"{folder}: dataset folder not found; cannot write {name}")
                (folder / name).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
                written.append(folder / name)
    return written
