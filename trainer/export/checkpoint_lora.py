"""A LoRA in every checkpoint folder: train.json's `extract_lora_rank` (docs/LORA.md, "A LoRA
beside every checkpoint").

The checkpoint writer (trainer/checkpointing/contents.py) sits below this package and never
imports it: `build_session` makes a `CheckpointLora` with `checkpoint_lora(cfg)` and keeps it as
the session's `checkpoint_extra`. Every save then calls it on rank 0, once the checkpoint folder is complete (manifest written, renamed into
place), with the weights just saved and the base model the manifest records.

Each call loads the base to the CPU in fp32 (host memory: one more model, about 4.3 GB for
SD1.5), extracts `<checkpoint>-lora.safetensors` and its fidelity report into the folder, and
frees the base. Any failure (the base moved or deleted, another architecture, out of memory) is
logged as an error naming the checkpoint, the base and the reason; the checkpoint stays as it
is and the run goes on. The global RNG is left as it was (an exact resume trains the same).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainConfig
from trainer.export.write import ExtractionOutcome, write_checkpoint_lora
from trainer.models import load_model
from trainer.models.loading import BUILTIN_PREFIX
from trainer.runtime.determinism import isolated_rng

log = logging.getLogger(__name__)

LORA_SUFFIX = "-lora.safetensors"
NO_BASE = (
    "no LoRA written for checkpoint %s: the run's base model is unknown (the checkpoint this run "
    "started from was written before checkpoints recorded it). Extract by hand with python -m "
    "trainer.extract_lora --base <the model the first run started from> --tuned %s"
)


def lora_path(checkpoint: Path) -> Path:
    """Where the LoRA of a checkpoint folder goes: inside it, named after it."""
    return checkpoint / f"{checkpoint.name}{LORA_SUFFIX}"


def base_name(spec: str) -> str:
    """The base as the LoRA's metadata names it: builtin:NAME, or the file or folder name."""
    return spec if spec.startswith(BUILTIN_PREFIX) else Path(spec).name


@dataclass(frozen=True)
class CheckpointLora:
    """A `CheckpointExtra` (trainer/checkpointing/contents.py): rank `rank` for linears and 1x1
    convolutions, `conv_rank` for the ResNet 3x3 convolutions (0 leaves them out), fp16."""

    rank: int
    conv_rank: int = 0

    def __call__(
        self, checkpoint: Path, model, *, step: int, base_model: str | None
    ) -> ExtractionOutcome | None:
        """Write the LoRA of `model` (the checkpoint's weights) against `base_model` into
        `checkpoint`; None when nothing was written (logged: an error, or the warning of a
        checkpoint whose weights are still the base's)."""
        checkpoint = Path(checkpoint)
        out = lora_path(checkpoint)
        if base_model is None:
            log.error(NO_BASE, checkpoint, checkpoint)
            return None
        started = time.monotonic()
        try:
            outcome = self._extract(out, model, step, base_model)
        except Exception as exc:  # never fails the save: the checkpoint is already complete
            _remove_outputs(out)
            log.error(
                "no LoRA written for checkpoint %s: the base model %s could not be used: %s: %s. The checkpoint "
                "is saved and complete; extract later with python -m trainer.extract_lora --base <base> --tuned %s",
                checkpoint,
                base_model,
                type(exc).__name__,
                exc,
                checkpoint,
            )
            return None
        if outcome is not None:
            log.info("LoRA of checkpoint %s written in %.1fs", checkpoint.name, time.monotonic() - started)
        return outcome

    def _extract(self, out: Path, model, step: int, base_model: str) -> ExtractionOutcome | None:
        with isolated_rng():  # a builtin base is built from seeds; the probe draws none, but be sure
            base = load_model(base_model)  # on the CPU, fp32: host memory only, freed below
            try:
                return write_checkpoint_lora(
                    base,
                    model,
                    out,
                    self.rank,
                    step=step,
                    base_name=base_name(base_model),
                    tuned_name=out.parent.name,
                    conv_rank=self.conv_rank,
                )
            finally:
                del base
                gc.collect()


def checkpoint_lora(cfg: TrainConfig) -> CheckpointLora | None:
    """The writer train.json asks for (`extract_lora_rank`, `extract_lora_conv_rank`), or None."""
    if cfg.extract_lora_rank is None:
        return None
    return CheckpointLora(rank=cfg.extract_lora_rank, conv_rank=cfg.extract_lora_conv_rank)


def _remove_outputs(out: Path) -> None:
    """A failed extraction leaves no partial file or report in the checkpoint folder."""
    stem = out.with_suffix("")
    for path in (out, Path(f"{stem}.fidelity.txt"), Path(f"{stem}.fidelity.json")):
        path.unlink(missing_ok=True)
