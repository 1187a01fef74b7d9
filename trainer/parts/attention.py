"""Which attention kernel the UNet (and text encoder) use: the `attn_type` key.

* `sdp` (default): PyTorch's `scaled_dot_product_attention` through diffusers'
  `AttnProcessor2_0`, or for SD's own attention layers its exact lean subclass
  (trainer/parts/lean_blocks.py: the same result without the generic identity steps). PyTorch picks
  a fused kernel (flash, memory-efficient, cuDNN) per call from the backends that are enabled
  and fit the inputs, falling back to the math kernel; the enabled set is logged so a slow run
  can be explained.
* `xformers`: xformers' memory-efficient attention, which EveryDream2 users know. It must be
  installed and needs CUDA; asking for it without either is a ConfigError, never a silent
  switch to another kernel. `xformers_problem` says which, so the check runs before the model
  loads (trainer/run/preflight.py) as well as here.
* `slice`: diffusers' sliced attention (`set_attention_slice("auto")`: each attention layer
  computes half its heads at a time). Slower; only for very tight memory.

The text encoder's attention (77-token sequences, a negligible share of memory) always uses
SDPA where its class supports it. The choice is independent of gradient checkpointing.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models import UNet2DConditionModel
from diffusers.utils import is_xformers_available
from torch import nn
from transformers import PreTrainedModel

from trainer.parts.lean_blocks import attention_processors
from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

ATTN_TYPES = ("sdp", "xformers", "slice")


def sdpa_backends(device: torch.device) -> list[str]:
    """The SDPA kernels PyTorch may choose from on `device` (enabled and built in)."""
    if device.type == "cpu":
        # CPU SDPA has a fused (flash-style) kernel for fp32/bf16 and the math kernel otherwise.
        return ["cpu: fused", "cpu: math"]
    if device.type != "cuda":
        return [f"{device.type}: PyTorch's default"]
    cuda = torch.backends.cuda
    checks = {
        "flash": cuda.flash_sdp_enabled() and cuda.is_flash_attention_available(),
        "mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
    }
    return [name for name, on in checks.items() if on]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _text_encoder_sdpa(text_encoder: PreTrainedModel) -> str:
    """Switch a transformers text encoder to SDPA; report what it actually uses."""
    config = getattr(text_encoder, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None:
        return "text encoder: its own attention"
    if current != "sdpa":
        text_encoder.set_attn_implementation("sdpa")
        current = text_encoder.config._attn_implementation
        if current != "sdpa":
            logger.warning(
                "the text encoder (%s) cannot use SDPA attention; it keeps '%s'",
                type(text_encoder).__name__,
                current,
            )
    return f"text encoder: {current}"


def xformers_problem(device_type: str) -> str | None:
    """Why `attn_type: xformers` cannot run on a `device_type` device here, or None if it can.
    Cheap (no model, no CUDA work)."""
    if not is_xformers_available():  # the same check diffusers makes
        return (
            "attn_type 'xformers' requested but the xformers package is not installed; use attn_type sdp "
            "(PyTorch SDPA: the same family of memory-efficient kernels, built into torch), or pip install "
            "xformers"
        )
    if device_type != "cuda":
        return (
            f"attn_type 'xformers' needs a CUDA device but training runs on {device_type}; "
            "use attn_type sdp (PyTorch's fused attention) instead"
        )
    return None


def _enable_xformers(unet: UNet2DConditionModel, device: torch.device) -> None:
    if problem := xformers_problem(device.type):
        raise ConfigError(problem)
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            f"attn_type 'xformers': xformers is installed but cannot run here ({exc}); "
            "reinstall an xformers build matching this torch/CUDA, or use attn_type sdp"
        ) from exc


def configure_attention(
    unet: UNet2DConditionModel,
    text_encoder: PreTrainedModel,
    attn_type: str,
    *,
    device: torch.device | str | None = None,
) -> str:
    """Set the attention kernels for `attn_type`; return a one-line description for the log.

    `device` is where the models will run (default: where the UNet is now), so this can be
    called right after loading, before anything is moved or a run folder exists. Processors
    are plain attributes and survive `.to(device)`. Raises ConfigError when the requested
    kernel is unavailable; there is no fallback.
    """
    if attn_type not in ATTN_TYPES:
        raise ConfigError(f"attn_type {attn_type!r}: use one of {', '.join(ATTN_TYPES)}")
    device = torch.device(device) if device is not None else _device_of(unet)
    if attn_type == "sdp":
        unet.set_attn_processor(attention_processors(unet))
        backends = ", ".join(sdpa_backends(device))
        unet_desc = f"unet: sdp (PyTorch SDPA; backends enabled: {backends})"
    elif attn_type == "xformers":
        _enable_xformers(unet, device)
        unet_desc = "unet: xformers memory-efficient attention"
    else:
        unet.set_attention_slice("auto")
        unet_desc = "unet: sliced attention (half the heads at a time)"
    description = f"{unet_desc}; {_text_encoder_sdpa(text_encoder)}"
    logger.info("attention: %s", description)
    return description
