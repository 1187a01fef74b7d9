"""The LoRA file: tensors in the save precision, and the metadata the loaders read.

One `.safetensors` in kohya's layout (`<lora_name>.lora_down.weight`, `.lora_up.weight`,
`.alpha`). Factors are stored in fp16 / bf16 (or fp32); alpha stays fp32, so that alpha / rank
is exact whatever the rank (bf16 cannot hold every integer above 256). Metadata:

- kohya's `ss_*` keys: A1111 sorts LoRAs by model family from `ss_v2` / `ss_base_model_version`
  and shows `ss_sd_model_name`; `ss_network_dim` reads "Dynamic" for per-layer ranks, as
  kohya's own resize script writes, and `ss_network_alpha` is the file's one alpha;
- ModelSpec (`modelspec.*`): architecture `stable-diffusion-v1/lora` etc., resolution,
  prediction type;
- `sdtrainer.*`: the base's hashes, the source checkpoint's step, the rank settings and the
  fidelity numbers, so a shared file says where it came from and what it keeps.

Every value is a string (safetensors' rule); ComfyUI and diffusers ignore metadata.
The file is written under a temporary name and renamed into place, never left half-written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.export.extract import ExtractedLora
from trainer.export.fidelity import FidelityReport
from trainer.export.naming import TEXT_ENCODER, canonical_text_module
from trainer.runtime.errors import TrainerError

SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoraWriteError(TrainerError):
    """The LoRA cannot be stored as asked (a factor overflows the save precision)."""


@dataclass(frozen=True)
class Provenance:
    """Where the LoRA came from, for its metadata."""

    base_name: str  # what --base named (file or folder name, or builtin:NAME), no directories
    base_file_sha256: str | None  # sha256 of the base's single file, when it is one
    base_weights_sha256: str  # sha256 over the base's UNet + text-encoder weights as loaded
    tuned_name: str
    step: int | None  # global step of the trainer checkpoint it was extracted from
    prediction_type: str
    resolution: int  # pixels: the UNet's sample_size x 8


def file_tensors(extracted: ExtractedLora, precision: str) -> dict[str, torch.Tensor]:
    """The tensors as stored: factors in `precision`, alpha in fp32; a factor that overflows the
    precision (fp16 tops out at 65504) is an error naming it, never an inf in the file."""
    dtype = SAVE_PRECISIONS[precision]
    out = {}
    for key, tensor in extracted.tensors.items():
        stored = tensor.float() if key.endswith(".alpha") else tensor.to(dtype)
        if not torch.isfinite(stored).all():
            raise LoraWriteError(
                f"{key} does not fit in {precision} (largest magnitude {float(tensor.abs().max()):.3g}); "
                "use --save_precision bf16 or fp32"
            )
        out[key] = stored.contiguous()
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over the UNet and text-encoder tensors (fp32, sorted by their published names):
    the same for a model however it is stored or loaded, so a LoRA names its base exactly."""
    digest = hashlib.sha256()
    for component in ("unet", "text_encoder"):
        state = getattr(model, component).state_dict()
        named = {(canonical_text_module(k) if component == TEXT_ENCODER else k): v for k, v in state.items()}
        for key in sorted(named):
            digest.update(f"{component}.{key}".encode())
            digest.update(named[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _architecture(family: str, prediction_type: str) -> tuple[str, str]:
    """(ModelSpec architecture, kohya ss_base_model_version)."""
    v_pred = prediction_type == "v_prediction"
    if family == "sd1":
        return "stable-diffusion-v1/lora", "sd_v1" + ("_v" if v_pred else "")
    return ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") + "/lora", "sd_v2" + (
        "_v" if v_pred else ""
    )


def lora_metadata(
    extracted: ExtractedLora, provenance: Provenance, report: FidelityReport, title: str, precision: str
) -> dict[str, str]:
    s = extracted.settings
    architecture, version = _architecture(extracted.family, provenance.prediction_type)
    dynamic = s.keep is not None
    net_args = {"conv_dim": str(s.conv_rank), "conv_alpha": str(float(s.conv_rank))} if s.conv_rank else {}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic" if dynamic else str(s.rank),
        "ss_network_alpha": str(extracted.alpha),
        "ss_network_args": json.dumps(net_args),
        "ss_v2": str(extracted.family == "sd2"),
        "ss_base_model_version": version,
        "ss_sd_model_name": provenance.base_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{provenance.resolution}x{provenance.resolution}",
        "modelspec.prediction_type": "v" if provenance.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
        "sdtrainer.base": provenance.base_name,
        "sdtrainer.base_weights_sha256": provenance.base_weights_sha256,
        "sdtrainer.tuned": provenance.tuned_name,
        "sdtrainer.rank": str(s.rank),
        "sdtrainer.conv_rank": str(s.conv_rank),
        "sdtrainer.keep": "" if s.keep is None else f"{s.keep:g}",
        "sdtrainer.save_precision": precision,
        "sdtrainer.components": ",".join(extracted.components),
        "sdtrainer.kept_fraction": f"{report.kept_fraction:.6f}",
        "sdtrainer.kept_of_all": f"{report.kept_of_all:.6f}",
    }
    if provenance.base_file_sha256:
        meta["ss_new_sd_model_hash"] = provenance.base_file_sha256
    if provenance.step is not None:
        meta["sdtrainer.source_step"] = str(provenance.step)
    if report.prediction is not None and not math.isnan(report.prediction.relative):
        meta["sdtrainer.prediction_error"] = f"{report.prediction.relative:.6f}"
    return meta


def write_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write under a temporary name in the same folder, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
