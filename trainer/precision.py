"""Mixed precision: which autocast dtype to use, and the fp16 GradScaler with ED2's step tweaks.

CPU runs use fp32 (or bf16 when asked); CUDA `auto` picks bf16 where the GPU supports it and
fp16 otherwise. Only fp16 needs loss scaling.
"""

from __future__ import annotations

import torch

from trainer.errors import ConfigError

# EveryDream2's GradScaler settings (optimizer/optimizers.py:85-91).
_SCALER_INIT = dict(init_scale=2**17.5, growth_factor=2.0, backoff_factor=0.5, growth_interval=25)


def resolve_autocast_dtype(
    mixed_precision: str, disable_amp: bool, device: torch.device
) -> torch.dtype | None:
    """The autocast dtype for the UNet forward, or None for full fp32."""
    if disable_amp or mixed_precision == "no":
        return None
    if device.type == "cpu":
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision 'fp16' is not supported on CPU; use 'bf16' or 'no'")
        return torch.bfloat16 if mixed_precision == "bf16" else None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def make_grad_scaler(autocast_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler only for fp16 (bf16 and fp32 have the range to need none)."""
    if autocast_dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type, **_SCALER_INIT)
