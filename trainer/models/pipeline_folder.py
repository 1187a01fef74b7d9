"""Loading a diffusers StableDiffusionPipeline folder (our checkpoints, built-in model caches).

Apart from loading.py (the entry point for every model spec) so that the built-in models can
load their cached folders without importing the loader that dispatches to them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.models.components import (
    SDComponents,
    ensure_model_max_length,
    family_of_text_encoder,
    read_json,
    training_scheduler_config,
)
from trainer.models.openclip_extras import load_extras
from trainer.runtime.errors import ModelLoadError

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _from_pretrained(cls, folder: Path, subfolder: str, dtype: torch.dtype):
    try:
        if cls is CLIPTextModel:
            return cls.from_pretrained(str(folder), subfolder=subfolder, dtype=dtype, local_files_only=True)
        return cls.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load {cls.__name__} from {folder / subfolder}: {e}") from e


def load_pipeline_folder(folder: Path, *, prediction_type: str | None, dtype: torch.dtype) -> SDComponents:
    """Load a diffusers StableDiffusionPipeline folder (model_index.json + component sub-folders),
    with the SD2 OpenCLIP extras `save_pipeline` keeps in text_encoder/ (a resume must export them)."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Give the folder that "
            "contains model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/, or a "
            ".safetensors/.ckpt file."
        )
    missing = [s for s in _SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise ModelLoadError(f"pipeline folder {folder} lacks sub-folder(s) {missing}; it is incomplete")
    text_encoder = _from_pretrained(CLIPTextModel, folder, "text_encoder", dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {folder / 'tokenizer'}: {e}") from e
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    family = family_of_text_encoder(text_encoder.config)
    return SDComponents(
        unet=_from_pretrained(UNet2DConditionModel, folder, "unet", dtype),
        vae=_from_pretrained(AutoencoderKL, folder, "vae", dtype),
        text_encoder=text_encoder,
        tokenizer=ensure_model_max_length(tokenizer, str(folder / "tokenizer")),
        scheduler_config=training_scheduler_config(scheduler, prediction_type),
        family=family,
        source=f"diffusers folder {folder} ({family})",
        text_encoder_extras=load_extras(folder / "text_encoder", text_encoder, dtype),
    )
