"""Count the bytes a forward and backward pass keeps alive, on real or shadow tensors.

Two counters, both keyed by storage so views and in-place results are counted once:

* `LiveBytes`, a dispatch mode: every storage an operator returns is live from its creation
  until the last reference to it goes (a weak-reference callback), so `peak` is the largest sum
  of tensor bytes the step's operators hold at one time: activations, the gradients of
  activations, recomputed blocks under gradient checkpointing, parameter gradients (which it
  also reports apart, see `mark_gradient`). That is what a caching allocator's "allocated"
  counter sees, without its rounding and fragmentation. It follows torch's own
  `torch.distributed._tools.mem_tracker.MemTracker` (a private module, with per-module
  bookkeeping this planner does not need).
* `SavedBytes`, saved-tensor hooks: the bytes autograd keeps for the backward, parameters
  excluded (they are weights, counted once elsewhere).

The same counters run on the tiny model's real CPU step in the tests, so the plan's figures
are checked against what really happens, not against a formula.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from trainer.plan.emulation import mixed_type_norm_statistics
from trainer.plan.shadow import Call, shadow_call, storage_ids, storage_of, to_shadow

_FRESH = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


@dataclass(frozen=True)
class LivePeak:
    """The largest live total and how much of it were parameter gradients at that moment."""

    total: int
    gradients: int


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes created inside the mode, and their peak (see the module docstring)."""

    def __init__(self, granularity: int = 1) -> None:
        super().__init__()
        self._granularity = granularity  # allocation rounding (CUDA's caching allocator: 512)
        self._sizes = WeakIdKeyDictionary()  # storage -> [bytes, is_gradient]
        self._watched: dict[int, tuple[weakref.ref, list]] = {}  # the storages' death watches
        self.live = 0
        self.live_gradients = 0
        self.peak = LivePeak(0, 0)
        self.peak_other = 0  # the largest live total of everything but parameter gradients

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, storages = self._call(func, args, kwargs)
        # An output that shares an input's storage (a view, an in-place result, a no-op cast of
        # a weight) allocates nothing; only storages first seen as an output are counted. A
        # tensor built from Python data (`torch.tensor(list)`) is lifted: new, whatever the
        # mode (a fake or shadow tensor is a copy of it, a real one reuses it).
        inputs = set() if func in _FRESH else set(storages)
        self._track_outputs(out, inputs)
        return out

    def _call(self, func, args: tuple, kwargs: dict) -> tuple[object, list[int]]:
        """The operator's answer, and the ids of its arguments' storages."""
        out = func(*args, **kwargs)
        return out, storage_ids(args, kwargs)

    def _track_outputs(self, out, inputs: set[int]) -> None:
        if isinstance(out, torch.Tensor):
            if id(storage_of(out)) not in inputs:
                self._track(out)
        elif type(out) in (list, tuple):
            for leaf in out:
                self._track_outputs(leaf, inputs)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = storage_of(tensor)
        if storage in self._sizes:
            return
        size = storage.nbytes()
        entry = [-(-size // self._granularity) * self._granularity, False]
        self._sizes[storage] = entry
        # a weak reference's callback (what `weakref.finalize` does, without its bookkeeping)
        watch = weakref.ref(storage, self._released)
        self._watched[id(watch)] = (watch, entry)
        self.live += entry[0]
        self._update_peak()

    def _released(self, watch: weakref.ref) -> None:
        _, entry = self._watched.pop(id(watch))
        self.live -= entry[0]
        if entry[1]:
            self.live_gradients -= entry[0]

    def _update_peak(self) -> None:
        if self.live > self.peak.total:
            self.peak = LivePeak(self.live, self.live_gradients)
        self.peak_other = max(self.peak_other, self.live - self.live_gradients)

    def mark_gradient(self, grad: torch.Tensor) -> None:
        """Count `grad`'s storage as a parameter gradient (call from a post-accumulate-grad hook)."""
        entry = self._sizes.get(storage_of(grad))
        if entry is None:  # made outside the mode: count it from now on
            self._track(grad)
            entry = self._sizes[storage_of(grad)]
        if not entry[1]:
            entry[1] = True
            self.live_gradients += entry[0]
            self._update_peak()


class ShadowLiveBytes(LiveBytes):
    """`LiveBytes` over `emulation.MixedTypeNormStatistics` over `Shadow`'s own dispatch, as one
    mode: the planning passes' operators, with the same answers and the same counts, for one
    Python dispatch per operator instead of three (the passes spend their time in dispatch)."""

    def _call(self, func, args: tuple, kwargs: dict) -> tuple[object, list[int]]:
        call = Call(func, args, kwargs)
        out = to_shadow(shadow_call(func, args, kwargs, call)) if call.shadow else func(*args, **kwargs)
        storages = call.storages
        if _mutates(func):  # an in-place operator may have given an argument another storage
            storages = storage_ids(args, kwargs)
        return mixed_type_norm_statistics(func, args, out), storages


_MUTATES: dict = {}


def _mutates(func) -> bool:
    mutates = _MUTATES.get(func)
    if mutates is None:
        schema = getattr(func, "_schema", None)
        mutates = _MUTATES[func] = schema is None or schema.is_mutable
    return mutates


class SavedBytes:
    """Bytes autograd saves for backward while the context is active, each storage once."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = WeakIdKeyDictionary({storage_of(t): True for t in exclude})
        self._saved = WeakIdKeyDictionary()
        self.total = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = storage_of(tensor)
        if storage not in self._excluded and storage not in self._saved:
            self._saved[storage] = True
            self.total += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _identity):
            yield self


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
