"""Run modules compiled in place (`module.compile()`) eagerly for a while: sampling, validation.

Why: the training graph is compiled for the training step's grad mode and shapes. Sampling
(no_grad, a doubled CFG batch, many timesteps) and validation (no_grad) would each trigger new
compilations of the same module, cost compile time at every sample point and can push dynamo
to its recompile limit or to dynamic shapes for the training graph too. They run a handful of
forwards where eager speed is fine, so they skip the compiled path instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eager(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, modules compiled with `module.compile()` call their eager forward."""
    saved = [
        (m, m._compiled_call_impl) for m in modules if m is not None and m._compiled_call_impl is not None
    ]
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, impl in saved:
            module._compiled_call_impl = impl
