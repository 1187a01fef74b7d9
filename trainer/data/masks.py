"""Loss masks: where they come from, how they follow their image, and which images lack one.

Two sources, as users bring them from other trainers:
  * OneTrainer: a grey-scale `<image stem>-masklabel.png` beside the image (white = train,
    black = background). Such files are never training images themselves (discovery skips them).
  * kohya's `alpha_mask` (`mask_from_alpha` here): the image's own alpha channel
    (opaque = train). The RGB the model sees is still composited on white (transforms.py).
An image without a mask trains at full weight (an all-white mask); the start-up summary and the
dataset preview report those images once.

A mask must have its image's size (after EXIF orientation), and is cut, resized and mirrored by
the same `geometry` as its image, through the same filter, so mask and pixels stay aligned
through every crop jitter, aspect trim, bucket resize and flip.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.buckets import Bucket
from trainer.data.items import ImageItem
from trainer.data.transforms import _to_rgb, apply_geometry, geometry, to_tensor
from trainer.runtime.errors import DataError

MASK_SUFFIX = "-masklabel"
MASK_EXTENSION = ".png"
SOURCES = ("file", "alpha")


def is_mask_file(path: str | Path) -> bool:
    """A OneTrainer mask (`*-masklabel.png`), which is never a training image."""
    p = Path(path)
    return p.suffix.lower() == MASK_EXTENSION and p.stem.endswith(MASK_SUFFIX)


def mask_file_for(image_path: str | Path) -> Path:
    """Where an image's mask file would be: `<stem>-masklabel.png` in the image's folder."""
    p = Path(image_path)
    return p.with_name(f"{p.stem}{MASK_SUFFIX}{MASK_EXTENSION}")


def _open_oriented(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def _alpha(img: Image.Image) -> Image.Image | None:
    """The alpha channel as an 8-bit L image, or None when the image has none."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    return img.getchannel("A") if img.mode == "RGBA" else None


def _as_grey(img: Image.Image) -> Image.Image:
    """A mask file in any mode -> 8-bit grey (RGB masks use their luminance; 16-bit is scaled).

    A mask with transparency is composited on black: an unpainted, transparent pixel is
    background, not subject.
    """
    alpha = _alpha(img)
    if alpha is not None:
        grey = Image.new("L", img.size, 0)
        grey.paste(img.convert("RGBA").convert("L"), mask=alpha)
        return grey
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_rgb(img).convert("L")
    return img if img.mode == "L" else img.convert("L")


@dataclass(frozen=True)
class MaskSource:
    """How a run finds masks: "file" (`-masklabel.png`) or "alpha" (the image's alpha)."""

    kind: str = "file"

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise ValueError(f"mask source {self.kind!r}: use one of {', '.join(SOURCES)}")

    def identity(self, image_path: str) -> str:
        """What a cached latent's mask depends on (part of its cache key): the mask file's
        path, size and mtime, "none" (no mask file: full weight), or "alpha" (the alpha is
        part of the image file, which the key already covers)."""
        if self.kind == "alpha":
            return "alpha"
        mask = mask_file_for(image_path)
        try:
            st = os.stat(mask)
        except FileNotFoundError:
            return "none"
        return f"file:{os.path.abspath(mask)}:{st.st_size}:{st.st_mtime_ns}"

    def load(self, image_path: str) -> tuple[Image.Image, Image.Image | None]:
        """The RGB image and its grey mask (None = no mask: full weight).

        DataError names the mask file when its size differs from the image's.
        """
        img = _open_oriented(image_path)
        if self.kind == "alpha":
            return _to_rgb(img), _alpha(img)
        rgb = _to_rgb(img)
        mask_path = mask_file_for(image_path)
        if not mask_path.is_file():
            return rgb, None
        mask = _as_grey(_open_oriented(mask_path))
        if mask.size != rgb.size:
            raise DataError(
                f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                f"{rgb.size[0]}x{rgb.size[1]}; a mask must have its image's size"
            )
        return rgb, mask


def mask_tensor(mask: Image.Image | None, bucket: Bucket) -> torch.Tensor:
    """An 8-bit grey mask -> [1, bh, bw] float in [0, 1]; None -> ones (full weight)."""
    if mask is None:
        return torch.ones((1, bucket[1], bucket[0]), dtype=torch.float32)
    arr = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())
    return arr.unsqueeze(0).float().div_(255.0)


def process_image_and_mask(
    img: Image.Image,
    mask: Image.Image | None,
    bucket: Bucket,
    *,
    rng: random.Random | None,
    jitter: float,
    flip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`process_image` for an image and its mask, cut by one geometry: ([3,bh,bw], [1,bh,bw]).

    The random draws are exactly `process_image`'s, so turning masked_loss on does not change
    a single pixel of the training images.
    """
    boxes = geometry(img.size, bucket, rng=rng, jitter=jitter)
    pixels = to_tensor(apply_geometry(img, boxes, bucket, flip))
    cut = None if mask is None else apply_geometry(mask, boxes, bucket, flip)
    return pixels, mask_tensor(cut, bucket)


@dataclass
class MaskReport:
    """Which training images have a mask; shown once at start-up and in the dataset preview."""

    source: str
    with_mask: int = 0
    without_mask: list[str] = field(default_factory=list)

    def summary_lines(self, limit: int = 5) -> list[str]:
        what = "an alpha channel" if self.source == "alpha" else f"a {MASK_SUFFIX}{MASK_EXTENSION} mask"
        lines = [f"  masked_loss: {self.with_mask} image(s) with {what}"]
        if self.without_mask:
            lines.append(f"  {len(self.without_mask)} image(s) without one train at full weight:")
            lines += [f"    {p}" for p in self.without_mask[:limit]]
            if len(self.without_mask) > limit:
                lines.append(f"    ... and {len(self.without_mask) - limit} more")
        return lines

    def as_dict(self) -> dict:
        return {"source": self.source, "with_mask": self.with_mask, "without_mask": list(self.without_mask)}


def scan_masks(items: list[ImageItem], source: MaskSource) -> MaskReport:
    """Find each item's mask (header reads only). A mask file whose size differs from its
    image's is a DataError now, naming both files, rather than a failure at step N."""
    report = MaskReport(source.kind)
    for item in items:
        if source.kind == "alpha":
            with Image.open(item.path) as img:
                has = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
                    img.mode == "P" and "transparency" in img.info
                )
        else:
            mask_path = mask_file_for(item.path)
            has = mask_path.is_file()
            if has:
                with Image.open(mask_path) as m:
                    turned = m.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF rotations by 90 degrees
                    size = (m.size[1], m.size[0]) if turned else m.size
                if size != (item.width, item.height):
                    raise DataError(
                        f"{mask_path}: mask is {size[0]}x{size[1]} but its image {item.path} is "
                        f"{item.width}x{item.height}; a mask must have its image's size"
                    )
        if has:
            report.with_mask += 1
        else:
            report.without_mask.append(item.path)
    return report


def stack_masks(masks: list[torch.Tensor | None], samples: list[torch.Tensor]) -> torch.Tensor:
    """A batch's masks [B, 1, H, W]; a sample without one (None) gets ones of its size."""
    return torch.stack(
        [
            m if m is not None else torch.ones((1, *s.shape[1:]), dtype=torch.float32)
            for m, s in zip(masks, samples, strict=True)
        ]
    )
