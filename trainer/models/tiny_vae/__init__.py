"""The built-in tiny models' trained VAE: weights and config shipped in this folder.

`tools/train_tiny_vae.py` made them (its docstring has the recipe and how to rebuild them);
`training.json` records the recipe, the measured PSNR and the weights' sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.models import AutoencoderKL
from safetensors.torch import load_file

FOLDER = Path(__file__).resolve().parent
WEIGHTS = FOLDER / "diffusion_pytorch_model.safetensors"


def tiny_vae_config() -> dict:
    return json.loads((FOLDER / "config.json").read_text(encoding="utf-8"))


def tiny_vae_state_dict() -> dict[str, torch.Tensor]:
    """The trained weights in fp32 (stored as fp16 to keep the file small)."""
    return {k: v.float() for k, v in load_file(str(WEIGHTS)).items()}


def load_tiny_vae() -> AutoencoderKL:
    """The trained tiny VAE (fp32, eval mode)."""
    vae = AutoencoderKL.from_config(tiny_vae_config())
    vae.load_state_dict(tiny_vae_state_dict(), strict=True)
    return vae.eval()
