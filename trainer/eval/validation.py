"""Validation loss, smooth and comparable across a run, without touching the training RNG.

Each pass walks the same batches in the same order, and each sample draws its noise and
timestep from its own seed, which the evaluation plan derives from the validation seed, so
every image gets the same noise and timestep at every pass and only the weights change between
points of `loss/val`. The loss is the training loss (same loss type,
min-SNR, loss_scale), computed under no_grad. Ranks each take a share of the batches and the
sums are reduced, so the work is done once, not once per rank.
"""

from __future__ import annotations

import logging
import math

import torch

from trainer.data.loaders import make_eval_loader
from trainer.data.validation_split import ValidationConfig
from trainer.runtime.determinism import isolated_rng

log = logging.getLogger(__name__)


class Validator:
    def __init__(
        self, plan, cfg: ValidationConfig, step_fn, accelerator, *, batch_size: int, latent_cache=None
    ):
        self.plan = plan
        self.cfg = cfg
        self.step_fn = step_fn  # a TrainingStep over the unwrapped modules (no DDP collectives)
        self.accelerator = accelerator
        self.batch_size = cfg.batch_size or batch_size
        self.latent_cache = latent_cache
        self.sets = {name: items for name, items in plan.val_sets.items() if items}
        if cfg.stabilize_training_loss and plan.stabilize_items:
            self.sets["train_stabilized"] = plan.stabilize_items
        self.history: list[float] = []

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def points_in_epoch(self, windows_in_epoch: int) -> set[int]:
        """Window indices (0-based, within an epoch) after which to validate, for every_n_epochs < 1."""
        n = self.cfg.every_n_epochs
        if n >= 1:
            return set()
        count = max(1, round(1 / n))
        return {max(0, math.ceil(windows_in_epoch * (i + 1) / count) - 1) for i in range(count)}

    def due_at_epoch_end(self, finished_epoch: int) -> bool:
        n = self.cfg.every_n_epochs
        return n >= 1 and (finished_epoch + 1) % round(n) == 0

    @torch.no_grad()
    def run(self, global_step: int, metrics) -> dict[str, float]:
        """Compute every set's mean loss and log `loss/val`, `loss/val_<name>`, `loss/train_stabilized`."""
        results = {}
        with isolated_rng():
            for name, items in self.sets.items():
                results[name] = self._mean_loss(items)
        values = {("loss/val" if name == "val" else f"loss/{_tag(name)}"): v for name, v in results.items()}
        metrics.scalars(values, global_step)
        if "val" in results:
            self._check_trend(results["val"])
        return results

    def _mean_loss(self, items) -> float:
        device = self.accelerator.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        loader = make_eval_loader(
            self.plan, items, batch_size=self.batch_size, seed=self.cfg.seed, latent_cache=self.latent_cache
        )
        for batch in loader:
            out = self.step_fn(batch)
            total += out.loss.double().sum()
            count += out.loss.numel()
        total = self.accelerator.reduce(total, reduction="sum")
        count = self.accelerator.reduce(count, reduction="sum")
        return float(total / count.clamp(min=1))

    def _check_trend(self, value: float) -> None:
        """EveryDream2's divergence hint: warn when the recent validation curve rises."""
        self.history.append(value)
        if len(self.history) > 11:
            recent = self.history[-6:]
            diffs = [b - a for a, b in zip(recent, recent[1:], strict=False)]
            if sum(diffs) / len(diffs) > 0:
                log.warning("validation loss is rising over the last 5 points: the run may be overfitting")


def _tag(name: str) -> str:
    return name if name == "train_stabilized" else f"val_{name}"
