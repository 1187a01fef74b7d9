"""Shadow tensors: CPU tensors in every respect the step can see, with no data behind them.

A `Shadow` is a tensor subclass whose device is "cpu" (so CPU autocast casts it and PyTorch
picks the CPU kernels) and whose every operator runs on a meta tensor (`elem`): shapes, dtypes,
strides and views are exact, nothing is allocated or computed. It is what
`torch._subclasses.FakeTensorMode` offers, minus its caching and symbolic shapes, which made
the planning pass five times slower; nothing here needs them.

One operator needs the real CPU answer rather than the meta one: `_fused_sdp_choice`, which
picks the attention kernel from the inputs' shapes and dtypes (the meta answer is the math
kernel, which would keep the whole attention matrix). It is asked of empty CPU tensors of the
same shapes. Real CPU tensors an operator meets (a caption's token ids, noise drawn from a
host generator) are turned into meta ones on the way in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

_SDP_CHOICE = torch.ops.aten._fused_sdp_choice.default


class Shadow(torch.Tensor):
    """A CPU-typed tensor backed by a meta tensor (see the module docstring)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        shadow = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device="cpu",
            requires_grad=requires_grad,
        )
        shadow.elem = elem
        return shadow

    def __repr__(self) -> str:
        return f"Shadow(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _SDP_CHOICE:
            return func(*tree_map(_empty_cpu, args), **tree_map(_empty_cpu, kwargs or {}))
        out = func(*tree_map(_to_meta, args), **_meta_kwargs(kwargs or {}))
        return tree_map(_to_shadow, out)

    __torch_function__ = torch._C._disabled_torch_function_impl


def _to_meta(x):
    if isinstance(x, Shadow):
        return x.elem
    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        return x.to("meta")
    return x


def _meta_kwargs(kwargs: dict) -> dict:
    out = tree_map(_to_meta, kwargs)
    if "device" in out and torch.device(out["device"]).type == "cpu":
        out["device"] = torch.device("meta")
    return out


def _to_shadow(x):
    return Shadow(x) if isinstance(x, torch.Tensor) and x.device.type == "meta" else x


def _empty_cpu(x):
    if isinstance(x, Shadow):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    return x


def shadow_zeros(*shape: int, dtype: torch.dtype = torch.float32) -> Shadow:
    return Shadow(torch.zeros(*shape, dtype=dtype, device="meta"))


def storage_of(tensor: torch.Tensor) -> torch.UntypedStorage:
    """The storage a tensor's bytes live in (a shadow's is its meta tensor's)."""
    return tensor.elem.untyped_storage() if isinstance(tensor, Shadow) else tensor.untyped_storage()


def shadow_module(module: nn.Module) -> nn.Module:
    """Replace every parameter and buffer of a meta-device module by a Shadow, in place."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(Shadow(param.data), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = Shadow(buffer)
    return module
