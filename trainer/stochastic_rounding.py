"""bf16 weights without fp32 master copies: update in fp32, round back stochastically.

Why: storing weights in bf16 halves their memory, but bf16 has 8 mantissa bits, so an update
smaller than half a unit in the last place (at weight 1.0 that is 2^-8 ~ 0.004; typical
fine-tuning updates are 1e-6..1e-4) is lost completely by round-to-nearest: the weights never
move. Stochastic rounding rounds up with probability equal to the remainder's fraction of the
gap, so the rounded weight equals the fp32 result *in expectation* and small updates accumulate
on average (Gupta et al. 2015, "Deep learning with limited numerical precision"; used for bf16
training by OneTrainer and others).

`stochastic_round_` is the rounding; `step_with_stochastic_rounding` runs any optimizer's step
on bf16 parameters by temporarily giving each an fp32 copy of its weight and gradient (so the
optimizer's state is created and kept in fp32, or 8-bit), then rounding the result into the
bf16 storage. Peak extra memory is an fp32 copy of every parameter being stepped; with the fused
backward step (trainer/optim/fused_backward.py, one parameter at a time) it is one parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_LOW_BITS = 1 << 16  # bf16 is the upper 16 bits of an fp32


def stochastic_round_(dst_bf16: Tensor, src_fp32: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write `src_fp32` rounded stochastically to bf16 into `dst_bf16` (in place); returns it.

    Adds uniform random bits below bf16's precision to the fp32 bit pattern, then truncates:
    a value a fraction f of the way between two bf16 neighbours rounds up with probability f.
    Works for both signs (sign-magnitude: the bits add to the magnitude). NaN stays NaN, +-inf
    stays inf; a value within one bf16 ulp of the largest finite bf16 may round to inf. The
    random bits come from `generator` (on the tensors' device), so the result is reproducible.
    """
    if dst_bf16.dtype != torch.bfloat16:
        raise TypeError(f"dst must be bfloat16, got {dst_bf16.dtype}")
    if src_fp32.dtype != torch.float32:
        raise TypeError(f"src must be float32, got {src_fp32.dtype}")
    if dst_bf16.shape != src_fp32.shape:
        raise ValueError(f"shape mismatch: dst {tuple(dst_bf16.shape)} vs src {tuple(src_fp32.shape)}")
    noise = torch.randint(
        0, _LOW_BITS, src_fp32.shape, dtype=torch.int32, device=src_fp32.device, generator=generator
    )
    bits = src_fp32.contiguous().view(torch.int32) + noise
    bits = bits & -_LOW_BITS  # clear the low 16 bits (two's complement mask 0xFFFF0000)
    rounded = bits.view(torch.float32)
    rounded = torch.where(torch.isnan(src_fp32), src_fp32, rounded)
    dst_bf16.copy_(rounded)  # exact: only bf16-representable bits remain
    return dst_bf16


@torch.no_grad()
def step_with_stochastic_rounding(
    optimizer: torch.optim.Optimizer, generator: torch.Generator | None
) -> None:
    """`optimizer.step()` where bf16 parameters are updated in fp32 and rounded stochastically.

    For each bf16 parameter with a gradient: swap in fp32 copies of weight and gradient, step,
    round the new fp32 weight into the original bf16 storage, swap back (the gradient returns as
    bf16). Parameters of other dtypes are stepped normally. The optimizer state is created from
    the fp32 copies, so it is fp32 (or the optimizer's own 8-bit format), never bf16.
    """
    swapped: list[tuple[torch.nn.Parameter, Tensor, Tensor]] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None or p.dtype != torch.bfloat16:
                continue
            low, low_grad = p.data, p.grad
            p.grad = None
            p.data = low.float()
            p.grad = low_grad.float()
            swapped.append((p, low, low_grad))
    optimizer.step()
    for p, low, low_grad in swapped:
        stochastic_round_(low, p.data, generator)
        p.grad = None
        p.data = low
        p.grad = low_grad


class StochasticRounding:
    """The random bits of bf16 stochastic rounding as resumable state (one generator per run).

    Its generator lives on the weights' device, so rounding draws no host-side randomness and a
    resumed run continues the same stream (`state_dict` / `load_state_dict`).
    """

    def __init__(self, device: torch.device | str, seed: int) -> None:
        self.generator = torch.Generator(torch.device(device)).manual_seed(int(seed))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        step_with_stochastic_rounding(optimizer, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@contextmanager
def fp32_params(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Show bf16 parameters as fp32 (uninitialised placeholders) inside the block.

    For `optimizer.load_state_dict`: torch casts loaded state tensors to their parameter's dtype,
    which would round fp32 moments to bf16 (breaking exact resume and the fp32 step). Only the
    dtype matters there, so the placeholders are never filled.
    """
    swapped = []
    with torch.no_grad():
        for p in params:
            if p.dtype == torch.bfloat16:
                swapped.append((p, p.data))
                p.data = torch.empty_like(p.data, dtype=torch.float32)
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data
