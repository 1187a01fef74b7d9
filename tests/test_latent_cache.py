"""Latent cache: keys, reuse across epochs and instances, loader integration."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from trainer.data import DataSettings, LatentCache, fill_latent_cache, make_loader
from trainer.data.dataset import LoadedDataset
from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.latent_cache import latent_key


class CountingEncoder:
    """Stand-in VAE: 8x average pool to 4 channels; counts calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1) * 0.18215


def _plan(tmp_path, n=6, flip_p=0.0, item_flip=None):
    items = []
    for k in range(n):
        w, h = (140, 130) if k % 3 else (260, 70)
        path = tmp_path / f"i{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(str(path), w, h, CaptionSpec(f"c{k}"), flip_p=item_flip if k == 0 else None))
    s = DataSettings(data_root=str(tmp_path), resolution=128, batch_size=2, flip_p=flip_p, cond_dropout=0.0)
    return LoadedDataset(s, items, {}, [], [])


def test_key_changes_with_file_vae_bucket_and_flip(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(path)
    base = latent_key(str(path), (128, 128), False, "vae-a")
    assert latent_key(str(path), (128, 128), False, "vae-a") == base
    assert latent_key(str(path), (128, 128), False, "vae-b") != base
    assert latent_key(str(path), (256, 64), False, "vae-a") != base
    assert latent_key(str(path), (128, 128), True, "vae-a") != base
    Image.new("RGB", (10, 10), (9, 9, 9)).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert latent_key(str(path), (128, 128), False, "vae-a") != base


def test_second_epoch_reuses_and_loader_serves_latents(tmp_path):
    plan = _plan(tmp_path)
    cache = LatentCache(None, "vae-a")
    enc = CountingEncoder()
    stats = fill_latent_cache(plan, cache, enc, batch_size=4)
    assert stats["computed"] == 6 and stats["reused"] == 0 and len(cache) == 6
    assert enc.calls == 2  # one call per bucket (4 square, 2 wide), batched by bucket
    again = fill_latent_cache(plan, cache, enc, batch_size=4)
    assert again["computed"] == 0 and again["reused"] == 6 and enc.calls == 2
    for epoch in range(2):
        batches = list(make_loader(plan, plan.epoch_plan(epoch), latent_cache=cache))
        assert sum(len(b.paths) for b in batches) == 6
        for b in batches:
            assert b.pixel_values is None
            assert b.latents.shape[1] == 4 and tuple(b.latents.shape[2:]) in {(16, 16), (8, 32)}
    assert enc.calls == 2
    # the cached latent is the encoding of the deterministic (centre crop, no jitter) image
    b = batches[0]
    idx = [it.path for it in plan.train_items].index(b.paths[0])
    key = cache.key(b.paths[0], plan.item_buckets[idx], False)
    assert torch.equal(b.latents[0], cache.get(key))


def test_flipped_variant_only_when_flip_possible(tmp_path):
    plan = _plan(tmp_path, item_flip=1.0)  # only item 0 can flip
    cache = LatentCache(None, "v")
    stats = fill_latent_cache(plan, cache, CountingEncoder(), batch_size=8)
    assert stats["computed"] == 7
    batches = list(make_loader(plan, plan.epoch_plan(0), latent_cache=cache))
    flipped_key = cache.key(plan.train_items[0].path, plan.item_buckets[0], True)
    b0 = next(b for b in batches if plan.train_items[0].path in b.paths)
    i = b0.paths.index(plan.train_items[0].path)
    assert torch.equal(b0.latents[i], cache.get(flipped_key))


def test_disk_cache_survives_new_instance(tmp_path):
    plan = _plan(tmp_path)
    cache_dir = tmp_path / "cache"
    enc = CountingEncoder()
    fill_latent_cache(plan, LatentCache(cache_dir, "vae-a"), enc, batch_size=3)
    assert len(list(cache_dir.glob("*.safetensors"))) == 6
    fresh = LatentCache(cache_dir, "vae-a")
    assert len(fresh) == 6
    stats = fill_latent_cache(plan, fresh, enc, batch_size=3)
    assert stats == stats | {"computed": 0, "reused": 6}
    other_vae = fill_latent_cache(plan, LatentCache(cache_dir, "vae-b"), enc, batch_size=3)
    assert other_vae["computed"] == 6
    batches = list(make_loader(plan, plan.epoch_plan(0), latent_cache=fresh))
    assert sum(len(b.paths) for b in batches) == 6


def test_cache_admin_lists_by_vae_and_prunes_only_what_cannot_be_used(tmp_path, capsys):
    from safetensors.torch import save_file

    from trainer.data import cache_admin

    images, cache_dir = tmp_path / "images", tmp_path / "logs" / ".cache" / "latents"
    images.mkdir()
    plan = _plan(images, n=3)
    fill_latent_cache(plan, LatentCache(cache_dir, "vae-a"), CountingEncoder(), batch_size=4)
    fill_latent_cache(plan, LatentCache(cache_dir, "vae-b"), CountingEncoder(), batch_size=4)
    save_file({"latent": torch.zeros(4, 2, 2)}, str(cache_dir / ("0" * 64 + ".safetensors")))  # no metadata
    edited = plan.train_items[0].path
    st = os.stat(edited)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # its 2 entries are now stale

    assert cache_admin.main(["--logdir", str(tmp_path / "logs")]) == 0
    listing = capsys.readouterr().out
    assert f"latent cache {cache_dir}: 7 entries" in listing
    assert "VAE vae-a: 3 entries" in listing and "VAE vae-b: 3 entries" in listing
    assert "VAE (no metadata): 1 entries" in listing
    assert "3 stale entries can never be used again" in listing

    assert cache_admin.main(["--logdir", str(tmp_path / "logs"), "--prune", "--dry-run"]) == 0
    assert "would delete 3 entries" in capsys.readouterr().out and len(list(cache_dir.iterdir())) == 7
    assert cache_admin.main(["--logdir", str(tmp_path / "logs"), "--prune"]) == 0
    assert "deleted 3 entries" in capsys.readouterr().out
    # what is left is exactly what a run would still hit
    cache = LatentCache(cache_dir, "vae-a")
    stats = fill_latent_cache(plan, cache, CountingEncoder(), batch_size=4)
    assert stats == {**stats, "computed": 1, "reused": 2}
    assert cache_admin.main(["--cache", str(cache_dir), "--prune", "--vae", "vae-b"]) == 0
    assert {e.vae for g in cache_admin.scan(cache_dir) for e in g.entries} == {"vae-a"}
