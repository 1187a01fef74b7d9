"""`load_data`: discover + split + bucket once at start-up, giving the `LoadedDataset`.

The LoadedDataset (items, buckets, validation sets, problems) is the only data object the
training loop holds. Its `epoch_plan(epoch)` (an `EpochPlan`: one epoch's batches and
accumulation windows, planner.py) is a
pure function of (seed, epoch, rank), so the loop's resumable state is just (epoch, batch
index); `fingerprint()` lets a resume check that the data and data settings are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.data.buckets import Bucket, get_buckets, is_ed2_table, is_undersized, nearest_bucket
from trainer.data.caption_sampling import fixed_caption
from trainer.data.items import ImageItem, Problem
from trainer.data.masks import MaskSource, scan_masks
from trainer.data.planner import EpochPlan, plan_epoch
from trainer.runtime.errors import DataError

logger = logging.getLogger(__name__)

UNDERSIZED_PREFIX = "warning: undersized"


@dataclass(frozen=True)
class DataSettings:
    """The train.json values the data pipeline needs (`from_config`; their ranges are TrainConfig's)."""

    data_root: str | list
    resolution: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 555
    flip_p: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    cond_dropout: float = 0.04
    crop_jitter: float = 0.02
    validation_config: str | None = None
    num_workers: int = 0
    scan_cache: Path | None = None
    num_replicas: int = 1
    rank: int = 0
    masked_loss: bool = False
    mask_from_alpha: bool = False
    caption_dropout_every_n_epochs: int = 0
    keep_tokens_separator: str = ""

    @property
    def mask_source(self) -> MaskSource | None:
        """Where masks come from (trainer.data.masks.MaskSource), or None without masked_loss."""
        if not self.masked_loss:
            return None
        return MaskSource("alpha" if self.mask_from_alpha else "file")

    def __post_init__(self) -> None:
        # TrainConfig refuses each of these with the key's name (trainer/config/schema.py); a
        # failure here is a caller that built settings around it.
        assert self.batch_size >= 1 and self.grad_accum >= 1 and self.keep_tags >= 0, self
        assert self.num_workers >= 0 and 0 <= self.rank < self.num_replicas, self
        assert all(0.0 <= v <= 1.0 for v in (self.flip_p, self.cond_dropout, self.crop_jitter)), self

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, num_replicas: int = 1, rank: int = 0) -> DataSettings:
        """The data keys of a run's config; `num_workers` null = `auto_num_workers`."""
        workers = (
            cfg.num_workers if cfg.num_workers is not None else auto_num_workers(torch.get_num_threads())
        )
        return cls(
            data_root=cfg.data_root,
            resolution=cfg.resolution,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            flip_p=cfg.flip_p,
            shuffle_tags=cfg.shuffle_tags,
            keep_tags=cfg.keep_tags,
            cond_dropout=cfg.cond_dropout,  # crop jitter: the default; the loader turns it off for cached latents
            validation_config=cfg.validation_config,
            num_workers=workers,
            scan_cache=Path(cfg.logdir) / ".cache" / "scan.json",
            num_replicas=num_replicas,
            rank=rank,
            masked_loss=cfg.masked_loss,
            mask_from_alpha=cfg.mask_from_alpha,
            caption_dropout_every_n_epochs=cfg.caption_dropout_every_n_epochs,
            keep_tokens_separator=cfg.keep_tokens_separator,
        )


def auto_num_workers(cpus: int) -> int:
    """Loader workers when train.json leaves num_workers null, for a process with `cpus` intra-op
    threads: none below 4, else half of them, at most 4. The step's threads already use every
    CPU; on so few a worker only takes time slices from them, while decoding a batch in the main
    process costs far less (4 images at 256 px: ~5 ms beside a ~0.8 s step on 2 cores,
    docs/PERFORMANCE.md)."""
    return 0 if cpus < 4 else min(4, cpus // 2)


class LoadedDataset:
    """Items, buckets and problems of a run, and the per-epoch batch plans built from them."""

    def __init__(
        self,
        settings: DataSettings,
        train_items: list[ImageItem],
        val_sets: dict[str, list[ImageItem]],
        stabilize_items: list[ImageItem],
        problems: list[Problem],
    ):
        self.settings = settings
        self.buckets = get_buckets(settings.resolution)
        self.train_items = sorted(train_items, key=lambda it: it.path)
        self.val_sets = val_sets
        self.stabilize_items = stabilize_items
        self.problems = list(problems)
        self.item_buckets: list[Bucket] = [
            nearest_bucket(it.width, it.height, self.buckets) for it in self.train_items
        ]
        self.bucket_counts: dict[Bucket, int] = dict(sorted(Counter(self.item_buckets).items()))
        self.undersized: list[Problem] = [
            Problem(
                it.path,
                f"{UNDERSIZED_PREFIX} {it.width}x{it.height} for bucket {b[0]}x{b[1]}; it is upscaled",
            )
            for it, b in zip(self.train_items, self.item_buckets, strict=True)
            if is_undersized(it.width, it.height, b)
        ]
        self.problems.extend(self.undersized)
        self._reported = {p.path for p in self.problems}
        self._plans: dict[int, EpochPlan] = {}
        source = settings.mask_source
        self.mask_report = scan_masks(self.train_items, source) if source is not None else None

    def record_problem(self, problem: Problem) -> None:
        """Record a batch-time failure; logged and stored once per path."""
        if problem.path in self._reported:
            return
        self._reported.add(problem.path)
        self.problems.append(problem)
        logger.warning("skipping image at batch time: %s (a same-bucket image is used instead)", problem)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """This rank's batches for `epoch`; a pure function of (seed, epoch, rank)."""
        if epoch not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            s = self.settings
            self._plans[epoch] = plan_epoch(
                self.train_items,
                self.item_buckets,
                epoch=epoch,
                seed=s.seed,
                batch_size=s.batch_size,
                grad_accum=s.grad_accum,
                default_flip_p=s.flip_p,
                num_replicas=s.num_replicas,
                rank=s.rank,
            )
        return self._plans[epoch]

    def batches_per_epoch(self) -> int:
        """Nominal batches per epoch (epoch 0's count; fractional multiply can vary it by a few)."""
        return len(self.epoch_plan(0).batches)

    def windows_per_epoch(self) -> int:
        """Nominal optimizer steps per epoch (epoch 0's accumulation windows on this rank)."""
        return len(self.epoch_plan(0).windows)

    def every_caption(self) -> list[str] | None:
        """Every caption a batch of this run can carry, sorted: each training, validation and
        stabilize image's fixed caption and "" (dropout, and the padding of long captions).
        None when an image of the training set shuffles its tags (train.json's shuffle_tags or
        its folder's): each epoch draws new permutations, which cannot be listed. Evaluation
        batches never shuffle or drop (`make_eval_loader`)."""
        s = self.settings
        if s.shuffle_tags or any(it.shuffle_tags for it in self.train_items):
            return None
        eval_items = [it for items in self.val_sets.values() for it in items] + list(self.stabilize_items)
        captions = {
            fixed_caption(it.caption, s.keep_tokens_separator) for it in self.train_items + eval_items
        }
        return sorted(captions | {""})

    def fingerprint(self) -> str:
        """Hash of the items and every setting that shapes the data order, for resume checks."""
        s = self.settings
        payload = {
            "items": [
                [it.path, it.width, it.height, it.caption.text, it.multiply, it.flip_p, it.batch_id]
                + [it.cond_dropout, it.shuffle_tags, it.loss_scale]
                for it in self.train_items
            ],
            "settings": {
                k: v
                for k, v in dataclasses.asdict(s).items()
                if k in ("resolution", "batch_size", "grad_accum", "seed", "flip_p", "num_replicas")
            },
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]

    def summary(self) -> str:
        """Start-up text: counts, buckets, repeats, validation split and every problem."""
        s = self.settings
        table = "EveryDream2 table" if is_ed2_table(s.resolution) else "generated table"
        lines = [
            f"data: {len(self.train_items)} training images, resolution {s.resolution} ({table}), "
            f"batch_size {s.batch_size}, grad_accum {s.grad_accum}",
            f"  {self.batches_per_epoch()} batches per epoch on this rank "
            f"({s.num_replicas} replica(s)); {sum(len(b) for b in self.epoch_plan(0).batches)} samples",
        ]
        for (w, h), n in self.bucket_counts.items():
            lines.append(f"  bucket {w}x{h}: {n} images")
        repeats = Counter(it.multiply for it in self.train_items)
        if set(repeats) != {1.0}:
            lines.append("  multiply: " + ", ".join(f"{m:g} x{n}" for m, n in sorted(repeats.items())))
        for name, items in self.val_sets.items():
            lines.append(f"  validation set {name!r}: {len(items)} images")
        if self.stabilize_items:
            lines.append(f"  stabilize-train set: {len(self.stabilize_items)} images")
        skipped = [p for p in self.problems if not p.reason.startswith(UNDERSIZED_PREFIX)]
        if skipped:
            lines.append(
                f"  {len(skipped)} data problem(s) (what each means for its image is said on its line):"
            )
            lines.extend(f"    {p}" for p in skipped)
        if self.undersized:
            lines.append(f"  {len(self.undersized)} undersized image(s) (trained, upscaled):")
            lines.extend(f"    {p.path}" for p in self.undersized)
        if self.mask_report is not None:
            lines.extend(self.mask_report.summary_lines())
        return "\n".join(lines)


def _discover_all(settings: DataSettings) -> tuple[list[ImageItem], list[Problem]]:
    from trainer.data.discovery import discover, require_trainable

    result = discover(settings.data_root, scan_cache=settings.scan_cache)
    require_trainable(result, settings.data_root)
    return list(result.items), list(result.problems)


def load_data(settings: DataSettings) -> LoadedDataset:
    """Discover, split and bucket; DataError when nothing is trainable."""
    get_buckets(settings.resolution)  # ConfigError naming `resolution` for settings built by hand
    items, problems = _discover_all(settings)
    val_sets: dict[str, list[ImageItem]] = {}
    stabilize: list[ImageItem] = []
    train = items
    if settings.validation_config:
        from trainer.data.validation_split import load_validation_config, split_dataset

        cfg = load_validation_config(settings.validation_config)
        if cfg is not None:
            split, split_problems = split_dataset(items, cfg, scan_cache=settings.scan_cache)
            train, val_sets, stabilize = split.train, dict(split.val), list(split.stabilize)
            problems.extend(split_problems)
    dataset = LoadedDataset(settings, train, val_sets, stabilize, problems)
    if not dataset.train_items or dataset.batches_per_epoch() == 0:
        raise DataError(
            f"data_root {settings.data_root!r}: nothing to train on after the validation split "
            f"({len(dataset.train_items)} training images, multiply, batch_size={settings.batch_size}, "
            f"num_replicas={settings.num_replicas}); add images or lower num_replicas"
        )
    return dataset
