"""Mixed precision: which autocast dtype to use, and the fp16 GradScaler with ED2's step tweaks.

CPU runs use fp32 (or bf16 when asked); CUDA `auto` picks bf16 where the GPU has bf16 tensor
cores (compute capability 8.0+, Ampere and newer) and fp16 otherwise. Only fp16 needs loss
scaling. `configure_cuda_backends` sets the CUDA math modes (TF32, cuDNN autotuning).
"""

from __future__ import annotations

import logging
from typing import TypedDict

import torch

from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)


class _ScalerInit(TypedDict):
    """The GradScaler constructor arguments set here (typed, so `**` keeps each one's type)."""

    init_scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: int


# EveryDream2's GradScaler settings (optimizer/optimizers.py:85-91).
_SCALER_INIT = _ScalerInit(init_scale=2**17.5, growth_factor=2.0, backoff_factor=0.5, growth_interval=25)


def resolve_autocast_dtype(
    mixed_precision: str, disable_amp: bool, device: torch.device, *, weight_dtype: str = "fp32"
) -> torch.dtype | None:
    """The autocast dtype for the UNet forward, or None for full fp32.

    Refuses (ConfigError) `weight_dtype` "bf16" with `auto` on a GPU without native bf16:
    `auto` would compute in fp16 on bf16 weights (every forward casting between the two, a
    GradScaler on weights that need none), which nobody asks for. config.py refuses the same
    pair when fp16 is written out; only here is the GPU known."""
    if disable_amp or mixed_precision == "no":
        return None
    if device.type == "cpu":
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision 'fp16' is not supported on CPU; use 'bf16' or 'no'")
        return torch.bfloat16 if mixed_precision == "bf16" else None
    if mixed_precision == "auto":
        # including_emulation=False: pre-Ampere GPUs (T4, V100) "support" bf16 only by emulation,
        # several times slower than their fp16 tensor cores.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if not native and weight_dtype == "bf16":
            raise ConfigError(_no_native_bf16_message(device))
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def _no_native_bf16_message(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    gpu = (
        f"{getattr(props, 'name', 'this GPU')}, compute capability {props.major}.{getattr(props, 'minor', 0)}"
    )
    return (
        f"weight_dtype 'bf16' with mixed_precision 'auto': the GPU ({gpu}) has no native bf16, so 'auto' "
        "would compute in fp16 on bf16 weights. Set weight_dtype 'fp32' (fp16 autocast with a GradScaler: "
        "the usual choice on this GPU), or mixed_precision 'bf16' to compute in emulated bf16 (several "
        "times slower)."
    )


def make_grad_scaler(autocast_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler only for fp16 (bf16 and fp32 have the range to need none)."""
    if autocast_dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type, **_SCALER_INIT)


def configure_cuda_backends(device: torch.device, *, allow_tf32: bool, benchmark: bool = True) -> str:
    """Set the process-wide CUDA math modes; returns the start-up summary line ("" off CUDA).

    TF32 (`allow_tf32`): fp32 matmuls and convolutions on Ampere+ tensor cores with a 10-bit
    mantissa (on an H100 several times faster than full fp32; autocast's bf16/fp16 ops are
    unaffected, so it matters for fp32 runs and the fp32 parts of mixed ones). cuDNN autotuning
    (`benchmark`): aspect buckets repeat the same few shapes, so timing the conv algorithms once
    per shape pays back at once. The `deterministic` key (bitwise-repeatable GPU runs) must turn
    it off: pass `benchmark=not deterministic`.
    """
    if device.type != "cuda":
        return ""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = benchmark
    return f"TF32 matmul/conv {'on' if allow_tf32 else 'off'}, cudnn.benchmark {'on' if benchmark else 'off'}"
