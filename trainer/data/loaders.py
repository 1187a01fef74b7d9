"""Batches from an epoch plan: the Dataset (one index = one whole batch) and the loader.

A Dataset index is a *batch* index of the epoch plan, so a DataLoader worker builds a whole
batch and a mid-epoch resume is just "start at batch k". Each sample draws its crop, trim and
caption randomness from RNGs seeded by its SampleRef, so the tensors are bitwise identical with
0 or N workers and after a resume.

A file that fails to decode at batch time (changed or corrupted since the scan) does not stop
the run: the sample is replaced by another image of the same bucket, chosen deterministically
from the sample's own RNG, and the failure travels back with the batch so the main process
logs it once and records it in `plan.problems` (worker processes cannot write to the plan).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from trainer.data.batch import Batch
from trainer.data.buckets import Bucket, nearest_bucket
from trainer.data.caption_sampling import epoch_drops_captions, sample_caption
from trainer.data.dataset import DataSettings
from trainer.data.items import ImageItem, Problem
from trainer.data.latent_cache import LatentCache
from trainer.data.masks import MaskSource, process_image_and_mask, stack_masks
from trainer.data.planner import EpochPlan, SampleRef, plan_epoch, sample_rng
from trainer.data.transforms import load_image, process_image
from trainer.runtime.errors import DataError

logger = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SampleOptions:
    """Train.json values that apply to every sample unless the item overrides them."""

    crop_jitter: float = 0.02
    shuffle_tags: bool = False
    keep_tags: int = 0
    cond_dropout: float = 0.04
    random_trim: bool = True  # False: exact centre crop (evaluation)
    masks: MaskSource | None = None  # masked_loss: batches carry "masks"
    caption_dropout_every_n_epochs: int = 0
    keep_tokens_separator: str = ""

    @classmethod
    def for_training(cls, settings: DataSettings, latent_cache: LatentCache | None) -> SampleOptions:
        """The options of a run's training batches; no crop jitter on cached latents (each
        cached crop is one fixed latent)."""
        return cls(
            crop_jitter=0.0 if latent_cache is not None else settings.crop_jitter,
            shuffle_tags=settings.shuffle_tags,
            keep_tags=settings.keep_tags,
            cond_dropout=settings.cond_dropout,
            masks=settings.mask_source,
            caption_dropout_every_n_epochs=settings.caption_dropout_every_n_epochs,
            keep_tokens_separator=settings.keep_tokens_separator,
        )


class _SampleFailed(Exception):
    """One image could not be produced; carries the reason for the report."""


class PlanBatchDataset(Dataset):
    """Map-style dataset over the batches of one EpochPlan (index = batch index)."""

    def __init__(
        self,
        items: list[ImageItem],
        item_buckets: list[Bucket],
        epoch_plan: EpochPlan,
        options: SampleOptions,
        latent_cache: LatentCache | None = None,
    ):
        self.items = items
        self.item_buckets = item_buckets
        self.epoch_plan = epoch_plan
        self.options = options
        self.latent_cache = latent_cache
        self._by_bucket: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            self._by_bucket.setdefault(bucket, []).append(index)
        self._bad: dict[int, str] = {}  # per process: skip re-decoding known-bad files

    def __len__(self) -> int:
        return len(self.epoch_plan.batches)

    def _pixels_or_latent(self, item_index: int, ref: SampleRef) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sample's pixels (or cached latent) and, with masked_loss, its mask."""
        if item_index in self._bad:
            raise _SampleFailed(self._bad[item_index])
        path = self.items[item_index].path
        try:
            if self.latent_cache is not None:
                return self._cached_latent(path, ref)
            rng = sample_rng(ref, "image") if self.options.random_trim else None
            jitter, masks = self.options.crop_jitter, self.options.masks
            if masks is None:
                return process_image(
                    load_image(path), ref.bucket, rng=rng, jitter=jitter, flip=ref.flip
                ), None
            img, mask = masks.load(path)
            return process_image_and_mask(img, mask, ref.bucket, rng=rng, jitter=jitter, flip=ref.flip)
        except DECODE_ERRORS as err:
            reason = f"cannot decode at batch time ({type(err).__name__}: {err})"
            self._bad[item_index] = reason
            raise _SampleFailed(reason) from err

    def _cached_latent(self, path: str, ref: SampleRef) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.latent_cache is not None
        try:
            entry = self.latent_cache.get_entry(self.latent_cache.key(path, ref.bucket, ref.flip))
            return entry["latent"], entry.get("mask")
        except KeyError:
            load_image(path)  # a decode error here means fill skipped it: substitute
            raise DataError(
                f"{path}: no cached latent for bucket {ref.bucket} flip={ref.flip}; "
                "call fill_latent_cache(plan, cache, encode_fn) before make_loader"
            ) from None

    def _sample(self, ref: SampleRef, problems: list[Problem]) -> tuple[tuple, ImageItem]:
        try:
            return self._pixels_or_latent(ref.item_index, ref), self.items[ref.item_index]
        except _SampleFailed as err:
            problems.append(Problem(self.items[ref.item_index].path, str(err)))
        candidates = [i for i in self._by_bucket[ref.bucket] if i != ref.item_index]
        for index in sample_rng(ref, "replace").sample(candidates, len(candidates)):
            try:
                return self._pixels_or_latent(index, ref), self.items[index]
            except _SampleFailed as err:
                problems.append(Problem(self.items[index].path, str(err)))
        raise DataError(
            f"no image of bucket {ref.bucket[0]}x{ref.bucket[1]} can be decoded any more "
            f"(last failure: {problems[-1]}); fix or remove the files listed above"
        )

    def __getitem__(self, batch_index: int) -> Batch:
        refs = self.epoch_plan.batches[batch_index]
        problems: list[Problem] = []
        tensors, masks, captions, scales, paths = [], [], [], [], []
        for ref in refs:
            (tensor, mask), item = self._sample(ref, problems)
            shuffle = self.options.shuffle_tags or bool(item.shuffle_tags)
            dropout = item.cond_dropout if item.cond_dropout is not None else self.options.cond_dropout
            caption = sample_caption(
                item.caption,
                sample_rng(ref, "caption"),
                shuffle=shuffle,
                keep_tags=self.options.keep_tags,
                cond_dropout=dropout,
                separator=self.options.keep_tokens_separator,
            )
            captions.append(
                ""
                if epoch_drops_captions(ref.epoch, self.options.caption_dropout_every_n_epochs)
                else caption
            )
            tensors.append(tensor)
            masks.append(mask)
            scales.append(item.loss_scale)
            paths.append(item.path)
        cached = self.latent_cache is not None
        return Batch(
            captions,
            # Noise and timestep seeds per sample: the same sample gets the same draws whatever
            # the number of processes, workers or resumes (see TrainingStep).
            [sample_rng(ref, "noise").getrandbits(63) for ref in refs],
            latents=torch.stack(tensors) if cached else None,
            pixel_values=None if cached else torch.stack(tensors),
            masks=stack_masks(masks, tensors) if self.options.masks is not None else None,
            loss_scale=torch.tensor(scales, dtype=torch.float32),
            paths=paths,
            batch_index=batch_index,
            global_window_samples=self.epoch_plan.global_window_samples(batch_index),
            window_end=self.epoch_plan.is_window_end(batch_index),
            problems=problems,
        )


def _identity(batch: Batch) -> Batch:
    return batch


def _recording_problems(recorder, loader) -> Iterator[Batch]:
    """The loader's batches, their decode problems recorded in `recorder` (workers cannot)."""
    for batch in loader:
        for problem in batch.problems:
            recorder.record_problem(problem)
        batch.problems = []  # recorded once, here
        yield batch


class RunBatchDataset(PlanBatchDataset):
    """Index = (epoch, batch index): one dataset, so one set of loader workers, for a run.

    The epoch plan comes from `plans(epoch)`, a pure function of (seed, epoch, rank) for
    training (`LoadedDataset.epoch_plan`) and one fixed plan for evaluation, computed where
    the batch is built (a worker computes it in its own process), so persistent workers need
    nothing sent to them at an epoch change.
    """

    def __init__(
        self,
        items: list[ImageItem],
        buckets: list[Bucket],
        plans: Callable[[int], EpochPlan],
        options: SampleOptions,
        latent_cache: LatentCache | None = None,
    ):
        super().__init__(items, buckets, plans(0), options, latent_cache)
        self.plans = plans

    @classmethod
    def for_training(cls, data, options: SampleOptions, latent_cache: LatentCache | None = None):
        return cls(data.train_items, data.item_buckets, data.epoch_plan, options, latent_cache)

    def __getitem__(self, index: tuple[int, int]) -> Batch:  # type: ignore[override]
        epoch, batch_index = index
        self.epoch_plan = self.plans(epoch)
        return super().__getitem__(batch_index)


class _EpochSampler:
    """(epoch, batch) indices of the epoch set last; read anew by each `iter(DataLoader)`."""

    def __init__(self) -> None:
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, b) for b in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class RunLoader:
    """The one loader, for training, validation and the benchmarks: built once,
    `epoch(e, start_batch)` iterates epoch `e` from `start_batch` on (exact mid-epoch resume).
    With workers, they persist across epochs (no new worker processes, and no wait for their
    first batch, at every epoch start). Decode problems are recorded in `recorder`."""

    def __init__(self, recorder, dataset: RunBatchDataset, *, num_workers: int, pin_memory: bool):
        self.recorder = recorder
        self.dataset = dataset
        self.sampler = _EpochSampler()
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=self.sampler,
            num_workers=num_workers,
            # torch types collate_fn for lists, but with batch_size=None it gets each item itself
            collate_fn=_identity,  # type: ignore[arg-type]
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        batches = len(self.dataset.plans(epoch).batches)
        if not 0 <= start_batch <= batches:
            raise ValueError(f"start_batch={start_batch} is outside epoch {epoch}'s {batches} batches")
        self.sampler.epoch, self.sampler.start, self.sampler.stop = epoch, start_batch, batches
        return _recording_problems(self.recorder, self.loader)


def make_run_loader(data, *, latent_cache: LatentCache | None = None, pin_memory: bool = False) -> RunLoader:
    """The training loader for every epoch of a run (see RunLoader).

    With a latent cache, crop jitter is off and batches carry latents instead of pixels; they
    are read in the main process (no decoding left to parallelise, and workers would copy an
    in-memory cache)."""
    workers = 0 if latent_cache is not None else data.settings.num_workers
    options = SampleOptions.for_training(data.settings, latent_cache)
    dataset = RunBatchDataset.for_training(data, options, latent_cache)
    return RunLoader(data, dataset, num_workers=workers, pin_memory=pin_memory)


def make_loader(
    plan,
    epoch_plan: EpochPlan,
    *,
    start_batch: int = 0,
    latent_cache: LatentCache | None = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """The training batches of one epoch from `start_batch` on, through the run's loader."""
    loader = make_run_loader(plan, latent_cache=latent_cache, pin_memory=pin_memory)
    return loader.epoch(epoch_plan.epoch, start_batch=start_batch)


@dataclass(frozen=True)
class _FixedPlan:
    """The same plan for every epoch (evaluation); a class, not a lambda, so workers can take it."""

    plan: EpochPlan

    def __call__(self, epoch: int) -> EpochPlan:
        return self.plan


def make_eval_loader(
    plan,
    items: list[ImageItem],
    *,
    batch_size: int | None = None,
    seed: int | None = None,
    latent_cache: LatentCache | None = None,
) -> Iterator[Batch]:
    """Deterministic batches over a validation / stabilize set (same buckets as training).

    Every item once, no flip, centre crop, no tag shuffle, no caption dropout; the order
    depends only on `seed` (default: the training seed), so every evaluation sees
    exactly the same samples. Ranks split the batches like training batches do.
    """
    s = plan.settings
    fixed = [
        dataclasses.replace(it, multiply=1.0, flip_p=0.0, cond_dropout=0.0, shuffle_tags=False)
        for it in items
    ]
    buckets = [nearest_bucket(it.width, it.height, plan.buckets) for it in fixed]
    epoch_plan = plan_epoch(
        fixed,
        buckets,
        epoch=0,
        seed=s.seed if seed is None else seed,
        batch_size=batch_size or s.batch_size,
        num_replicas=s.num_replicas,
        rank=s.rank,
    )
    options = SampleOptions(
        crop_jitter=0.0,
        shuffle_tags=False,
        keep_tags=0,
        cond_dropout=0.0,
        random_trim=False,
        masks=s.mask_source,
        keep_tokens_separator=s.keep_tokens_separator,
    )
    dataset = RunBatchDataset(fixed, buckets, _FixedPlan(epoch_plan), options, latent_cache)
    workers = 0 if latent_cache is not None else s.num_workers
    return RunLoader(plan, dataset, num_workers=workers, pin_memory=False).epoch(0)
