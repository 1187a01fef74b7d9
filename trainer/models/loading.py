"""`load_model`: one entry point for every model spec the trainer accepts.

spec is `builtin:<name>`, a diffusers StableDiffusionPipeline folder, or a single-file
original-layout `.safetensors` / `.ckpt`. Everything loads offline; every failure is a
ModelLoadError naming the path and what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.models import AutoencoderKL

from trainer.models.checkpoint_io import SINGLE_FILE_SUFFIXES, read_checkpoint
from trainer.models.components import (
    PREDICTION_TYPES,
    SDComponents,
    cast,
    training_scheduler_config,
    with_zero_terminal_snr,
)
from trainer.models.pipeline_folder import load_pipeline_folder
from trainer.models.single_file import load_single_file, vae_from_tensors
from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


def load_vae(spec: str, *, like: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    """A replacement VAE: a diffusers VAE folder, a pipeline folder's vae/, or a single file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"VAE folder {folder} has no config.json; give a diffusers AutoencoderKL folder"
            )
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load the VAE from {folder}: {e}") from e
    elif path.is_file():
        ckpt = read_checkpoint(path)
        vae = cast(vae_from_tensors(ckpt.tensors, dict(like.config), path), dtype)
    else:
        raise ModelLoadError(f"VAE path {path} does not exist; give a VAE folder or .safetensors/.ckpt file")
    if list(vae.config["block_out_channels"]) != list(like.config["block_out_channels"]):
        raise ModelLoadError(
            f"VAE {path} has block_out_channels {vae.config['block_out_channels']}, the model's VAE has "
            f"{like.config['block_out_channels']}; use a VAE made for this model family"
        )
    return vae


def load_model(
    spec: str,
    *,
    vae: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """Load SD components from `builtin:<name>`, a diffusers folder, or a single file.

    `vae` replaces the model's VAE; `prediction_type` overrides what the model states or what
    is detected (SD2 single files: the A1111 `.yaml` beside the file, our metadata, heuristics).
    `zero_terminal_snr` (train.json `enable_zero_terminal_snr`) makes the model's scheduler config
    the rescaled one, so what is trained, sampled and exported all use it.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    if spec.startswith(BUILTIN_PREFIX):
        from trainer.models.builtin import load_builtin  # builtin models build on first use: import late

        components = load_builtin(spec[len(BUILTIN_PREFIX) :], dtype=dtype)
        if prediction_type:
            components.scheduler_config = training_scheduler_config(
                components.scheduler_config, prediction_type
            )
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model {spec!r} does not exist. Give a diffusers pipeline folder, a .safetensors/.ckpt "
                "file, or builtin:NAME (see docs/MODELS.md); nothing is downloaded, so download hub models first."
            )
        if path.is_dir():
            components = load_pipeline_folder(path, prediction_type=prediction_type, dtype=dtype)
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            components = load_single_file(path, prediction_type=prediction_type, dtype=dtype)
        else:
            raise ModelLoadError(
                f"{path} is neither a folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
            )
    if zero_terminal_snr:
        components.scheduler_config = with_zero_terminal_snr(components.scheduler_config)
    elif components.scheduler_config.get("rescale_betas_zero_snr"):
        logger.info("%s has a zero-terminal-SNR schedule (rescale_betas_zero_snr); training keeps it", spec)
    if vae is not None:
        components.vae = load_vae(vae, like=components.vae, dtype=dtype)
        components.source += f", VAE from {vae}"
    logger.info("loaded %s", components.source)
    return components
