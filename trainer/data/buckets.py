"""Aspect-ratio buckets: which (width, height) an image is trained at for a given resolution.

Every batch holds images of one bucket, so images keep (almost) their aspect ratio instead of
being centre-cropped to a square. Bucket sides are multiples of 64 so that the latent (1/8)
is divisible by 8, which the 4-level SD UNet needs.

* Resolutions that EveryDream2 ships tables for use those tables, with its two mirror typos
  fixed (320: ``[576, 640]`` -> ``[128, 576]``; 1280: ``[1408, 1344]`` -> ``[1152, 1408]``)
  and its one side that is not a multiple of 64 (960: ``1680x576`` -> ``1664x576``; a
  210-wide latent cannot pass the UNet's three downsamplings).
* Every other multiple of 64 from 64 to 1536 (64..192 for the tiny built-in models, and 1216,
  1344, 1408, 1472) uses a generated table: for each height ``h`` from ``res`` down to
  ``res / 2`` (aspect at most 4:1) the widest multiple-of-64 width with ``w * h <= res**2``,
  plus mirrors. This rule reproduces EveryDream2's 512 table; pixel count never exceeds the
  square, so VRAM use never exceeds the square bucket's.
* The nearest bucket minimises ``|log(bw / bh) - log(w / h)|``. EveryDream2 used the absolute
  difference of the ratios, which is not symmetric between portrait and landscape (a 1:3
  portrait is "closer" to 1:1 than a 3:1 landscape is); the log makes both the same.
"""

from __future__ import annotations

import math

from trainer.runtime.errors import ConfigError

Bucket = tuple[int, int]

# Landscape entries of EveryDream2's tables (data/aspects.py); squares first. Portrait entries
# are the mirrors, which fixes ED2's two mirror typos by construction.
_ED2_LANDSCAPE: dict[int, list[Bucket]] = {
    256: [(256, 256), (384, 192), (512, 128)],
    320: [(320, 320), (384, 256), (448, 192), (576, 128)],
    384: [(384, 384), (448, 320), (512, 256), (704, 192)],
    448: [(448, 448), (512, 384), (640, 320), (768, 256)],
    512: [(512, 512), (576, 448), (640, 384), (768, 320), (896, 256), (1024, 256)],
    576: [(576, 576), (640, 512), (704, 448), (832, 384), (960, 320), (1152, 256)],
    640: [(640, 640), (704, 576), (768, 512), (832, 448), (896, 448), (1024, 384), (1152, 320), (1280, 320)],
    704: [(704, 704), (768, 640), (832, 576), (960, 512), (1088, 448), (1152, 384), (1280, 384), (1280, 320)],
    768: [
        (768, 768),
        (832, 704),
        (896, 640),
        (960, 576),
        (1024, 576),
        (1152, 512),
        (1280, 448),
        (1408, 384),
        (1472, 320),
    ],
    832: [
        (832, 832),
        (896, 768),
        (960, 704),
        (1024, 640),
        (1152, 576),
        (1216, 512),
        (1344, 512),
        (1536, 448),
        (1600, 384),
    ],
    896: [(896, 896), (1024, 768), (1088, 704), (1216, 640), (1344, 576), (1536, 512), (1792, 448)],
    960: [
        (960, 960),
        (1088, 832),
        (1152, 768),
        (1280, 704),
        (1408, 640),
        (1664, 576),
        (1792, 512),
        (2048, 448),
    ],
    1024: [
        (1024, 1024),
        (1152, 896),
        (1216, 832),
        (1344, 768),
        (1472, 704),
        (1600, 640),
        (1792, 576),
        (2048, 512),
    ],
    1088: [
        (1088, 1088),
        (1152, 1024),
        (1216, 896),
        (1408, 832),
        (1536, 768),
        (1664, 704),
        (1792, 640),
        (2048, 576),
        (2304, 512),
    ],
    1152: [
        (1152, 1152),
        (1280, 1024),
        (1344, 960),
        (1472, 896),
        (1536, 832),
        (1728, 768),
        (1856, 704),
        (2048, 640),
        (2304, 576),
    ],
    1280: [
        (1280, 1280),
        (1408, 1152),
        (1600, 1024),
        (1792, 896),
        (1920, 832),
        (2112, 768),
        (2304, 704),
        (2560, 640),
    ],
    1536: [
        (1536, 1536),
        (1728, 1344),
        (1792, 1280),
        (2048, 1152),
        (2304, 1024),
        (2432, 960),
        (2624, 896),
        (2816, 832),
        (3072, 768),
    ],
}

SUPPORTED_RESOLUTIONS: tuple[int, ...] = tuple(range(64, 1536 + 1, 64))
MAX_ASPECT = 4.0


def _generated_landscape(resolution: int) -> list[Bucket]:
    """Generated table: per height, the widest multiple-of-64 width within the square's area."""
    area = resolution * resolution
    out: list[Bucket] = []
    for h in range(resolution, 0, -64):
        w = (area // h) // 64 * 64
        if w / h > MAX_ASPECT:
            break
        if (w, h) not in out:
            out.append((w, h))
    return out


def is_ed2_table(resolution: int) -> bool:
    """True when `resolution` uses EveryDream2's hand-picked table rather than a generated one."""
    return resolution in _ED2_LANDSCAPE


def get_buckets(resolution: int) -> list[Bucket]:
    """All (width, height) buckets for `resolution`: landscape entries, then their mirrors.

    Raises ConfigError naming `resolution` and the valid values when it is not supported.
    """
    if not isinstance(resolution, int) or resolution not in SUPPORTED_RESOLUTIONS:
        valid = ", ".join(str(r) for r in SUPPORTED_RESOLUTIONS)
        raise ConfigError(
            f"resolution={resolution!r} is not supported; use a multiple of 64 from 64 to 1536 ({valid})"
        )
    landscape = _ED2_LANDSCAPE.get(resolution) or _generated_landscape(resolution)
    mirrors = [(h, w) for w, h in landscape if w != h]
    return list(landscape) + mirrors


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect is closest to width/height in log space (ties: first in table)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def is_undersized(width: int, height: int, bucket: Bucket) -> bool:
    """An image smaller than its bucket on both sides, so it is upscaled (and will look soft)."""
    return width < bucket[0] and height < bucket[1]
