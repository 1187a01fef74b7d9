"""Bytes of an optimizer's state, parameter by parameter, as each library allocates it.

Optimizers create their state lazily, at the first step, so it cannot be read off a built
optimizer; it is a function of the parameter's shape and the options, taken from each
library's source (the function names the file). The tests step every optimizer whose package
is installed once on CPU and compare these layouts with the tensors it really made.

The trainer always steps fp32 values (fp32 weights, or the fp32 stand-ins of bf16 weights under
stochastic rounding), so "like the parameter" means fp32 here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.optim.registry import OptimizerSpec, prefer_fused_kernel
from trainer.runtime.errors import ConfigError

FP32 = torch.float32

# bitsandbytes/optim/optimizer.py: 8-bit states are quantised block-wise in blocks of 256
# elements with one fp32 absmax each; parameters below min_8bit_size (default 4096) keep fp32
# states; every optimizer holds its quantisation maps (256 fp32 values each) on the device.
BNB_BLOCKSIZE = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_SIZE = 256
_BNB_TWO_STATE = {"adam8bit", "adamw8bit", "lamb8bit", "paged_adam8bit", "paged_adamw8bit"}
_BNB_TWO_STATE |= {"lamb", "paged_adam", "paged_adamw"}
_BNB_ONE_STATE = {"adagrad8bit", "lars8bit", "lion8bit", "rmsprop8bit", "sgd8bit", "paged_lion8bit"}
_BNB_ONE_STATE |= {"lars", "paged_lion"}
_BNB_MAX_UNORM = {"lamb": 1.0, "lamb8bit": 1.0, "lars": 0.02, "lars8bit": 0.02}  # class defaults

# Optimizers whose state is a fixed number of full-size copies of the parameter.
_FULL_COPIES = {
    "lion": 1,  # lion_pytorch: exp_avg
    "dadapt_adam": 3,  # dadaptation/dadapt_adam.py: s, exp_avg, exp_avg_sq
    "dadapt_lion": 2,  # dadapt_lion.py: exp_avg, s
    "dadapt_sgd": 3,  # dadapt_sgd.py: z, s, x0
    "dadapt_adan": 5,  # dadapt_adan.py: s, exp_avg, exp_avg_diff, exp_avg_sq, pre_grad
    "dadapt_adagrad": 3,  # dadapt_adagrad.py: alphak, sk, x0
    "adamw_schedulefree": 2,  # schedulefree/adamw_schedulefree.py: z, exp_avg_sq
    "sgd_schedulefree": 1,  # sgd_schedulefree.py: z
    "radam_schedulefree": 2,  # radam_schedulefree.py: z, exp_avg_sq
    "adopt": 2,  # pytorch_optimizer/optimizer/adopt.py: exp_avg, exp_avg_sq
}


@dataclass(frozen=True)
class StateTensor:
    """One state tensor: its size, dtype, and whether it lives on the parameter's device
    (torch keeps the step counters of non-fused optimizers on the host)."""

    numel: int
    dtype: torch.dtype
    on_device: bool = True

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class UnmodelledOptimizer(ConfigError):
    """The planner has no state layout for this optimizer."""


def parameter_state(spec: OptimizerSpec, options: dict[str, Any], shape: Sequence[int]) -> list[StateTensor]:
    """The state tensors `spec` (with the resolved `options`) keeps for one parameter of `shape`."""
    numel = math.prod(shape)
    name = spec.name
    if spec.module == "torch.optim":
        return _torch_state(spec, options, numel)
    if name in _BNB_TWO_STATE or name in _BNB_ONE_STATE:
        return _bnb_state(spec, options, numel)
    if name in _FULL_COPIES:
        return [StateTensor(numel, FP32)] * _FULL_COPIES[name]
    if name == "prodigy":
        return _prodigy_state(options, numel)
    if name == "adafactor":
        return _factored_state(shape, first_moment=options.get("beta1") is not None, residual=False)
    if name == "came":
        states = _factored_state(shape, first_moment=True, residual=True)
        return states + ([StateTensor(numel, FP32)] if options.get("ams_bound") else [])
    raise UnmodelledOptimizer(
        f"the memory plan has no state layout for optimizer '{name}' ({spec.module}.{spec.attr}); it "
        "cannot say whether this run fits. Remove `vram` (and auto_fit) to train without the check, or "
        "choose an optimizer from docs/OPTIMIZERS.md that the plan models."
    )


def shared_state(
    spec: OptimizerSpec, options: dict[str, Any], shapes: Iterable[Sequence[int]]
) -> list[StateTensor]:
    """State one optimizer instance holds once for all its parameters: bitsandbytes' quantisation
    maps (`Optimizer8bit.fill_qmap`, moved to the device at the first 8-bit parameter)."""
    if not spec.eight_bit:
        return []
    threshold = options.get("min_8bit_size", BNB_MIN_8BIT_SIZE)
    if not any(math.prod(s) >= threshold for s in shapes):
        return []
    maps = 2 if spec.name in _BNB_TWO_STATE else 1
    return [StateTensor(BNB_QMAP_SIZE, FP32)] * maps


def _torch_state(spec: OptimizerSpec, options: dict[str, Any], numel: int) -> list[StateTensor]:
    """torch/optim/{adam,adamw,adagrad,rmsprop,sgd}.py: full-size buffers like the parameter and a
    0-dim fp32 step counter, on the device when fused or capturable, else on the host."""
    fused = bool(options.get("fused")) or prefer_fused_kernel(spec, options)
    step = StateTensor(1, FP32, on_device=fused or bool(options.get("capturable")))
    name = spec.name
    if name in ("adam", "adamw"):
        copies = 3 if options.get("amsgrad") else 2
        return [step, *[StateTensor(numel, FP32)] * copies]
    if name == "adagrad":
        return [step, StateTensor(numel, FP32)]
    if name == "rmsprop":
        copies = 1 + (options.get("momentum", 0) > 0) + bool(options.get("centered"))
        return [step, *[StateTensor(numel, FP32)] * copies]
    if name == "sgd":  # momentum_buffer only with momentum; no step counter
        return [StateTensor(numel, FP32)] if options.get("momentum", 0) else []
    raise UnmodelledOptimizer(f"the memory plan has no state layout for torch optimizer '{name}'")


def _bnb_state(spec: OptimizerSpec, options: dict[str, Any], numel: int) -> list[StateTensor]:
    """bitsandbytes Optimizer1State / Optimizer2State.init_state."""
    states = 2 if spec.name in _BNB_TWO_STATE else 1
    eight_bit = spec.eight_bit and numel >= options.get("min_8bit_size", BNB_MIN_8BIT_SIZE)
    if eight_bit:
        blocks = -(-numel // BNB_BLOCKSIZE)
        out = [StateTensor(numel, torch.uint8), StateTensor(blocks, FP32)] * states
    else:
        out = [StateTensor(numel, FP32)] * states
    if options.get("max_unorm", _BNB_MAX_UNORM.get(spec.name, 0.0)) > 0:
        out.append(StateTensor(1, FP32))  # unorm_vec
    return out


def _prodigy_state(options: dict[str, Any], numel: int) -> list[StateTensor]:
    """prodigyopt/prodigy.py: s and p0 over every slice_p-th element, exp_avg (when beta1 > 0)
    and exp_avg_sq. p0 of a parameter that is all zeros at the first step is one scalar; the
    plan assumes a trained model's weights, which are not."""
    sliced = -(-numel // options.get("slice_p", 1))
    beta1 = options.get("betas", (0.9, 0.999))[0]
    return [StateTensor(sliced, FP32)] * 2 + [StateTensor(numel, FP32)] * (2 if beta1 > 0 else 1)


def _factored_state(shape: Sequence[int], *, first_moment: bool, residual: bool) -> list[StateTensor]:
    """transformers' Adafactor (optimization.py `_get_options`: factored when the parameter has
    two or more dimensions) and pytorch-optimizer's CAME (which also factors its residual): the
    second moment as a row over all dimensions but the last and a column over all but the
    second-to-last, so a 3x3 convolution keeps 2/3 of a full state, not a sliver; 1-D
    parameters keep it whole. Plus the 0-dim RMS tensor of the step."""
    numel = math.prod(shape)
    out = [StateTensor(numel, FP32)] if first_moment else []
    if len(shape) >= 2:
        row = math.prod(shape[:-1])
        col = math.prod(shape[:-2]) * shape[-1]
        out += [StateTensor(row, FP32), StateTensor(col, FP32)] * (2 if residual else 1)
    else:
        out.append(StateTensor(numel, FP32))
    return out + [StateTensor(1, FP32)]  # RMS


def state_bytes(states: Iterable[StateTensor], *, device_only: bool) -> int:
    return sum(s.nbytes for s in states if s.on_device or not device_only)
