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
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from trainer.plan.shadow import storage_of

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
        self.live = 0
        self.live_gradients = 0
        self.peak = LivePeak(0, 0)
        self.peak_other = 0  # the largest live total of everything but parameter gradients

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place result, a no-op cast of
        # a weight) allocates nothing; only storages first seen as an output are counted. A
        # tensor built from Python data (`torch.tensor(list)`) is lifted: new, whatever the
        # mode (a fake or shadow tensor is a copy of it, a real one reuses it).
        inputs = set()
        if func not in _FRESH:
            inputs = {
                id(storage_of(leaf)) for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
            }
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and id(storage_of(leaf)) not in inputs:
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = storage_of(tensor)
        if storage in self._sizes:
            return
        size = storage.nbytes()
        entry = [-(-size // self._granularity) * self._granularity, False]
        self._sizes[storage] = entry
        weakref.finalize(storage, self._release, entry)
        self.live += entry[0]
        self._update_peak()

    def _release(self, entry: list) -> None:
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
