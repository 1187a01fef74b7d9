"""Keep each parameter's memory layout (and storage) across optimizer steps.

Why: `channels_last` stores the UNet's conv weights as NHWC, but bitsandbytes' optimizers (the
default `adamw8bit`) run `p.data = p.data.contiguous()` before each update. After the first step
the weights are NCHW again in new storage: every later convolution converts them back (the
speed-up is gone) and, under `compile`, the changed strides recompile the graph. The hooks here
record each non-contiguous parameter's tensor before the step and, when the optimizer replaced
it, copy the result back into the recorded tensor: the layout and the storage address stay the
same for the whole run. Optimizers that update in place (torch's) pay nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LayoutKeeper:
    """Step hooks on one optimizer; `remove()` detaches them."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def _before(self, optimizer, args, kwargs) -> None:
        self._kept = [
            (p, p.data)
            for group in optimizer.param_groups
            for p in group["params"]
            if not p.data.is_contiguous()
        ]

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        for p, kept in self._kept:
            if p.data.data_ptr() != kept.data_ptr() or p.data.stride() != kept.stride():
                kept.copy_(p.data)
                p.data = kept
        self._kept = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def keep_parameter_layouts(optimizers: Iterable[torch.optim.Optimizer]) -> list[LayoutKeeper]:
    """Attach a LayoutKeeper to every optimizer (e.g. all of an OptimizerSet's)."""
    return [LayoutKeeper(opt) for opt in optimizers]
