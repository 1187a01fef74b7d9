"""When to sample and validate: the loop calls these hooks; they decide and do the work.

Sampling happens on the main process only; validation on every rank (each takes a share).
Neither moves the global RNG state the run depends on (both run inside `isolated_rng`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace

import torch

from trainer.optim.schedule_free import eval_weights
from trainer.parts.eager import eager
from trainer.parts.parking import Parking

log = logging.getLogger(__name__)


def release_cached_blocks(device: torch.device) -> None:
    """Give the caching allocator's free blocks back to the GPU after samples: the pipeline's
    activations (its resolution, batch and classifier-free-guidance doubling are not the training
    step's) would otherwise stay cached in shapes the next steps cannot reuse. Nothing to do off
    CUDA."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Observers:
    """Sampler and validator hooks. They read the live run through what they are given: the
    model (`SDComponents`), the accelerator (main process, unwrapping), the optimizer set
    (schedule-free eval weights), the progress counters, the metrics writer and the EMA."""

    def __init__(
        self,
        *,
        model,
        accelerator,
        optim,
        state,
        metrics,
        ema=None,
        sampler=None,
        validator=None,
        sample_at_start: bool = True,
        sample_steps: int = 0,
        resumed: bool = False,
        parking: Parking | None = None,
    ):
        self.model = model
        self.accelerator = accelerator
        self.optim = optim
        self.state = state
        self.metrics = metrics
        self.ema = ema
        self.sampler = sampler
        self.validator = validator
        self.sample_at_start = sample_at_start
        self.sample_steps = sample_steps  # train.json's sample_steps (the sample file may override it)
        self.resumed = resumed
        self.parking = parking  # frozen modules on the host between samples
        self.best_val: float | None = None
        self.last_val: float | None = None

    def on_start(self) -> None:
        """Baselines before the first step (not on resume: the curves already have them)."""
        if self.resumed or self.state.global_step != 0:
            return
        self._validate()
        if self.sample_at_start:
            self._sample()

    def after_step(self, window_index: int, windows_in_epoch: int) -> None:
        step = self.state.global_step
        if self.sampler is not None and step % self.sampler.every_n_steps(self.sample_steps) == 0:
            self._sample()
        if self.validator is not None and window_index in self.validator.points_in_epoch(windows_in_epoch):
            self._validate()

    def on_epoch_end(self, finished_epoch: int) -> None:
        if self.validator is not None and self.validator.due_at_epoch_end(finished_epoch):
            self._validate()

    def _sample(self) -> None:
        if self.sampler is None or not self.accelerator.is_main_process:
            return
        components = replace(
            self.model,
            unet=self.accelerator.unwrap_model(self.model.unet),
            text_encoder=self.accelerator.unwrap_model(self.model.text_encoder),
        )
        # Eager forward (never recompile the training graph) on the eval-mode weights of a
        # schedule-free optimizer.
        fetched = self.parking.fetched() if self.parking is not None else nullcontext()
        with eager(components.unet, components.text_encoder), eval_weights(self.optim), fetched:
            paths = self.sampler.generate(components, self.state.global_step, self.metrics, ema=self.ema)
        release_cached_blocks(self.accelerator.device)  # after the parked modules went back
        log.info("wrote %d sample image(s) at step %d", len(paths), self.state.global_step)

    def _validate(self) -> None:
        if self.validator is None or not self.validator.enabled:
            return
        model = self.model
        with (
            eager(
                self.accelerator.unwrap_model(model.unet),
                self.accelerator.unwrap_model(model.text_encoder),
            ),
            eval_weights(self.optim),
        ):
            results = self.validator.run(self.state.global_step, self.metrics)
        val = results.get("val")
        if val is not None:
            self.last_val = val
            self.best_val = val if self.best_val is None else min(self.best_val, val)
        log.info(
            "validation at step %d: %s",
            self.state.global_step,
            ", ".join(f"{k}={v:.4f}" for k, v in results.items()),
        )
