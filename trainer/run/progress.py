"""Per-step bookkeeping for the console and TensorBoard, without host syncs between log points.

Losses and gradient norms are accumulated as device tensors; `.item()` happens only every
`log_step` optimizer steps. Tag names are documented in docs/LOGGING.md.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

BAND_EDGES = (0, 250, 500, 750, 1000)


class StepTracker:
    def __init__(
        self,
        metrics,
        *,
        log_step: int,
        total_steps: int,
        start_step: int,
        batch_size: int,
        enabled: bool,
        reduce_sum=None,
    ):
        """`reduce_sum(tensor)` sums across processes (None in a single process); flush calls it
        on every rank at the same steps, so logged losses cover all ranks' samples."""
        self.metrics = metrics
        self.log_step = log_step
        self.reduce_sum = reduce_sum
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", disable=not enabled, dynamic_ncols=True
        )
        self._edges: dict[torch.device, torch.Tensor] = {}
        self._reset_window()
        self._epoch_sum = 0.0
        self._epoch_count = 0
        self.last_loss: float | None = None

    def _reset_window(self) -> None:
        self._loss_sum: torch.Tensor | None = None  # on the loss's device: no host sync per micro-batch
        self._count = 0
        self._band_sum: torch.Tensor | None = None  # on the loss's device, like _loss_sum
        self._band_count: torch.Tensor | None = None
        self._norms: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._images = 0
        self._t0 = time.perf_counter()

    def micro_batch(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> None:
        detached = per_sample_loss.detach().float()
        total = detached.sum()
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        self._count += detached.numel()
        self._images += detached.numel()
        if self._band_sum is None or self._band_count is None:
            self._band_sum = torch.zeros(len(BAND_EDGES) - 1, device=detached.device)
            self._band_count = torch.zeros_like(self._band_sum)
        edges = self._edges.get(detached.device)
        if edges is None:
            edges = self._edges[detached.device] = torch.tensor(BAND_EDGES[1:-1], device=detached.device)
        bands = torch.bucketize(timesteps.detach().to(detached.device), edges, right=True)
        self._band_sum.index_add_(0, bands, detached)
        self._band_count.index_add_(0, bands, torch.ones_like(detached))

    def optimizer_step(
        self, global_step: int, grad_norms: dict[str, torch.Tensor], lrs_fn, epoch: int
    ) -> None:
        self._steps += 1
        for name, norm in grad_norms.items():
            self._norms[name] = self._norms.get(name, 0.0) + norm.detach().float()
        self.bar.update(1)
        if global_step % self.log_step == 0:
            self.flush(global_step, lrs_fn(), epoch)

    def flush(self, global_step: int, lrs: dict[str, float], epoch: int) -> None:
        if self._loss_sum is None or self._band_sum is None or self._band_count is None:
            return  # no micro-batch since the last flush
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        loss_sum, count = self._loss_sum, torch.tensor(float(self._count), device=self._loss_sum.device)
        if self.reduce_sum is not None:
            loss_sum, count = self.reduce_sum(loss_sum), self.reduce_sum(count)
            self._images = int(count)
        loss = float(loss_sum) / float(count)
        values = {
            "loss/train": loss,
            "performance/images_per_second": self._images / elapsed,
            "performance/seconds_per_step": elapsed / max(self._steps, 1),
            "progress/epoch": epoch,
        }
        values.update({name if "/" in name else f"lr/{name}": lr for name, lr in lrs.items()})
        values.update(
            {f"grad_norm/{name}": float(n) / max(self._steps, 1) for name, n in self._norms.items()}
        )
        band_sum, band_count = self._band_sum.tolist(), self._band_count.tolist()
        for i in range(len(BAND_EDGES) - 1):
            if band_count[i] > 0:
                band = f"loss_by_timestep/{BAND_EDGES[i]:03d}-{BAND_EDGES[i + 1]:03d}"
                values[band] = band_sum[i] / band_count[i]
        if torch.cuda.is_available():
            values.update(_cuda_memory())
        self.metrics.scalars(values, global_step)
        self._epoch_sum += loss * self._count
        self._epoch_count += self._count
        self.last_loss = loss
        lr_text = ", ".join(f"{k}={v:.2e}" for k, v in lrs.items() if "/" not in k)
        self.bar.set_postfix_str(
            f"loss={loss:.4f} {lr_text} img/s={values['performance/images_per_second']:.1f}"
        )
        self._reset_window()

    def epoch_end(self, global_step: int, lrs: dict[str, float], epoch: int) -> float | None:
        """Flush pending values and log the epoch's mean loss (tag loss/train_epoch)."""
        self.flush(global_step, lrs, epoch)
        if self._epoch_count == 0:
            return None
        mean = self._epoch_sum / self._epoch_count
        self.metrics.scalars({"loss/train_epoch": mean}, global_step)
        self._epoch_sum, self._epoch_count = 0.0, 0
        return mean

    def close(self) -> None:
        self.bar.close()


def _cuda_memory() -> dict[str, float]:
    gib = 1024**3
    return {
        "memory/allocated_gib": torch.cuda.memory_allocated() / gib,
        "memory/reserved_gib": torch.cuda.memory_reserved() / gib,
        "memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
    }
