"""bf16 weights without fp32 master copies: update in fp32, round back stochastically.

Why: storing weights in bf16 halves their memory, but bf16 has 8 mantissa bits, so an update
smaller than half a unit in the last place (at weight 1.0 that is 2^-8 ~ 0.004; typical
fine-tuning updates are 1e-6..1e-4) is lost completely by round-to-nearest: the weights never
move. Stochastic rounding rounds up with probability equal to the remainder's fraction of the
gap, so the rounded weight equals the fp32 result *in expectation* and small updates accumulate
on average (Gupta et al. 2015, "Deep learning with limited numerical precision"; used for bf16
training by OneTrainer and others).

`stochastic_round_` is the rounding; `step_with_stochastic_rounding` runs any optimizer's step
on bf16 parameters by giving it fp32 stand-ins of the weights and gradients, chunk by chunk (so
the optimizer's state is created and kept in fp32, or 8-bit), then rounding each chunk into the
bf16 storage. The stand-ins are the only memory proportional to what is stepped (4 bytes of
weight and 4 of gradient per element: one chunk of 64 MiB of fp32 weights by default; one
parameter under the fused backward step, trainer/optim/fused_backward.py; everything for the
optimizers that adapt over all parameters). The rounding itself works in place on the
stand-ins' int32 view, `ROUND_CHUNK_ELEMENTS` at a time, so its own temporaries (random bits,
NaN mask) are a few MiB whatever the size: done in one pass it took ~19 bytes per element,
0.9 GiB for SD1.5's token embedding and ~23 GiB for Prodigy over UNet + text encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_BITS = 1 << 16  # bf16 is the upper 16 bits of an fp32


# Elements rounded per pass: the random bits (int32) and NaN mask of one pass are its only
# temporaries (5 bytes per element: 20 MiB), and the passes are few enough (~250 for the SD1.5
# UNet) that their kernel launches cost nothing next to the optimizer step.
ROUND_CHUNK_ELEMENTS = 1 << 22


def round_in_place_(x_fp32: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round the fp32 values of contiguous `x_fp32` stochastically to bf16-representable fp32
    values, in place; returns it. Copying the result to bf16 is then exact.

    Adds uniform random bits below bf16's precision to the fp32 bit pattern (through the int32
    view, in place), then clears them: a value a fraction f of the way between two bf16
    neighbours rounds up with probability f. Works for both signs (sign-magnitude: the bits add
    to the magnitude). NaN stays NaN, +-inf stays inf; a value within one bf16 ulp of the
    largest finite bf16 may round to inf. The random bits come from `generator` (on the
    tensor's device), `ROUND_CHUNK_ELEMENTS` at a time; on CPU the generator draws in sequence,
    so the bits equal one draw for the whole tensor.
    """
    if x_fp32.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x_fp32.dtype}")
    if not x_fp32.is_contiguous():
        raise ValueError("x must be contiguous (its int32 view is rounded in place)")
    flat = x_fp32.view(-1)
    noise = torch.empty(min(flat.numel(), ROUND_CHUNK_ELEMENTS), dtype=torch.int32, device=flat.device)
    for start in range(0, flat.numel(), ROUND_CHUNK_ELEMENTS):
        values = flat[start : start + ROUND_CHUNK_ELEMENTS]
        bits, draw = values.view(torch.int32), noise[: values.numel()]
        nan = torch.isnan(values)
        draw.random_(0, _LOW_BITS, generator=generator)
        bits.add_(draw).bitwise_and_(-_LOW_BITS)  # two's complement mask 0xFFFF0000
        values.masked_fill_(nan, float("nan"))  # the carry may have made a NaN finite or inf
    return x_fp32


def stochastic_round_(dst_bf16: Tensor, src_fp32: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write `src_fp32` rounded stochastically to bf16 into `dst_bf16` (in place); returns it.

    `src_fp32` is left unchanged: each `ROUND_CHUNK_ELEMENTS` slice is copied, rounded in place
    (`round_in_place_`) and written to `dst_bf16`, so the extra memory is one slice.
    """
    if dst_bf16.dtype != torch.bfloat16:
        raise TypeError(f"dst must be bfloat16, got {dst_bf16.dtype}")
    if src_fp32.dtype != torch.float32:
        raise TypeError(f"src must be float32, got {src_fp32.dtype}")
    if dst_bf16.shape != src_fp32.shape:
        raise ValueError(f"shape mismatch: dst {tuple(dst_bf16.shape)} vs src {tuple(src_fp32.shape)}")
    src, dst = src_fp32.reshape(-1), dst_bf16.view(-1)
    for start in range(0, src.numel(), ROUND_CHUNK_ELEMENTS):
        part = src[start : start + ROUND_CHUNK_ELEMENTS].clone()
        dst[start : start + part.numel()].copy_(round_in_place_(part, generator))
    return dst_bf16


# fp32 weights + gradients made at once for one optimizer call (bounded memory, few launches).
DEFAULT_CHUNK_BYTES = 64 * 2**20


@torch.no_grad()
def step_with_stochastic_rounding(
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    *,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> None:
    """`optimizer.step()` where bf16 parameters are updated in fp32 and rounded stochastically.

    The optimizer steps fp32 *stand-ins*: views into one flat fp32 buffer per chunk, filled
    from the bf16 weights and gradients with one foreach copy each, put in the optimizer's
    param groups (and its state moved to them) for the call. The result is rounded in place in
    the flat buffer (`round_in_place_`) and copied back into the bf16 storage. The model's parameters
    are never retyped: swapping `p.data` to fp32 resets the autograd gradient accumulator that
    DDP hooks into, so replicas silently stopped all-reducing after the first step.

    Chunks of at most `chunk_bytes` of fp32 weights (at least one parameter; None = all at
    once) bound the extra memory to 2x the chunk (weights and gradients) plus the rounding's few
    MiB, instead of fp32 copies of every weight and gradient together (+7 GB for the SD1.5 UNet). Optimizers that adapt their step size over
    all parameters (D-Adaptation, Prodigy: param groups carry `d`) get a single call. Other
    dtypes are stepped normally, once. The optimizer state is created from the fp32 stand-ins,
    so it is fp32 (or 8-bit), never bf16.
    """
    groups = optimizer.param_groups
    low = [[p for p in g["params"] if p.grad is not None and p.dtype == torch.bfloat16] for g in groups]
    other = [[p for p in g["params"] if p.grad is not None and p.dtype != torch.bfloat16] for g in groups]
    if not any(low):
        optimizer.step()
        return
    chunks = [low] if chunk_bytes is None or any("d" in g for g in groups) else _chunks(low, chunk_bytes)
    saved = [g["params"] for g in groups]
    try:
        for index, chunk in enumerate(chunks):
            _step_chunk(optimizer, chunk, other if index == 0 else [[] for _ in groups], generator)
    finally:
        for g, params in zip(groups, saved, strict=True):
            g["params"] = params


def _chunks(low: list[list[Tensor]], chunk_bytes: int) -> list[list[list[Tensor]]]:
    """Split per-group parameter lists into chunks of at most `chunk_bytes` of fp32 weights."""
    chunks: list[list[list[Tensor]]] = []
    current: list[list[Tensor]] = [[] for _ in low]
    size = 0
    for gi, params in enumerate(low):
        for p in params:
            if size and size + 4 * p.numel() > chunk_bytes:
                chunks.append(current)
                current, size = [[] for _ in low], 0
            current[gi].append(p)
            size += 4 * p.numel()
    if size:
        chunks.append(current)
    return chunks


def _grad(p: Tensor) -> Tensor:
    # The step selects only parameters that have a gradient (step_with_stochastic_rounding).
    assert p.grad is not None, "a parameter without a gradient was selected for the step"
    return p.grad


def _step_chunk(
    optimizer: torch.optim.Optimizer,
    chunk: list[list[Tensor]],
    other: list[list[Tensor]],
    generator: torch.Generator | None,
) -> None:
    params = [p for group in chunk for p in group]
    total = sum(p.numel() for p in params)
    device = params[0].device
    flat_w = torch.empty(total, dtype=torch.float32, device=device)
    flat_g = torch.empty(total, dtype=torch.float32, device=device)
    slots, views, grad_views, offset = [], [], [], 0
    for p in params:
        n = p.numel()
        slots.append(flat_w[offset : offset + n].view(p.shape))  # where the result is rounded
        views.append(flat_w[offset : offset + n].view(p.shape))  # the stand-in the optimizer steps
        grad_views.append(flat_g[offset : offset + n].view(p.shape))
        offset += n
    torch._foreach_copy_(slots, [p.data for p in params])
    torch._foreach_copy_(grad_views, [_grad(p) for p in params])
    stand_in = {}
    for p, view, grad in zip(params, views, grad_views, strict=True):
        view.grad = grad
        stand_in[p] = view
        if p in optimizer.state:
            optimizer.state[view] = optimizer.state.pop(p)
    for g, low_params, other_params in zip(optimizer.param_groups, chunk, other, strict=True):
        g["params"] = [stand_in[p] for p in low_params] + other_params
    try:
        optimizer.step()
    finally:
        for p, view in stand_in.items():
            if view in optimizer.state:
                optimizer.state[p] = optimizer.state.pop(view)
    for view, slot in zip(views, slots, strict=True):
        if view.data_ptr() != slot.data_ptr():  # an optimizer that assigned a new `.data`
            slot.copy_(view.data)
    round_in_place_(flat_w, generator)  # the stand-ins' own memory: no bf16 or int32 copy
    torch._foreach_copy_([p.data for p in params], slots)  # exact: only bf16 bits are left


def rounding_seed(run_seed: int) -> int:
    """The rounding generator's seed: derived from the run seed only, never from the rank, so
    under DDP every replica rounds the same all-reduced update the same way (per-rank seeds made
    the bf16 weights drift apart). Offset so its stream differs from the run's other generators."""
    return (int(run_seed) + 0x5EED_B16) % 2**63


class StochasticRounding:
    """The random bits of bf16 stochastic rounding as resumable state (one generator per run).

    Its generator lives on the weights' device, so rounding draws no host-side randomness and a
    resumed run continues the same stream (`state_dict` / `load_state_dict`).
    """

    def __init__(
        self, device: torch.device | str, seed: int, *, chunk_bytes: int | None = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.generator = torch.Generator(torch.device(device)).manual_seed(int(seed))
        self.chunk_bytes = chunk_bytes  # None: every parameter in one call (bench/gpu_suite.py compares)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        step_with_stochastic_rounding(optimizer, self.generator, chunk_bytes=self.chunk_bytes)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
