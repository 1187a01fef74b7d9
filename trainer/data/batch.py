"""The batch: what the data layer hands to the step and the loop, one typed object.

A micro-batch carries the model inputs (cached latents or pixels, captions, optional masks), the
per-sample loss scale and noise seeds, and the loop's bookkeeping (where it sits in its
accumulation window, which files it holds, which could not be decoded). One class instead of a
dict of string keys: a field the step needs and the loader forgot is a TypeError at the
loader, not a KeyError in the step, and a new field is added in one place.

`pin_memory()` and `to()` keep it usable by `torch.utils.data.DataLoader(pin_memory=True)`
(which calls `pin_memory()` on objects that have it) and by the step's one host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from trainer.data.items import Problem


@dataclass
class Batch:
    """One micro-batch. Exactly one of `latents` (cached, already scaled) and `pixel_values`
    (images in [-1, 1], encoded by the step) is set."""

    captions: list[str]
    # Each sample's seed for all of its draws (noise, timestep, VAE posterior...): the same
    # sample gets the same numbers whatever the process count, workers or resumes.
    sample_seeds: list[int]
    latents: Tensor | None = None
    pixel_values: Tensor | None = None
    masks: Tensor | None = None  # (B, 1, H, W) in [0, 1], with masked_loss
    loss_scale: Tensor | float = 1.0  # per sample (B,), or one value for all
    # --- the loop's bookkeeping ---
    paths: list[str] = field(default_factory=list)
    batch_index: int = 0  # in the epoch plan
    global_window_samples: int = 0  # samples of its accumulation window over all processes
    window_end: bool = True  # the last micro-batch of its window: the optimizer steps after it
    problems: list[Problem] = field(default_factory=list)  # files that could not be decoded

    def __post_init__(self) -> None:
        if (self.latents is None) == (self.pixel_values is None):
            raise ValueError("a Batch needs exactly one of latents (cached) and pixel_values")
        n = len(self.captions)
        if len(self.sample_seeds) != n or self.inputs.shape[0] != n:
            raise ValueError(
                f"a Batch of {n} captions has {len(self.sample_seeds)} sample seeds and "
                f"{self.inputs.shape[0]} images: one each per sample"
            )
        scale = torch.as_tensor(self.loss_scale, dtype=torch.float32)
        self.loss_scale = scale.expand(n).clone() if scale.ndim == 0 else scale

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def inputs(self) -> Tensor:
        """The image inputs: latents when cached, else pixels."""
        if self.latents is not None:
            return self.latents
        # __post_init__ refuses a Batch without exactly one of the two
        assert self.pixel_values is not None, "a Batch without latents has pixel_values"
        return self.pixel_values

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A copy with `fn` applied to each of its tensors (the unset ones stay None)."""
        return replace(
            self,
            latents=None if self.latents is None else fn(self.latents),
            pixel_values=None if self.pixel_values is None else fn(self.pixel_values),
            masks=None if self.masks is None else fn(self.masks),
            loss_scale=fn(self.loss_scale) if isinstance(self.loss_scale, Tensor) else self.loss_scale,
        )

    def pin_memory(self) -> Batch:
        """A copy with its tensors in page-locked memory (DataLoader(pin_memory=True) calls it)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, *, non_blocking: bool = True) -> Batch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))
