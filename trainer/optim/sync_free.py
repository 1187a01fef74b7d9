"""Optimizer classes without the host syncs their libraries make once per parameter.

On a GPU every host sync stalls the queue of kernels until the device has caught up; the
training step is designed to make one (the finiteness check). Two libraries' optimizers make one
per parameter (~880 for SD1.5's UNet + text encoder) where nothing needs it.
`without_host_syncs(spec, cls)` returns, for those, a thin subclass that leaves every update
bit for bit as the library computes it (tests/test_step_syncs.py counts the syncs;
the same file compares the updates with the library's); every other class comes back as is.

**bitsandbytes** (`Optimizer8bit.step`, all its 8-bit, 32-bit and paged optimizers) calls
`sync_gpu(p)` (`torch.cuda.synchronize()`) after every parameter's update. Paged optimizers
need it: their state lives in CUDA unified memory, prefetched to the device before each update,
and those migrations are asynchronous. Nothing else does, as long as the update kernels are
ordered with PyTorch's work: bitsandbytes launches them without a stream, that is on the CUDA
default stream, which is also PyTorch's current stream unless the caller switched to another
one. So the subclass's `step` does what bitsandbytes' does, minus the per-parameter sync, when
the optimizer is not paged and every parameter is on the CPU (where `sync_gpu` does nothing) or
on a CUDA device whose current stream is the default stream; otherwise (paged, a side stream,
XPU or another device) it runs bitsandbytes' own `step` unchanged, syncs included. bitsandbytes
has a pull request doing the same upstream (launch on the current stream, no sync when nothing
is paged: bitsandbytes-foundation/bitsandbytes#2050). The subclass is only made when the class
uses `Optimizer8bit.step` itself and the internals that step calls exist; else the class keeps
its syncs.

**Adafactor** (transformers) with `scale_parameter` (the default) scales its step size by
`max(eps2, RMS(p))`, where `RMS(p)` is a device tensor: Python's `max` compares them on the host
(`Tensor.__bool__`, a sync) once per parameter per update, and once more when its `adafactor`
LR schedule reports the value. The subclass's `_get_lr` takes the same maximum on the device:
`where(RMS > eps2, RMS * step, eps2 * step)`, the same products of the same operands as the
library's two branches (one fp32 product, one Python float the update rounds to fp32 when it
multiplies), so the update is bitwise the same. With `weight_decay` != 0 Adafactor passes the
step size as `alpha` of an `add_`, which reads a tensor anyway (and would round the product
differently): the library's `_get_lr` is kept there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from trainer.optim.spec import OptimizerSpec

if TYPE_CHECKING:
    from bitsandbytes.optim.optimizer import Optimizer8bit
    from transformers.optimization import Adafactor

# The methods the sync-free bitsandbytes step calls (besides the `initialized` and `is_paged`
# attributes); a bitsandbytes version without one of them keeps its own step, syncs included.
_BNB_METHODS = ("check_overrides", "to_gpu", "init_state", "update_step")


# The subclasses made so far, one per library class (a class is made once, like the library's).
# Plain dicts, not functools.cache: mypy does not accept torch's optimizer classes as hashable.
_ADAFACTOR_CLASSES: dict[type[torch.optim.Optimizer], type[torch.optim.Optimizer]] = {}
_BNB_CLASSES: dict[type[torch.optim.Optimizer], type[torch.optim.Optimizer]] = {}


def without_host_syncs(spec: OptimizerSpec, cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls`, or its subclass without the per-parameter host syncs (module docstring)."""
    if spec.name == "adafactor":
        from transformers.optimization import Adafactor

        # The catalogue's "adafactor" entry is transformers' Adafactor (catalogue.py).
        assert issubclass(cls, Adafactor), f"optimizer 'adafactor' loaded {cls}, not transformers' Adafactor"
        if cls not in _ADAFACTOR_CLASSES:
            _ADAFACTOR_CLASSES[cls] = _adafactor(cls)
        return _ADAFACTOR_CLASSES[cls]
    if spec.package == "bitsandbytes":
        return _bitsandbytes(cls)
    return cls


def _adafactor(cls: type[Adafactor]) -> type[torch.optim.Optimizer]:
    library_get_lr = cls._get_lr

    def _get_lr(param_group: dict, param_state: dict) -> float | torch.Tensor:
        rms = param_state.get("RMS")
        if not (
            param_group["scale_parameter"]
            and torch.is_tensor(rms)
            and param_group.get("weight_decay", 0.0) == 0
        ):
            return library_get_lr(param_group, param_state)
        rel_step_sz = param_group["lr"]
        if param_group["relative_step"]:
            min_step = 1e-6 * param_state["step"] if param_group["warmup_init"] else 1e-2
            rel_step_sz = min(min_step, 1.0 / math.sqrt(param_state["step"]))
        eps2 = param_group["eps"][1]
        # the library: max(eps2, RMS) * rel_step_sz, with the comparison read on the host
        return torch.where(rms > eps2, rms * rel_step_sz, eps2 * rel_step_sz)

    return type(
        cls.__name__,
        (cls,),
        {
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__doc__ or ''}\n\n(trainer: `_get_lr` without a host read; trainer/optim/sync_free.py)",
            "_get_lr": staticmethod(_get_lr),
        },
    )


def _bitsandbytes(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if not issubclass(cls, Optimizer8bit):
        return cls
    library_step = Optimizer8bit.__dict__["step"]
    for klass in cls.__mro__[: cls.__mro__.index(Optimizer8bit)]:
        own = klass.__dict__.get("step")  # torch hooks a constructed class's step in place
        if own is not None and inspect.unwrap(own) is not inspect.unwrap(library_step):
            return cls  # a step of its own: not the loop this subclass replaces
    if not all(callable(getattr(Optimizer8bit, name, None)) for name in _BNB_METHODS):
        return cls
    if cls not in _BNB_CLASSES:  # `library_step` is the same function for every class
        _BNB_CLASSES[cls] = _bnb_subclass(cls, library_step)
    return _BNB_CLASSES[cls]


def _bnb_subclass(cls: type[Optimizer8bit], library_step: Callable[..., Any]) -> type[torch.optim.Optimizer]:
    @torch.no_grad()
    def step(self, closure=None):
        """bitsandbytes' `Optimizer8bit.step` without its `sync_gpu` after every parameter,
        when nothing needs it (trainer/optim/sync_free.py); else bitsandbytes' step itself."""
        if self.is_paged or not _ordered_without_sync(self.param_groups):
            return library_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                # prefetch_state does nothing unpaged
                self.update_step(group, p, gindex, pindex)
        return loss

    return type(
        cls.__name__,
        (cls,),
        {
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__doc__ or ''}\n\n(trainer: no per-parameter device sync unless paged; "
            "trainer/optim/sync_free.py)",
            "step": step,
        },
    )


def _ordered_without_sync(param_groups: list[dict]) -> bool:
    """Whether bitsandbytes' kernels (launched on the default stream) are ordered with PyTorch's
    work on every device of these parameters: the CPU, or CUDA with the default stream current."""
    devices = {p.device for group in param_groups for p in group["params"]}
    for device in devices:
        if device.type == "cpu":
            continue
        if device.type != "cuda" or torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
            return False
    return True
