"""Make the planning pass (shadow CPU tensors) keep what a CUDA step keeps.

The pass runs the real training step on shadow tensors of device type "cpu": their operators
allocate nothing, and CPU autocast applies its real casting policy. What differs on CUDA:

* attention: on CPU, SDPA takes its flash kernel, which keeps the output and a log-sum-exp of
  (batch, heads, tokens) fp32 for the backward; CUDA's flash and cuDNN kernels keep the same
  two (plus two 8-byte RNG offsets), the memory-efficient kernel (fp32 inputs) pads the
  log-sum-exp to a multiple of 32 tokens (none for SD's 4096/1024/256/64 latent tokens, 3% for
  77 text tokens). So the CPU kernel's saved tensors stand for CUDA's, and for xformers'.
* autocast: CUDA autocast runs group_norm and layer_norm in fp32 ("CUDA Ops that can autocast
  to float32", torch.amp docs), so their low-precision inputs are copied up to fp32 and the fp32
  outputs travel on to the next convolution; CPU autocast leaves both in bf16. The other
  operators on that list (softmax, exp, pow, sum, the losses) are fp32 in SD's step anyway or
  inside fused kernels. `use_cuda_autocast_norms` gives the shadow model's norm layers CUDA's
  behaviour by changing their class (as trainer/parts/lean_blocks.py does), so the layers run the same
  way when gradient checkpointing recomputes them in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_LOW = (torch.float16, torch.bfloat16)


def _upcast_under_autocast(x: torch.Tensor) -> bool:
    return x.dtype in _LOW and torch.is_autocast_enabled(x.device.type)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class CudaAutocastGroupNorm(nn.GroupNorm):
    """GroupNorm as CUDA autocast runs it: in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _upcast_under_autocast(x):
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, _fp32(self.weight), _fp32(self.bias), self.eps)


class CudaAutocastLayerNorm(nn.LayerNorm):
    """LayerNorm as CUDA autocast runs it: in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _upcast_under_autocast(x):
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps)


def use_cuda_autocast_norms(*modules: nn.Module) -> int:
    """Give every GroupNorm / LayerNorm in `modules` CUDA autocast's fp32 behaviour; how many."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if type(layer) is nn.GroupNorm:
                layer.__class__ = CudaAutocastGroupNorm
                count += 1
            elif type(layer) is nn.LayerNorm:
                layer.__class__ = CudaAutocastLayerNorm
                count += 1
    return count


_NORM_WEIGHT_ARG = {torch.ops.aten.native_group_norm.default: 1, torch.ops.aten.native_layer_norm.default: 2}


class MixedTypeNormStatistics(TorchDispatchMode):
    """Norm statistics in the dtype the CPU and CUDA kernels give them: the mean and reciprocal
    std that autograd saves for the backward are fp32 for a bf16/fp16 input with fp32 weights
    (a "mixed type" call: autocast on fp32 modules), else the input's dtype (`param_scalar_type`
    in both kernels). The meta kernels differ (layer_norm's are always fp32, group_norm's the
    input's dtype); this mode gives the planning pass the real ones (`mixed_type_norm_statistics`,
    which `tracker.ShadowLiveBytes` applies itself)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return mixed_type_norm_statistics(func, args, func(*args, **(kwargs or {})))


def mixed_type_norm_statistics(func, args, out):
    """`out`, the answer of `func(*args)`, with a norm's statistics in the real kernels' dtype
    (`MixedTypeNormStatistics`); any other operator's answer as it is."""
    index = _NORM_WEIGHT_ARG.get(func)
    if index is None:
        return out
    x, weight = args[0], args[index]
    mixed = x.dtype in _LOW and weight is not None and weight.dtype == torch.float32
    dtype = torch.float32 if mixed else x.dtype
    output, mean, rstd = out
    if mean.dtype == dtype:
        return out
    return output, torch.empty_like(mean, dtype=dtype), torch.empty_like(rstd, dtype=dtype)
