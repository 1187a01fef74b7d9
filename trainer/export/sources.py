"""Where the base and the tuned model come from.

Either accepts every model source the trainer loads (`trainer.models.load_model`: builtin:NAME,
a diffusers folder, a single `.safetensors` / `.ckpt`), plus this trainer's checkpoints: a
checkpoint folder loads its `pipeline/` (the training precision, so untrained layers compare
equal to the base exactly) and is checked complete first (manifest); a single file inside a
checkpoint folder loads as that file. Either way the checkpoint's global step goes into the
LoRA's metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpointing.resume import PIPELINE_DIR
from trainer.checkpointing.store import MANIFEST, open_checkpoint
from trainer.models import load_model
from trainer.models.components import SDComponents
from trainer.models.loading import BUILTIN_PREFIX
from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One side of the extraction, checked and resolved, nothing loaded yet."""

    spec: str  # as the user gave it
    load_path: str  # what load_model reads (a checkpoint folder's pipeline/)
    name: str  # for metadata: the file or folder name, or builtin:NAME (no directories)
    step: int | None  # global step, when it is (inside) a checkpoint of this trainer
    single_file: Path | None  # the file it is, when it is one


@dataclass
class ModelSource:
    source: SourceSpec
    model: SDComponents


def _checkpoint_of(path: Path) -> Path | None:
    """The trainer checkpoint folder `path` is, or is a file directly inside of."""
    folder = path if path.is_dir() else path.parent
    if (folder / MANIFEST).is_file():
        return folder
    if path.is_dir() and (path / PIPELINE_DIR).is_dir() and not (path / "model_index.json").is_file():
        return path  # a checkpoint without its manifest: open_checkpoint says it is incomplete
    return None


def resolve_source(spec: str, flag: str) -> SourceSpec:
    """Check a --base / --tuned value before any model loads (names the flag and the path); a
    checkpoint of this trainer is checked complete (manifest) and gives its step."""
    if spec.startswith(BUILTIN_PREFIX):
        return SourceSpec(spec, spec, spec, None, None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{flag} {spec!r} does not exist; give a checkpoint folder of this trainer, a diffusers "
            "folder, a .safetensors/.ckpt file or builtin:NAME"
        )
    checkpoint = _checkpoint_of(path)
    step, load_path = None, path
    if checkpoint is not None:
        step = open_checkpoint(checkpoint).step
        load_path = path / PIPELINE_DIR if path.is_dir() else path
        logger.info("%s is checkpoint %s of this trainer (step %d)", flag, checkpoint.name, step)
    return SourceSpec(spec, str(load_path), path.name, step, path if path.is_file() else None)


def load_source(source: SourceSpec) -> ModelSource:
    return ModelSource(source, load_model(source.load_path))
