"""The memory plan's data: what a run will hold on the device at its peak, by category.

A `MemoryPlan` is the planner's answer for one recipe: the peak split into categories that add
up to `total_bytes`, the exact sizes the categories are made from (`PlanSizes`, what the tests
compare with a real step), the budget, and, when the plan does not fit, the changes that make
it fit (`Change`, cheapest first). Everything is bytes; `report.py` formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30

# Categories of the peak, in the order the table prints them. Every plan has each key (0 when
# it does not apply), so `--json` consumers need no special cases.
CATEGORIES = (
    "weights",  # trained modules' parameters and buffers, in their storage dtype
    "frozen_weights",  # the VAE, and the text encoder / UNet when frozen
    "gradients",  # parameter gradients alive at the peak
    "optimizer_states",  # every optimizer's state tensors (8-bit, paged and factored included)
    "activations",  # tensors the forward/backward holds at the peak: saved activations, their
    # gradients, recomputed blocks, autocast copies of the weights
    "transient",  # the largest short-lived working memory on top (optimizer step, rounding)
    "sampling",  # how much the sampling moment (step boundary) exceeds the training peak (sampling.py)
    "ema",  # EMA shadow weights on the device (ema_device "device")
    "ddp_buckets",  # DDP's gradient buckets (several processes): the gradients the peak does not hold
    "cuda_context",  # CUDA context and library handles (estimate; 0 on CPU)
    "allocator_margin",  # caching-allocator rounding and fragmentation (estimate; 0 on CPU)
)
CATEGORY_LABELS = {
    "weights": "weights (trained)",
    "frozen_weights": "frozen modules (VAE, frozen encoder)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "transient": "largest transient",
    "sampling": "sampling, above the training peak",
    "ema": "EMA on the device",
    "ddp_buckets": "DDP gradient buckets",
    "cuda_context": "CUDA context (estimate)",
    "allocator_margin": "allocator margin (estimate)",
}


@dataclass(frozen=True)
class PlanSizes:
    """Exact sizes the peak is made from, independent of when each is alive.

    `gradients` is every trained parameter's gradient (what a normal step holds before the
    optimizer runs); `saved_activations` what autograd keeps for backward at the end of the
    forward; `step_peak` the largest live total of the forward + backward (activations,
    gradients and their working memory together).
    """

    weights: int
    frozen_weights: int
    gradients: int
    optimizer_states: int
    saved_activations: int
    step_peak: int
    trainable_parameters: int
    sampling: int = 0  # the sample pipeline's working memory at the step boundary (sampling.py)


@dataclass(frozen=True)
class Change:
    """One step of advice: the settings it changes, what it saves and what it costs in speed.

    `train_json` holds train.json keys; `optimizers` the optimizer.json sections it switches
    (`{"base": "adamw8bit"}`), or None. `total_after` is the re-planned peak with this change
    and every change before it."""

    name: str
    train_json: dict[str, Any]
    optimizers: dict[str, str] | None
    saves_bytes: int
    total_after: int
    speed_cost: str


@dataclass(frozen=True)
class Skipped:
    """A change the advice could not offer, and why (e.g. fused_back_pass with Prodigy)."""

    name: str
    reason: str


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of one recipe on one kind of device (see the module docstring)."""

    device: str  # "cuda" or "cpu": the device the plan is for
    settings: dict[str, Any]  # what was planned: model, bucket, batch, precision, options
    categories: dict[str, int]  # the peak by category; sums to total_bytes
    sizes: PlanSizes
    budget_bytes: int | None = None
    budget_source: str = ""
    advice: tuple[Change, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    notes: tuple[str, ...] = ()  # assumptions and estimates the figures rest on
    advice_fits: bool | None = None  # whether the changes in `advice` make it fit
    extra: dict[str, Any] = field(default_factory=dict)
    host: Any = None  # host.HostPlan: the peak host RSS (the plan's second table)

    @property
    def total_bytes(self) -> int:
        return sum(self.categories.values())

    @property
    def fits(self) -> bool | None:
        """None when no budget was given."""
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes
