"""Extract, measure and write: the one sequence the command and the checkpoint writer share.

`extract_to_file` decomposes the layers, rounds the factors to the save precision, measures
the prediction error with exactly those tensors, writes the file (metadata included) and the
fidelity report beside it, and prints nothing: callers log `outcome.report.format()`.
`write_checkpoint_lora` is the form train.json's `extract_lora_rank` uses in every checkpoint
folder (`checkpoint_lora.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.export.extract import IdenticalModelsError, RankSettings, extract_lora
from trainer.export.fidelity import FidelityReport, build_report
from trainer.export.lora_file import (
    Provenance,
    file_tensors,
    lora_metadata,
    sha256_file,
    weights_sha256,
    write_lora_file,
)
from trainer.export.probe import Probe, prediction_error
from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionOutcome:
    path: Path
    report: FidelityReport
    report_files: tuple[Path, Path]  # <file>.fidelity.txt, <file>.fidelity.json
    keys: int  # tensors in the file


def resolve_device(name: str) -> str:
    """`auto` is CUDA when there is one, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA device here; use --device cpu (or auto)")
    return name


def provenance_of(
    base, tuned, *, base_name: str, tuned_name: str, step: int | None, base_file: Path | None = None
) -> Provenance:
    """What the metadata says about the source. The prediction type is the fine-tune's: applied
    to a base of another type, the LoRA makes it predict what the fine-tune predicts."""
    if base.prediction_type != tuned.prediction_type:
        logger.warning(
            "the fine-tune predicts %s, the base %s: the LoRA's metadata says %s, and the base + LoRA "
            "must be sampled as %s (A1111: the .yaml beside the base; ComfyUI: a ModelSamplingDiscrete node)",
            tuned.prediction_type,
            base.prediction_type,
            tuned.prediction_type,
            tuned.prediction_type,
        )
    return Provenance(
        base_name=base_name,
        base_file_sha256=sha256_file(base_file) if base_file is not None else None,
        base_weights_sha256=weights_sha256(base),
        tuned_name=tuned_name,
        step=step,
        prediction_type=tuned.prediction_type,
        resolution=int(tuned.unet.config.sample_size) * 8,
    )


def extract_to_file(
    base,
    tuned,
    out: Path,
    settings: RankSettings,
    provenance: Provenance,
    *,
    precision: str = "fp16",
    device: str = "cpu",
    probe: Probe | None = None,
    measure: bool = True,
    progress: bool = True,
) -> ExtractionOutcome:
    """Write `out` and its fidelity report; raises IdenticalModelsError (nothing written) when
    the tuned model has no change a LoRA can carry."""
    extracted = extract_lora(base, tuned, settings, device=device, progress=progress)
    tensors = file_tensors(extracted, precision)
    prediction = prediction_error(base, tuned, tensors, extracted.targets(), probe) if measure else None
    report = build_report(extracted, prediction)
    write_lora_file(out, tensors, lora_metadata(extracted, provenance, report, out.stem, precision))
    return ExtractionOutcome(out, report, report.write_beside(out), len(tensors))


def write_checkpoint_lora(
    base,
    tuned,
    out: Path,
    rank: int,
    *,
    step: int | None = None,
    base_name: str = "base",
    tuned_name: str | None = None,
    conv_rank: int | None = None,
    precision: str = "fp16",
    measure: bool = True,
) -> ExtractionOutcome | None:
    """A rank-`rank` LoRA of `tuned` against `base` (SDComponents, any device and dtype) at
    `out`, with its fidelity report beside it: for train.json's `extract_lora_rank`.

    `conv_rank` None means `rank`: the ResNet convolutions hold most of a fine-tune's change,
    and a file without them keeps little of it (docs/LORA.md, "Which rank to choose").

    A checkpoint whose weights are still the base's (saved before the first optimizer step)
    gets no LoRA: that is logged as a warning and None is returned; every other failure raises.
    """
    out = Path(out)
    provenance = provenance_of(base, tuned, base_name=base_name, tuned_name=tuned_name or out.stem, step=step)
    try:
        outcome = extract_to_file(
            base,
            tuned,
            out,
            RankSettings(rank=rank, conv_rank=rank if conv_rank is None else conv_rank),
            provenance,
            precision=precision,
            device=resolve_device("auto"),
            measure=measure,
            progress=False,
        )
    except IdenticalModelsError as exc:
        logger.warning("no LoRA written beside checkpoint %s: %s", out.parent, exc)
        return None
    logger.info("wrote LoRA %s\n%s", outcome.path, outcome.report.format())
    return outcome
