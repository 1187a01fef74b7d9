"""Working memory of an optimizer step that lives only during the step.

* bf16 weights: `trainer.optim.stochastic_rounding.step_with_stochastic_rounding` makes fp32
  stand-ins of a chunk of weights and gradients plus the rounding's random bits. Measured, not
  estimated: the trainer's own function runs on fake tensors of the same shapes (a stateless
  SGD stands in for the optimizer, whose own working memory is the next item), so its chunking
  rule and every temporary it makes are counted as they are. FakeTensorMode rather than
  shadows (shadow.py): the rounding draws its random bits from a CPU generator, which would
  make them real on shadows.
* the optimizer's own update: full-size temporaries of the parameter being updated, counted
  from each library's step code (estimates: `FAMILY_TEMPORARIES`); a fused torch kernel makes
  none, and a foreach implementation makes one list as large as the whole group.
* the gradient-norm check: one 0-dim norm per parameter.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from trainer.optim.registry import OptimizerSpec, prefer_fused_kernel
from trainer.optim.stochastic_rounding import DEFAULT_CHUNK_BYTES, step_with_stochastic_rounding
from trainer.plan.tracker import LiveBytes

# Full-size fp32 temporaries of the largest parameter during its update (each library's step):
# e.g. transformers' Adafactor holds `grad**2 + eps` and the factored approximation at once;
# Prodigy and D-Adaptation build a square-root denominator; Lion clones its momentum.
FAMILY_TEMPORARIES = {
    "adafactor": 2,
    "came": 2,
    "prodigy": 1,
    "lion": 2,
    "adopt": 1,
    "adamw_schedulefree": 1,
    "sgd_schedulefree": 1,
    "radam_schedulefree": 1,
}
_DADAPT_TEMPORARIES = 1
_TORCH_SINGLE_TENSOR_TEMPORARIES = 2  # torch's for-loop Adam: sqrt(exp_avg_sq), then its quotient


def optimizer_temporaries(spec: OptimizerSpec, options: dict, numels: Sequence[int], *, device: str) -> int:
    """Working memory of one optimizer instance's update over parameters of `numels` elements."""
    largest = 4 * max(numels)
    if spec.module == "torch.optim":
        if options.get("fused") or prefer_fused_kernel(spec, options):
            return 0
        if device == "cuda" and options.get("foreach") is not False:  # torch's CUDA default
            return 4 * sum(numels)
        return _TORCH_SINGLE_TENSOR_TEMPORARIES * largest
    if spec.package == "bitsandbytes":
        return 0  # its kernels update in place
    if spec.name.startswith("dadapt_"):
        return _DADAPT_TEMPORARIES * largest
    return FAMILY_TEMPORARIES.get(spec.name, 1) * largest


def gradient_norm_bytes(num_params: int, granularity: int) -> int:
    """`get_total_norm`: a 0-dim norm per gradient, each rounded up to the allocator's block."""
    return num_params * max(4, granularity)


def rounding_bytes(shapes: Sequence[tuple[int, ...]], *, adaptive: bool, chunk_bytes: int | None) -> int:
    """Peak working memory of `step_with_stochastic_rounding` over bf16 parameters of `shapes`
    (measured on fake tensors; see the module docstring). `adaptive`: the optimizer adapts its
    step size over all parameters (a `d` in its param groups), which the trainer steps in one
    call."""
    # Keyed by element counts: the rounding works on flat views, so a shape's bytes are those of
    # its numel, in the same order (fewer distinct keys, each measured once per process).
    return _rounding_bytes(tuple(math.prod(s) for s in shapes), adaptive, chunk_bytes)


@functools.lru_cache(maxsize=4096)
def _rounding_bytes(numels: tuple[int, ...], adaptive: bool, chunk_bytes: int | None) -> int:
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in numels]
        for p in params:
            p.grad = torch.zeros_like(p)
        stand_in = torch.optim.SGD(params, lr=0.0, foreach=False)
        if adaptive:
            stand_in.param_groups[0]["d"] = 1.0
        live = LiveBytes()
        with live, warnings.catch_warnings():
            # it compares data pointers to detect an optimizer that replaced `.data`; fake tensors
            # have none (and warn), and the stateless stand-in replaces nothing
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            step_with_stochastic_rounding(stand_in, torch.Generator(), chunk_bytes=chunk_bytes)
    return live.peak.total


DEFAULT_ROUNDING_CHUNK_BYTES = DEFAULT_CHUNK_BYTES
