"""Epoch plans: which samples form which batches, in which order, on which rank.

An epoch plan is a pure function of (items, buckets, seed, epoch, batch settings, rank), so a
resumed run rebuilds exactly the same plan and continues at a batch index; nothing about the
data order has to be saved except (epoch, batch index).

How an epoch is built (EveryDream2's data_loader.py ideas, with its bugs fixed):

1. **Repeats.** Each item appears `floor(multiply)` times; the fractional parts are drawn by
   seeded *systematic sampling* over a shuffled item order, so an item with fractional part f
   gets one extra copy with probability exactly f and the number of extras is always
   floor or ceil of the sum of fractional parts (EveryDream2: similar, but capped by a loop).
2. **Flips** are decided here, per copy, with the item's `flip_p` or the train.json `flip_p`
   (EveryDream2 never applied the train.json value).
3. **Batches** hold one bucket and one batch_id. Copies are shuffled, grouped by
   (batch_id, bucket) and cut into batches of `batch_size`; the last batch of a group may be
   smaller. Nothing is duplicated to pad it (EveryDream2 padded with random duplicates and
   then discounted the loss by (n/bs)**1.5); instead each batch carries the number of samples
   in its accumulation window so the loop divides the summed loss by it: every sample weighs
   the same, whatever the batch sizes.
4. **Accumulation windows** of `grad_accum * num_replicas` batches (one optimizer step).
   Batches of a named batch_id are kept in one window (first-fit-decreasing; a batch_id with
   more batches than a window spans the fewest windows), and free slots are filled with
   default batches. Windows are shuffled; so are batches within a window. The loop must step
   the optimizer at the end of each window (`EpochPlan.windows`), because a window may hold
   fewer than `grad_accum` batches when the data runs out.
5. **Ranks.** Batch `i * num_replicas + rank` of each window goes to `rank`; each rank gets
   `n // num_replicas` batches of a window of n, so all ranks run the same number of batches
   in every window. The `n % num_replicas` leftover batches of a window are left out of that
   epoch (never duplicated); which ones changes every epoch. With one replica nothing is lost.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from trainer.data.buckets import Bucket
from trainer.data.items import DEFAULT_BATCH_ID, ImageItem


@dataclass(frozen=True)
class SampleRef:
    """Everything needed to produce one sample; the Dataset needs nothing else."""

    item_index: int
    epoch: int
    position: int  # index of the sample in the whole epoch (all ranks), unique per epoch
    flip: bool
    seed: int
    bucket: Bucket


def sample_rng(ref: SampleRef, purpose: str) -> random.Random:
    """Per-sample RNG stream, independent of workers, ranks and resume (never the global RNG)."""
    return random.Random(f"sdtrainer-sample:{purpose}:{ref.seed}:{ref.epoch}:{ref.position}")


@dataclass
class EpochPlan:
    """One rank's batches for one epoch and its accumulation windows."""

    epoch: int
    batches: list[list[SampleRef]]
    windows: list[tuple[int, int]]
    window_sample_counts: list[int] = field(default_factory=list)  # this rank, per window
    global_window_sample_counts: list[int] = field(default_factory=list)  # all ranks, per window
    dropped_batches: int = 0  # left out of this epoch so that ranks stay equal (see module doc)

    def _window_of(self, batch_index: int) -> int:
        if not 0 <= batch_index < len(self.batches):
            raise IndexError(f"batch_index {batch_index} is outside this epoch's {len(self.batches)} batches")
        return bisect.bisect_right([start for start, _ in self.windows], batch_index) - 1

    def window_samples(self, batch_index: int) -> int:
        """Samples in this rank's accumulation window containing `batch_index`."""
        return self.window_sample_counts[self._window_of(batch_index)]

    def global_window_samples(self, batch_index: int) -> int:
        """Samples in that window summed over all ranks (for exact per-sample DDP weighting:
        loss = sum_of_sample_losses * num_replicas / global_window_samples)."""
        return self.global_window_sample_counts[self._window_of(batch_index)]

    def is_window_end(self, batch_index: int) -> bool:
        """True when the optimizer should step after this batch."""
        return self.windows[self._window_of(batch_index)][1] == batch_index + 1


def repeat_counts(items: list[ImageItem], rng: random.Random) -> list[int]:
    """Copies of each item this epoch: floor(multiply) plus a systematic draw of the fraction."""
    counts = [max(0, math.floor(it.multiply)) for it in items]
    fractional = [(i, it.multiply - math.floor(it.multiply)) for i, it in enumerate(items) if it.multiply > 0]
    fractional = [(i, f) for i, f in fractional if f > 0]
    rng.shuffle(fractional)
    start = rng.random()
    cumulative = 0.0
    for i, f in fractional:
        # lattice points start + k inside [cumulative, cumulative + f): 0 or 1 since f < 1
        counts[i] += math.ceil(cumulative + f - start) - math.ceil(cumulative - start)
        cumulative += f
    return counts


def _pack_windows(
    named: dict[str, list[list]], default: list[list], capacity: int, rng: random.Random
) -> list[list[list]]:
    """First-fit-decreasing of named batch groups into windows, then fill with default batches."""
    pieces: list[list[list]] = []
    for batch_id in sorted(named):
        chunks = named[batch_id]
        pieces.extend(chunks[i : i + capacity] for i in range(0, len(chunks), capacity))
    pieces.sort(key=len, reverse=True)
    windows: list[list[list]] = []
    for piece in pieces:
        target = next((w for w in windows if capacity - len(w) >= len(piece)), None)
        if target is None:
            windows.append(list(piece))
        else:
            target.extend(piece)
    fill = iter(default)
    for window in windows:
        while len(window) < capacity:
            chunk = next(fill, None)
            if chunk is None:
                break
            window.append(chunk)
    rest = list(fill)
    windows.extend(rest[i : i + capacity] for i in range(0, len(rest), capacity))
    rng.shuffle(windows)
    for window in windows:
        rng.shuffle(window)
    return windows


def plan_epoch(
    items: list[ImageItem],
    buckets: list[Bucket],
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    grad_accum: int = 1,
    default_flip_p: float = 0.0,
    num_replicas: int = 1,
    rank: int = 0,
) -> EpochPlan:
    """Build one rank's plan for `epoch`; `buckets[i]` is the bucket of `items[i]`."""
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
    rng = random.Random(f"sdtrainer-plan:{seed}:{epoch}")
    counts = repeat_counts(items, rng)
    picks: list[tuple[int, bool]] = []
    for i, n in enumerate(counts):
        flip_p = items[i].flip_p
        p = flip_p if flip_p is not None else default_flip_p
        picks.extend((i, rng.random() < p) for _ in range(n))
    rng.shuffle(picks)

    groups: dict[tuple[str, Bucket], list[tuple[int, bool]]] = {}
    for i, flip in picks:
        groups.setdefault((items[i].batch_id, buckets[i]), []).append((i, flip))
    named: dict[str, list[list]] = {}
    default: list[list] = []
    for (batch_id, _), members in groups.items():
        chunks = [members[k : k + batch_size] for k in range(0, len(members), batch_size)]
        if batch_id == DEFAULT_BATCH_ID:
            default.extend(chunks)
        else:
            named.setdefault(batch_id, []).extend(chunks)
    rng.shuffle(default)
    for chunks in named.values():
        rng.shuffle(chunks)
    windows = _pack_windows(named, default, grad_accum * num_replicas, rng)

    position = 0
    batches: list[list[SampleRef]] = []
    spans: list[tuple[int, int]] = []
    local_counts: list[int] = []
    global_counts: list[int] = []
    dropped = 0
    for window in windows:
        refs_window = []
        for chunk in window:
            refs = []
            for i, flip in chunk:
                refs.append(SampleRef(i, epoch, position, flip, seed, buckets[i]))
                position += 1
            refs_window.append(refs)
        per_rank = len(refs_window) // num_replicas
        dropped += len(refs_window) - per_rank * num_replicas
        if per_rank == 0:
            continue
        kept = refs_window[: per_rank * num_replicas]
        mine = [kept[k * num_replicas + rank] for k in range(per_rank)]
        spans.append((len(batches), len(batches) + len(mine)))
        batches.extend(mine)
        local_counts.append(sum(len(b) for b in mine))
        global_counts.append(sum(len(b) for b in kept))
    return EpochPlan(epoch, batches, spans, local_counts, global_counts, dropped)
