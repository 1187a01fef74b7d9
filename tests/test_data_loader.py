"""make_loader: batch contents, exact resume with 0 and 2 workers, flips, decode failures."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import DataSettings, auto_num_workers, load_data, make_eval_loader, make_loader
from trainer.data.batch import Batch
from trainer.data.dataset import LoadedDataset
from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.loaders import RunBatchDataset, RunLoader, SampleOptions
from trainer.data.transforms import load_image, to_tensor
from trainer.runtime.errors import DataError


def _write(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _settings(tmp_path, **kw):
    base = {"data_root": str(tmp_path), "resolution": 128, "batch_size": 3, "seed": 7, "crop_jitter": 0.05}
    return DataSettings(**(base | kw))


def _make(tmp_path, n=14, sizes=None, item_flip_p=None, **kw):
    items = []
    for k in range(n):
        w, h = sizes[k] if sizes else ((270, 70) if k % 4 == 0 else (150, 140))
        path = _write(tmp_path / f"img{k:02d}.png", w, h, k)
        tags = tuple((f"tag{t}", 1.0) for t in range(4))
        items.append(
            ImageItem(path, w, h, CaptionSpec(f"main {k}", tags), loss_scale=1.0 + k / 10, flip_p=item_flip_p)
        )
    return LoadedDataset(_settings(tmp_path, **kw), items, {}, [], [])


def _same(a, b):
    for field in dataclasses.fields(b):  # b: a plain Batch (a may carry more)
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, workers):
    plan = _make(tmp_path, num_workers=workers, shuffle_tags=True, flip_p=0.5)
    epoch = plan.epoch_plan(1)
    full = list(make_loader(plan, epoch))
    assert [b.batch_index for b in full] == list(range(len(epoch.batches)))
    k = 2
    resumed = list(make_loader(plan, plan.epoch_plan(1), start_batch=k))
    assert len(resumed) == len(full) - k
    for a, b in zip(full[k:], resumed, strict=True):
        _same(a, b)
    if workers:
        serial = LoadedDataset(
            _settings(tmp_path, num_workers=0, shuffle_tags=True, flip_p=0.5), plan.train_items, {}, [], []
        )
        for a, b in zip(full, make_loader(serial, serial.epoch_plan(1)), strict=True):
            _same(a, b)


@dataclasses.dataclass
class _PidBatch(Batch):
    pid: int = 0  # the process that built it


class _PidDataset(RunBatchDataset):
    """Tags each batch with the process that built it."""

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        return _PidBatch(
            **{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, pid=os.getpid()
        )


def test_run_loader_keeps_its_workers_across_epochs_and_gives_make_loaders_batches(tmp_path):
    """One loader for the run: an epoch change starts no new worker processes, and every epoch
    (and a mid-epoch start) yields bitwise the batches of the per-epoch loader."""
    plan = _make(tmp_path, n=8, num_workers=2, shuffle_tags=True, flip_p=0.5)
    dataset = _PidDataset.for_training(plan, SampleOptions.for_training(plan.settings, None))
    loader = RunLoader(plan, dataset, num_workers=2, pin_memory=False)
    pids = set()
    for epoch, start in ((0, 0), (1, 0), (2, 1)):
        got = list(loader.epoch(epoch, start_batch=start))
        expected = list(make_loader(plan, plan.epoch_plan(epoch), start_batch=start))
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected, strict=True):
            pids.add(a.pid)
            _same(a, b)
    assert len(pids) == 2 and os.getpid() not in pids  # the same two workers throughout
    with pytest.raises(ValueError, match="start_batch=9"):
        loader.epoch(0, start_batch=9)


def test_automatic_worker_count_leaves_few_cpus_to_the_step():
    assert [auto_num_workers(n) for n in (1, 2, 3, 4, 6, 8, 16, 64)] == [0, 0, 0, 2, 3, 4, 4, 4]


def test_batch_contents(tmp_path):
    plan = _make(tmp_path, cond_dropout=0.0, shuffle_tags=True, keep_tags=1)
    epoch = plan.epoch_plan(0)
    seen = []
    for batch in make_loader(plan, epoch):
        x = batch.pixel_values
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        assert x.shape[0] == len(batch.captions) == len(batch.paths) == batch.loss_scale.shape[0]
        assert tuple(x.shape[2:]) in {(128, 128), (64, 256)}
        assert batch.global_window_samples == x.shape[0]  # grad_accum 1, one process: the window is the batch
        for cap, path, scale in zip(batch.captions, batch.paths, batch.loss_scale, strict=True):
            k = int(path[-6:-4])
            assert cap.startswith(f"main {k}, tag0, ")
            assert scale.item() == pytest.approx(1.0 + k / 10)
        seen += batch.paths
    assert sorted(seen) == sorted(it.path for it in plan.train_items)
    # different epochs shuffle tags differently
    caps0 = {
        p: c for b in make_loader(plan, plan.epoch_plan(0)) for p, c in zip(b.paths, b.captions, strict=True)
    }
    caps1 = {
        p: c for b in make_loader(plan, plan.epoch_plan(1)) for p, c in zip(b.paths, b.captions, strict=True)
    }
    assert caps0 != caps1


@pytest.mark.parametrize(
    ("settings_p", "item_p", "flipped"),
    [(1.0, None, True), (0.0, 1.0, True), (1.0, 0.0, False), (0.0, None, False)],
)
def test_flip_from_settings_and_item_mirrors_pixels(tmp_path, settings_p, item_p, flipped):
    plan = _make(tmp_path, n=4, sizes=[(128, 128)] * 4, item_flip_p=item_p, flip_p=settings_p)
    for batch in make_loader(plan, plan.epoch_plan(0)):
        for x, path in zip(batch.pixel_values, batch.paths, strict=True):
            original = to_tensor(load_image(path))  # exactly bucket-sized: no crop randomness
            assert torch.equal(x, original.flip(-1) if flipped else original)


def test_decode_failure_is_substituted_and_reported_once(tmp_path, caplog):
    plan = _make(tmp_path, n=9, sizes=[(128, 128)] * 9)
    bad = plan.train_items[3].path
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            paths = [p for b in make_loader(plan, plan.epoch_plan(epoch)) for p in b.paths]
            assert len(paths) == 9 and bad not in paths
    assert [p.path for p in plan.problems] == [bad]
    assert sum(bad in r.getMessage() for r in caplog.records) == 1
    again = [p for b in make_loader(plan, plan.epoch_plan(0)) for p in b.paths]
    first = [p for b in make_loader(plan, plan.epoch_plan(0)) for p in b.paths]
    assert again == first  # the replacement is deterministic


def test_load_data_end_to_end(tmp_path):
    for k in range(5):
        _write(tmp_path / f"a{k}.png", 140, 130, k)
        (tmp_path / f"a{k}.txt").write_text(f"picture {k}, red, blue")
    plan = load_data(_settings(tmp_path, batch_size=2))
    assert len(plan.train_items) == 5
    assert plan.bucket_counts == {(128, 128): 5}
    assert plan.batches_per_epoch() == 3
    assert len(plan.fingerprint()) == 16
    assert plan.fingerprint() == load_data(_settings(tmp_path, batch_size=2)).fingerprint()
    assert plan.fingerprint() != load_data(_settings(tmp_path, batch_size=3)).fingerprint()
    assert "5 training images" in plan.summary()
    batches = list(make_loader(plan, plan.epoch_plan(0)))
    assert sum(len(b.paths) for b in batches) == 5


def test_load_data_nothing_trainable(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError):
        load_data(_settings(tmp_path))


def test_validation_split_and_eval_loader(tmp_path):
    for k in range(10):
        _write(tmp_path / f"a{k}.png", 140, 130, k)
        (tmp_path / f"a{k}.txt").write_text(f"picture {k}, red, blue")
    cfg = tmp_path.parent / f"{tmp_path.name}_val.json"
    cfg.write_text('{"val_split_mode": "automatic", "auto_split_proportion": 0.3}')
    plan = load_data(
        _settings(tmp_path, batch_size=2, validation_config=str(cfg), cond_dropout=1.0, flip_p=1.0)
    )
    (name, val_items), *_ = plan.val_sets.items()
    assert len(val_items) == 3 and len(plan.train_items) == 7
    assert not {it.path for it in val_items} & {it.path for it in plan.train_items}
    runs = [list(make_eval_loader(plan, val_items)) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        _same(a, b)
    paths = [p for b in runs[0] for p in b.paths]
    assert sorted(paths) == sorted(it.path for it in val_items)
    for batch in runs[0]:
        assert all(c.startswith("picture") for c in batch.captions)  # no dropout in evaluation
        for x, path in zip(batch.pixel_values, batch.paths, strict=True):
            centre = to_tensor(
                load_image(path).crop((5, 0, 135, 130)).resize((128, 128), Image.Resampling.LANCZOS)
            )
            assert torch.equal(x, centre)  # centre crop, never flipped
