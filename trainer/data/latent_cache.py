"""VAE latent cache: encode each (image, bucket, flip) once and reuse it every epoch.

The key is the SHA-256 of (image path, file size, mtime, bucket size, flip flag, transform
version, VAE fingerprint), so editing an image, changing the resolution (hence the bucket), the
processing code or the VAE makes a new key and the stale entry is simply not used.

A cached latent must be the same every epoch, so with the cache on **crop jitter is off and
the trim to the bucket aspect is the exact centre crop**; a flipped sample is served from a
second, flipped latent, which is only computed for items whose effective flip_p is > 0.

Entries live in memory, or, when a directory is given, one `<key>.safetensors` file each
(written to a temporary name and renamed, so a crash never leaves a half-written entry), which
a later run reuses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.data.buckets import Bucket, nearest_bucket
from trainer.data.items import ImageItem, Problem
from trainer.data.transforms import TRANSFORM_VERSION, load_image, process_image

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def latent_key(path: str, bucket: Bucket, flip: bool, vae_fingerprint: str) -> str:
    """Cache key of one image variant; stat() makes an edited file a different key."""
    st = os.stat(path)
    text = "\x1f".join(
        [
            os.path.abspath(path),
            str(st.st_size),
            str(st.st_mtime_ns),
            f"{bucket[0]}x{bucket[1]}",
            "flip" if flip else "noflip",
            f"transform-v{TRANSFORM_VERSION}",
            vae_fingerprint,
        ]
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LatentCache:
    """Latents by key, in memory (`directory=None`) or as safetensors files in `directory`."""

    def __init__(self, directory: Path | None, vae_fingerprint: str):
        if not vae_fingerprint:
            raise ValueError("vae_fingerprint must be a non-empty string identifying the VAE weights")
        self.directory = Path(directory) if directory is not None else None
        self.vae_fingerprint = vae_fingerprint
        self._memory: dict[str, torch.Tensor] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, path: str, bucket: Bucket, flip: bool) -> str:
        return latent_key(path, bucket, flip, self.vae_fingerprint)

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        return self._file(key).is_file()

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._memory)
        return sum(1 for _ in self.directory.glob("*.safetensors"))

    def get(self, key: str) -> torch.Tensor:
        """The latent [C, h, w]; KeyError if it was never stored."""
        if self.directory is None:
            return self._memory[key]
        file = self._file(key)
        if not file.is_file():
            raise KeyError(key)
        return load_file(str(file))["latent"]

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").clone()  # own storage, not a view of the batch
        if self.directory is None:
            self._memory[key] = latent
            return
        file = self._file(key)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file({"latent": latent.contiguous()}, str(tmp))
        os.replace(tmp, file)


def fill_latent_cache(
    plan, cache: LatentCache, encode_fn: EncodeFn, *, batch_size: int, items: list[ImageItem] | None = None
) -> dict:
    """Encode every item variant the loaders can ask for and is not cached yet.

    `items` defaults to the plan's training items; pass a validation set to cache it too
    (validation never flips). Variants: no flip always; flipped when the item's effective
    flip_p > 0. Work is batched
    by bucket (one tensor shape per `encode_fn` call). An image that fails to decode is
    recorded in `plan.problems` and skipped; the loader then substitutes another image of
    the same bucket for it. Returns {"computed", "reused", "failed", "seconds"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    todo: dict[Bucket, list[tuple[str, str, bool]]] = {}
    reused = 0
    validation = items is not None
    for item in plan.train_items if items is None else items:
        bucket = nearest_bucket(item.width, item.height, plan.buckets)
        p = item.flip_p if item.flip_p is not None else plan.settings.flip_p
        for flip in (False, True) if p > 0 and not validation else (False,):
            key = cache.key(item.path, bucket, flip)
            if key in cache:
                reused += 1
            else:
                todo.setdefault(bucket, []).append((key, item.path, flip))
    computed = failed = 0
    for bucket in sorted(todo):
        jobs = todo[bucket]
        for start in range(0, len(jobs), batch_size):
            keys, pixels = [], []
            for key, path, flip in jobs[start : start + batch_size]:
                try:
                    img = load_image(path)
                except (OSError, ValueError, SyntaxError) as err:
                    failed += 1
                    plan.record_problem(Problem(path, f"cannot decode for the latent cache: {err}"))
                    continue
                pixels.append(process_image(img, bucket, rng=None, jitter=0.0, flip=flip))
                keys.append(key)
            if not keys:
                continue
            with torch.no_grad():
                latents = encode_fn(torch.stack(pixels))
            if latents.shape[0] != len(keys):
                raise ValueError(f"encode_fn returned {latents.shape[0]} latents for {len(keys)} images")
            for key, latent in zip(keys, latents, strict=True):
                cache.put(key, latent)
            computed += len(keys)
    seconds = time.perf_counter() - started
    logger.info("latent cache: %d computed, %d reused, %d failed in %.1fs", computed, reused, failed, seconds)
    return {"computed": computed, "reused": reused, "failed": failed, "seconds": seconds}
