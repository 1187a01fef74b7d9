"""Per-sample image processing: decode, crop jitter, trim to the bucket aspect, resize, flip.

EveryDream2's order (image_train_item.py `hydrate`) is kept: load + EXIF transpose, crop
jitter, trim the overflowing axis to the bucket aspect with a triangular offset, resize, flip,
normalise to [-1, 1]. All randomness comes from the `random.Random` passed in, which the
caller seeds per sample from (seed, epoch, position), so a sample is identical with any
number of DataLoader workers and after a resume.

Colour handling (ED2 just called `.convert("RGB")`, which drops alpha and mangles 16-bit):
CMYK / L / palette images are converted to RGB; 16-bit greyscale is scaled to 8 bits; any
alpha (RGBA, LA, palette transparency) is composited on a **white** background, because
transparent regions usually store black and "on white" is what image viewers show.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.buckets import Bucket

# Bump when the processing below changes so that cached latents are recomputed.
TRANSFORM_VERSION = 1
ALPHA_BACKGROUND = (255, 255, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, alpha composited on ALPHA_BACKGROUND."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, ALPHA_BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode fully (so truncation errors surface here), apply EXIF orientation, make RGB."""
    with Image.open(path) as file:
        file.load()
        return _to_rgb(ImageOps.exif_transpose(file))


Box = tuple[int, int, int, int]


def jitter_box(size: tuple[int, int], bucket: Bucket, jitter: float, rng: random.Random) -> Box | None:
    """ED2's jitter: up to `min(w, h) * j` pixels off each side, `j` capped by the size slack.

    `j = clamp(min((w - bw) / bw, (h - bh) / bh), 0, jitter)`, so an image barely larger than
    its bucket is not jittered (it would have to be upscaled again). None = no crop (no draw).
    """
    w, h = size
    bw, bh = bucket
    j = min(max(min((w - bw) / bw, (h - bh) / bh), 0.0), jitter)
    max_px = int(min(w, h) * j)
    if max_px <= 0:
        return None
    left, top, right, bottom = (rng.uniform(0, max_px) for _ in range(4))
    return (int(left), int(top), w - int(right), h - int(bottom))


def trim_box(size: tuple[int, int], bucket: Bucket, rng: random.Random | None) -> Box | None:
    """Crop box of the overflowing axis to the bucket aspect; offset ~ triangular (mode = centre).

    `rng=None` gives the exact centre crop (used for cached latents, which must not vary).
    """
    w, h = size
    target = bucket[0] / bucket[1]
    if w / h > target:  # too wide
        new_w = max(1, round(h * target))
        overflow = w - new_w
        x = rng.triangular(0, overflow) if rng is not None else overflow / 2
        return (int(x), 0, int(x) + new_w, h)
    new_h = max(1, round(w / target))
    overflow = h - new_h
    if overflow <= 0:
        return None
    y = rng.triangular(0, overflow) if rng is not None else overflow / 2
    return (0, int(y), w, int(y) + new_h)


def crop_jitter(img: Image.Image, bucket: Bucket, jitter: float, rng: random.Random) -> Image.Image:
    """`jitter_box` applied to an image."""
    box = jitter_box(img.size, bucket, jitter, rng)
    return img if box is None else img.crop(box)


def trim_to_aspect(img: Image.Image, bucket: Bucket, rng: random.Random | None) -> Image.Image:
    """`trim_box` applied to an image."""
    box = trim_box(img.size, bucket, rng)
    return img if box is None else img.crop(box)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1] (ED2: ToTensor + Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def geometry(
    size: tuple[int, int], bucket: Bucket, *, rng: random.Random | None, jitter: float
) -> tuple[Box | None, Box | None]:
    """The two crops of one sample (jitter, then trim), drawn in ED2's order, so an image and
    its loss mask can be cut identically. `rng=None`: no jitter and the exact centre trim."""
    first = jitter_box(size, bucket, jitter, rng) if rng is not None and jitter > 0 else None
    cropped = size if first is None else (first[2] - first[0], first[3] - first[1])
    return first, trim_box(cropped, bucket, rng)


def apply_geometry(
    img: Image.Image, boxes: tuple[Box | None, Box | None], bucket: Bucket, flip: bool
) -> Image.Image:
    """Crop by `boxes`, resize to the bucket, mirror when `flip`.

    Resizing uses Lanczos when shrinking (sharp, alias-free) and bicubic when enlarging
    (Lanczos rings on upscales); a mask goes through the same filter, so it stays aligned.
    """
    for box in boxes:
        if box is not None:
            img = img.crop(box)
    if img.size != bucket:
        shrinking = img.size[0] >= bucket[0]
        img = img.resize(bucket, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    return ImageOps.mirror(img) if flip else img


def process_image(
    img: Image.Image,
    bucket: Bucket,
    *,
    rng: random.Random | None,
    jitter: float,
    flip: bool,
) -> torch.Tensor:
    """Jitter, trim, resize and flip one RGB image into a [3, bh, bw] tensor in [-1, 1].

    `rng=None` disables all randomness (centre crop, no jitter). For an image with a loss mask
    use `trainer.data.masks.process_image_and_mask`, which cuts both with one `geometry`.
    """
    boxes = geometry(img.size, bucket, rng=rng, jitter=jitter)
    return to_tensor(apply_geometry(img, boxes, bucket, flip))
