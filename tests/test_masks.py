"""Loss masks (trainer/data/masks.py): sources, alignment through every transform, the cache,
discovery and the start-up report; kohya's caption keys (caption_sampling.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_latent_cache import CountingEncoder
from trainer.data import DataSettings, LatentCache, fill_latent_cache, make_loader
from trainer.data.caption_sampling import epoch_drops_captions, sample_caption
from trainer.data.dataset import LoadedDataset
from trainer.data.discovery import discover
from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.latent_cache import latent_key
from trainer.data.masks import MaskSource, mask_file_for, process_image_and_mask, scan_masks
from trainer.data.transforms import process_image
from trainer.runtime.errors import DataError


def _gradient(w: int, h: int) -> np.ndarray:
    """An asymmetric grey pattern: a horizontal ramp plus a block in the top-left corner."""
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64), (h, 1))
    ramp[: h // 3, : w // 4] = 255
    return ramp.astype(np.uint8)


def _image_and_mask(tmp_path, w: int, h: int, name: str = "img"):
    """An RGB image whose red channel equals its mask file (so alignment is checkable)."""
    grey = _gradient(w, h)
    rgb = np.stack([grey, np.full_like(grey, 40), np.full_like(grey, 200)], axis=-1)
    path = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(path)
    Image.fromarray(grey, mode="L").save(mask_file_for(path))
    return path


def _mask_matches_red(pixels: torch.Tensor, mask: torch.Tensor) -> None:
    # pixels = x / 127.5 - 1, mask = x / 255 for the same uint8 x after the same cut and filter.
    assert torch.equal(torch.round((pixels[0] + 1) * 127.5), torch.round(mask[0] * 255))


@pytest.mark.parametrize("flip", [False, True])
def test_mask_follows_crop_jitter_trim_resize_and_flip(tmp_path, flip):
    path = _image_and_mask(tmp_path, 300, 170)
    img, mask = MaskSource("file").load(str(path))
    bucket = (192, 128)
    pixels, m = process_image_and_mask(img, mask, bucket, rng=random.Random(7), jitter=0.1, flip=flip)
    assert m.shape == (1, 128, 192) and pixels.shape == (3, 128, 192)
    _mask_matches_red(pixels, m)
    # The draws are process_image's: masked training does not change a pixel of the images.
    assert torch.equal(pixels, process_image(img, bucket, rng=random.Random(7), jitter=0.1, flip=flip))
    # The mask is asymmetric, so a flip is visible: the flipped mask is the mirror of the plain one.
    _, plain = process_image_and_mask(img, mask, bucket, rng=random.Random(7), jitter=0.1, flip=False)
    assert not torch.equal(plain, plain.flip(-1))
    assert torch.equal(m, plain.flip(-1) if flip else plain)


def test_alpha_mask_and_missing_mask(tmp_path):
    alpha = _gradient(64, 64)
    rgba = np.dstack([np.zeros((64, 64, 3), np.uint8), alpha])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img, mask = MaskSource("alpha").load(str(tmp_path / "a.png"))
    assert img.mode == "RGB" and np.asarray(mask).tolist() == alpha.tolist()
    _, m = process_image_and_mask(img, mask, (64, 64), rng=None, jitter=0.0, flip=False)
    assert torch.equal(m[0], torch.from_numpy(alpha).float() / 255)
    # No mask file (or no alpha): full weight, exactly ones.
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    for kind in ("file", "alpha"):
        img, mask = MaskSource(kind).load(str(tmp_path / "b.png"))
        assert mask is None
        _, m = process_image_and_mask(img, mask, (64, 64), rng=None, jitter=0.0, flip=False)
        assert torch.equal(m, torch.ones(1, 64, 64))


def test_discovery_skips_mask_files_and_scan_reports_missing_and_refuses_wrong_size(tmp_path):
    _image_and_mask(tmp_path, 80, 64, "with")
    Image.new("RGB", (80, 64)).save(tmp_path / "without.png")
    result = discover(str(tmp_path))
    names = sorted(p.split("/")[-1] for p in (it.path for it in result.items))
    assert names == ["with.png", "without.png"]
    report = scan_masks(list(result.items), MaskSource("file"))
    assert report.with_mask == 1 and [p.split("/")[-1] for p in report.without_mask] == ["without.png"]
    text = "\n".join(report.summary_lines())
    assert "1 image(s) without one train at full weight" in text and "without.png" in text
    Image.new("L", (10, 10)).save(mask_file_for(tmp_path / "without.png"))
    with pytest.raises(DataError, match="without-masklabel.png: mask is 10x10 but its image"):
        scan_masks(list(result.items), MaskSource("file"))


def _masked_plan(tmp_path, n=3):
    items = []
    for k in range(n):
        path = _image_and_mask(tmp_path, 140, 130, f"i{k}")
        items.append(ImageItem(str(path), 140, 130, CaptionSpec(f"c{k}")))
    Image.new("RGB", (140, 130)).save(tmp_path / "nomask.png")
    items.append(ImageItem(str(tmp_path / "nomask.png"), 140, 130, CaptionSpec("n")))
    s = DataSettings(
        data_root=str(tmp_path), resolution=128, batch_size=2, flip_p=0.5, cond_dropout=0.0, masked_loss=True
    )
    return LoadedDataset(s, items, {}, [], [])


def test_loader_batches_carry_masks_and_the_latent_cache_stores_them(tmp_path):
    plan = _masked_plan(tmp_path)
    assert "1 image(s) without one train at full weight" in plan.summary()
    pixel_batches = list(make_loader(plan, plan.epoch_plan(0)))
    for batch in pixel_batches:
        assert batch.masks.shape == (2, 1, 128, 128)
        for pixels, m, path in zip(batch.pixel_values, batch.masks, batch.paths, strict=True):
            if path.endswith("nomask.png"):
                assert torch.equal(m, torch.ones_like(m))
            else:
                _mask_matches_red(pixels, m)
    cache = LatentCache(tmp_path / "cache", "vae-a", masks=plan.settings.mask_source)
    fill_latent_cache(plan, cache, CountingEncoder(), batch_size=4)
    # An unmasked cache keeps its old keys; a masked entry has its own key.
    item = plan.train_items[0]
    assert cache.key(item.path, (128, 128), False) != latent_key(item.path, (128, 128), False, "vae-a")
    reopened = LatentCache(tmp_path / "cache", "vae-a", masks=plan.settings.mask_source)
    centre = make_loader(plan, plan.epoch_plan(0), latent_cache=reopened)
    for batch in centre:
        assert batch.masks.shape == (2, 1, 16, 16) and batch.latents.shape == (2, 4, 16, 16)
        for m, ref in zip(batch.masks, plan.epoch_plan(0).batches[batch.batch_index], strict=True):
            img, mask = MaskSource("file").load(plan.train_items[ref.item_index].path)
            _, full = process_image_and_mask(img, mask, ref.bucket, rng=None, jitter=0.0, flip=ref.flip)
            assert torch.equal(m, F.interpolate(full[None], size=(16, 16), mode="area")[0])
    # Editing a mask file makes a new key: the stale entry is not served.
    before = cache.key(item.path, (128, 128), False)
    Image.new("L", (140, 130), 255).save(mask_file_for(item.path))
    assert cache.key(item.path, (128, 128), False) != before


def test_keep_tokens_separator_as_kohya():
    spec = CaptionSpec("artist", tags=(("style ||| cat", 1.0), ("dog", 1.0), ("tree ||| low quality", 1.0)))
    assert spec.text == "artist, style ||| cat, dog, tree ||| low quality"
    seen = set()
    for seed in range(30):
        text = sample_caption(
            spec, random.Random(seed), shuffle=True, keep_tags=0, cond_dropout=0.0, separator="|||"
        )
        assert text.startswith("artist, style, ") and text.endswith(", low quality")
        seen.add(text)
    assert seen == {
        "artist, style, " + ", ".join(p) + ", low quality"
        for p in (("cat", "dog", "tree"), ("cat", "tree", "dog"), ("dog", "cat", "tree"))
        + (("dog", "tree", "cat"), ("tree", "cat", "dog"), ("tree", "dog", "cat"))
    }
    # Without shuffling the separator is removed, the order kept; without the separator nothing changes.
    plain = sample_caption(
        spec, random.Random(0), shuffle=False, keep_tags=0, cond_dropout=0.0, separator="|||"
    )
    assert plain == "artist, style, cat, dog, tree, low quality"
    other = sample_caption(
        spec, random.Random(0), shuffle=False, keep_tags=0, cond_dropout=0.0, separator="##"
    )
    assert other == spec.text


def test_caption_dropout_every_n_epochs_counts_epochs_from_one_as_kohya(tmp_path):
    assert [e for e in range(7) if epoch_drops_captions(e, 3)] == [2, 5]  # kohya's epochs 3 and 6
    assert not any(epoch_drops_captions(e, 0) for e in range(5))
    plan = _caption_plan(tmp_path)
    for epoch in range(3):
        captions = [c for b in make_loader(plan, plan.epoch_plan(epoch)) for c in b.captions]
        assert (set(captions) == {""}) == (epoch == 1), (epoch, captions)


def _caption_plan(folder):
    items = []
    for k in range(4):
        Image.new("RGB", (64, 64)).save(folder / f"{k}.png")
        items.append(ImageItem(str(folder / f"{k}.png"), 64, 64, CaptionSpec(f"caption {k}")))
    s = DataSettings(
        data_root=str(folder), resolution=64, batch_size=2, cond_dropout=0.0, caption_dropout_every_n_epochs=2
    )
    return LoadedDataset(s, items, {}, [], [])


def test_mask_file_modes_rgb_luminance_and_transparent_is_background(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    painted = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    painted.paste((255, 255, 255, 255), (0, 0, 4, 8))  # left half painted white, the rest transparent
    painted.save(mask_file_for(tmp_path / "a.png"))
    _, mask = MaskSource("file").load(str(tmp_path / "a.png"))
    assert mask.mode == "L" and np.asarray(mask)[0].tolist() == [255] * 4 + [0] * 4
    Image.new("RGB", (8, 8), (255, 255, 255)).save(mask_file_for(tmp_path / "a.png"))
    _, mask = MaskSource("file").load(str(tmp_path / "a.png"))
    assert np.asarray(mask).min() == 255
