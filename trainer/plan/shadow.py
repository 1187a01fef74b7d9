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

Many meta kernels are Python (torch's reference implementations: a millisecond for an `add`),
and a UNet calls the same operator on the same shapes over and over (its repeated blocks, the
backward, a checkpointed block's recompute, each re-plan of the advice). So `meta_call`
remembers, per operator and input signature (shapes, strides, dtypes, the other arguments),
the layout of what it returned, and makes fresh outputs of that layout directly: only for
operators that neither mutate nor alias their inputs, and only when an output is a plain,
fresh, dense tensor that `torch.empty_strided` reproduces exactly (its storage size included).
The answer is the meta kernel's own, as computed the first time.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

_SDP_CHOICE = torch.ops.aten._fused_sdp_choice.default
_META = torch.device("meta")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


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
            device=torch.device("cpu"),
            requires_grad=requires_grad,
        )
        shadow.elem = elem
        return shadow

    def __repr__(self) -> str:  # type: ignore[override]  # no contents to show: torch's takes tensor_contents
        return f"Shadow(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return to_shadow(shadow_call(func, args, kwargs or {}))

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]  # torch's own idiom for subclasses


class Call:
    """An operator's arguments with the meta tensors behind them, from one walk over them:
    `meta_args` / `meta_kwargs` (what the meta kernel gets), `storages` (the ids of the
    arguments' own storages, for `tracker.LiveBytes`), `shadow` (whether any is a Shadow) and
    `key` (a hashable signature of everything a meta kernel's answer depends on, or None)."""

    __slots__ = ("key", "meta_args", "meta_kwargs", "shadow", "storages")

    def __init__(self, func, args: tuple, kwargs: dict) -> None:
        self.storages: list[int] = []
        self.shadow = False
        self.key: tuple | None = ()
        self.meta_args, args_key = self._walk(args)
        self.meta_kwargs, kwargs_key = {}, []
        for name, value in kwargs.items():
            self.meta_kwargs[name], value_key = self._walk(value)
            kwargs_key.append((name, value_key))
        if "device" in self.meta_kwargs and torch.device(self.meta_kwargs["device"]).type == "cpu":
            self.meta_kwargs["device"] = _META
        if self.key is not None:
            self.key = (func, torch.get_default_dtype(), args_key, tuple(kwargs_key))

    def _walk(self, x):
        """(x with its tensors' meta ones, x's signature); a flat walk over lists and tuples
        (what operator arguments nest in) for `torch.utils._pytree`'s generic one."""
        t = type(x)
        if t is Shadow or (t is not torch.Tensor and isinstance(x, Shadow)):
            meta = x.elem
            self.shadow = True
            self.storages.append(id(meta.untyped_storage()))
            return meta, (meta.dtype, meta.shape, meta.stride(), meta.storage_offset())
        if t is list or t is tuple:
            metas, keys = [], []
            for v in x:
                meta, key = self._walk(v)
                metas.append(meta)
                keys.append(key)
            return t(metas), (t, tuple(keys))
        if isinstance(x, torch.Tensor):
            self.storages.append(id(x.untyped_storage()))
            meta = x.to("meta") if x.device.type == "cpu" else x
            if type(meta) is not torch.Tensor or meta.device.type != "meta":
                self.key = None
                return meta, None
            return meta, (meta.dtype, meta.shape, meta.stride(), meta.storage_offset())
        if t in _PLAIN:
            return x, (t, x)
        self.key = None  # a generator, a symbolic size, anything else: computed every time
        return x, None


_PLAIN = frozenset(
    {bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format}
)


def shadow_call(func, args: tuple, kwargs: dict, call: Call | None = None):
    """`func` on the meta tensors behind `args` (see the module docstring); its outputs are meta
    tensors, not yet wrapped (`to_shadow`), except `_fused_sdp_choice`'s answer. `call`: the
    arguments' walk, when the caller made it."""
    if func is _SDP_CHOICE:
        return func(*_map(_empty_cpu, args), **{k: _map(_empty_cpu, v) for k, v in kwargs.items()})
    call = call or Call(func, args, kwargs)
    return meta_call(func, call)


def _map(fn, x):
    if type(x) in (list, tuple):
        return type(x)(_map(fn, v) for v in x)
    return fn(x)


def to_shadow(x):
    if isinstance(x, torch.Tensor):
        return Shadow(x) if x.device.type == "meta" else x
    if type(x) in (list, tuple):
        return type(x)(to_shadow(v) for v in x)
    return x


def _empty_cpu(x):
    if isinstance(x, Shadow):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    return x


# --- meta kernels, remembered (module docstring) ---------------------------------------------

_UNCACHEABLE = object()
_LAYOUTS: dict = {}  # Call.key -> the layout of the answer, or _UNCACHEABLE
_OPERATOR_CACHEABLE: dict = {}  # operator -> False when it mutates or aliases its inputs


def _layout(out, inputs: set[int]):
    """How to remake `out` (a meta kernel's answer), or None when `empty_strided` cannot."""
    if isinstance(out, torch.Tensor):
        if type(out) is not torch.Tensor or out.device.type != "meta" or out.requires_grad:
            return None
        storage = out.untyped_storage()
        if id(storage) in inputs or out.storage_offset() != 0 or out.is_conj() or out.is_neg():
            return None
        inputs.add(id(storage))  # two outputs sharing a storage: the second is not fresh
        layout = (tuple(out.shape), out.stride(), out.dtype)
        if _remake(layout).untyped_storage().nbytes() != storage.nbytes():
            return None
        return layout
    if type(out) in (list, tuple):
        parts = []
        for v in out:
            part = _layout(v, inputs)
            if part is None:
                return None
            parts.append(part)
        return (type(out), tuple(parts))
    if out is None or type(out) in (bool, int, float):
        return ("value", out)
    return None


def _remake(layout):
    if len(layout) == 3:
        shape, stride, dtype = layout
        return torch.empty_strided(shape, stride, dtype=dtype, device=_META)
    kind, value = layout
    if kind == "value":
        return value
    return kind(_remake(v) for v in value)


def _operator_cacheable(func) -> bool:
    cacheable = _OPERATOR_CACHEABLE.get(func)
    if cacheable is None:
        schema = getattr(func, "_schema", None)
        cacheable = (
            isinstance(func, torch._ops.OpOverload)
            and schema is not None
            and not schema.is_mutable
            and not func.is_view
            and not any(a.alias_info is not None for a in schema.arguments)
            and not any(r.alias_info is not None for r in schema.returns)
        )
        _OPERATOR_CACHEABLE[func] = cacheable
    return cacheable


def meta_call(func, call: Call):
    """`func` on `call`'s meta tensors, its answer remembered (module docstring)."""
    args, kwargs = call.meta_args, call.meta_kwargs
    if call.key is None or not _operator_cacheable(func):
        return func(*args, **kwargs)
    layout = _LAYOUTS.get(call.key)
    if layout is _UNCACHEABLE:
        return func(*args, **kwargs)
    if layout is not None:
        return _remake(layout)
    out = func(*args, **kwargs)
    layout = _layout(out, set(storage_ids(args, kwargs)))
    _LAYOUTS[call.key] = _UNCACHEABLE if layout is None else layout
    return out


def storage_ids(*trees) -> list[int]:
    """The ids of the storages of the tensors in operator arguments (lists, tuples, the keyword
    dict: what `torch.utils._pytree.tree_leaves` would walk there)."""
    acc: list[int] = []
    for tree in trees:
        _collect_storage_ids(tree, acc)
    return acc


def _collect_storage_ids(x, acc: list[int]) -> None:
    if isinstance(x, torch.Tensor):
        acc.append(id(storage_of(x)))
    elif type(x) in (list, tuple):
        for v in x:
            _collect_storage_ids(v, acc)
    elif type(x) is dict:
        for v in x.values():
            _collect_storage_ids(v, acc)


def shadow_zeros(*shape: int, dtype: torch.dtype = torch.float32) -> Shadow:
    return Shadow(torch.zeros(*shape, dtype=dtype, device="meta"))


def storage_of(tensor: torch.Tensor) -> torch.UntypedStorage:
    """The storage a tensor's bytes live in (a shadow's is its meta tensor's)."""
    return tensor.elem.untyped_storage() if isinstance(tensor, Shadow) else tensor.untyped_storage()


def shadow_module(module: ModuleT) -> ModuleT:
    """Replace every parameter and buffer of a meta-device module by a Shadow, in place."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(Shadow(param.data), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = Shadow(buffer)
    return module
