"""VAE latent cache: encode each (image, bucket, flip) once and reuse it every epoch.

The key is the SHA-256 of what decides a latent: the image (path, file size, mtime), the
transform (bucket size, flip flag, transform version) and the VAE (`vae_fingerprint`: a hash of
all its weights and the dtype it encodes in). It holds no model path: a resumed run loads the
same VAE from its checkpoint folder and reuses every entry. Editing an image, changing the
resolution (hence the bucket), the processing code or the VAE makes a new key; the stale entry
is simply not used, and `python -m trainer.data.cache_admin --prune` deletes it.

A cached latent must be the same every epoch, so with the cache on **crop jitter is off and
the trim to the bucket aspect is the exact centre crop**; a flipped sample is served from a
second, flipped latent, which is only computed for items whose effective flip_p is > 0.

With masked loss (`masks`) an entry also holds its image's loss mask, cut like the latent's
image and area-averaged to the latent grid; the mask's identity (mask file path, size, mtime)
joins the key. Entries without masks keep the keys they always had.

Entries live in memory, or, when a directory is given, one `<key>.safetensors` file each
(written to a temporary name and renamed, so a crash never leaves a half-written entry), which
a later run reuses. Each file's metadata records what its key was made of, so the cache can be
listed and pruned without a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from trainer.data.buckets import Bucket, nearest_bucket
from trainer.data.items import ImageItem, Problem
from trainer.data.masks import MaskSource, process_image_and_mask
from trainer.data.transforms import TRANSFORM_VERSION, load_image, process_image
from trainer.runtime.fileperm import apply_umask

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def key_fields(
    path: str, bucket: Bucket, flip: bool, vae_fingerprint: str, mask: str | None = None
) -> dict[str, str]:
    """What one cached latent depends on (also stored as the entry's metadata). `mask` is the
    loss mask's identity (masks.MaskSource.identity) when the entry also holds a mask."""
    st = os.stat(path)
    fields = {
        "image": os.path.abspath(path),
        "size": str(st.st_size),
        "mtime_ns": str(st.st_mtime_ns),
        "bucket": f"{bucket[0]}x{bucket[1]}",
        "flip": "flip" if flip else "noflip",
        "transform": f"transform-v{TRANSFORM_VERSION}",
        "vae": vae_fingerprint,
    }
    if mask is not None:
        fields["mask"] = mask
    return fields


def key_of_fields(fields: dict[str, str]) -> str:
    """An entry without a mask keeps the key it had before masks existed (old caches stay valid)."""
    parts = [fields[k] for k in KEY_FIELDS] + ([fields["mask"]] if "mask" in fields else [])
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


KEY_FIELDS = ("image", "size", "mtime_ns", "bucket", "flip", "transform", "vae")


def latent_key(path: str, bucket: Bucket, flip: bool, vae_fingerprint: str, mask: str | None = None) -> str:
    """Cache key of one image variant; stat() makes an edited file a different key."""
    return key_of_fields(key_fields(path, bucket, flip, vae_fingerprint, mask))


def vae_fingerprint(state_dict: dict[str, torch.Tensor], encode_dtype: torch.dtype = torch.float32) -> str:
    """A hash of every VAE weight (exact bytes, names, shapes, dtypes) and the encoding dtype.

    Take it from the state dict while the weights are still on the CPU, before placement: the
    bytes are read through `.cpu()`, so a device tensor costs a copy, and a meta tensor (no
    data) is refused by name. The whole weights, not a sample, so a fine-tuned VAE never shares
    entries with its base; about a second for SD's 84M-parameter VAE. `encode_dtype` is what
    the VAE runs in when it encodes (bf16/fp16 on a GPU): it changes the latents, so it counts.
    """
    h = hashlib.sha256(str(encode_dtype).removeprefix("torch.").encode())
    for name, tensor in sorted(state_dict.items()):
        if tensor.is_meta:
            raise ValueError(f"VAE weight {name!r} is on the meta device (not loaded); cannot fingerprint it")
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """Latents by key, in memory (`directory=None`) or as safetensors files in `directory`."""

    def __init__(self, directory: Path | None, vae_fingerprint: str, masks: MaskSource | None = None):
        """With `masks` (masked_loss) every entry also holds its loss mask at latent resolution."""
        if not vae_fingerprint:
            raise ValueError("vae_fingerprint must be a non-empty string identifying the VAE weights")
        self.directory = Path(directory) if directory is not None else None
        self.vae_fingerprint = vae_fingerprint
        self.masks = masks
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _mask_identity(self, path: str) -> str | None:
        return self.masks.identity(path) if self.masks is not None else None

    def key(self, path: str, bucket: Bucket, flip: bool) -> str:
        return latent_key(path, bucket, flip, self.vae_fingerprint, self._mask_identity(path))

    def put_item(
        self, path: str, bucket: Bucket, flip: bool, latent: torch.Tensor, mask: torch.Tensor | None = None
    ) -> str:
        """Store the latent (and mask) of one image variant with its key fields as metadata."""
        fields = key_fields(path, bucket, flip, self.vae_fingerprint, self._mask_identity(path))
        key = key_of_fields(fields)
        self.put(key, latent, metadata=fields, mask=mask)
        return key

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
        return self.get_entry(key)["latent"]

    def get_entry(self, key: str) -> dict[str, torch.Tensor]:
        """{"latent": [C, h, w]} plus "mask": [1, h, w] for a masked entry; KeyError if absent."""
        if self.directory is None:
            return self._memory[key]
        file = self._file(key)
        if not file.is_file():
            raise KeyError(key)
        return load_file(str(file))

    def put(
        self,
        key: str,
        latent: torch.Tensor,
        metadata: dict[str, str] | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        entry = {"latent": latent.detach().to("cpu").clone()}  # own storage, not a view of the batch
        if mask is not None:
            entry["mask"] = mask.detach().to("cpu", torch.float32).clone()
        if self.directory is None:
            self._memory[key] = entry
            return
        file = self._file(key)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in entry.items()}, str(tmp), metadata=metadata)
        apply_umask(tmp)  # safetensors writes 0600 files
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
    todo: dict[Bucket, list[tuple[str, bool]]] = {}
    reused = 0
    validation = items is not None
    for item in plan.train_items if items is None else items:
        bucket = nearest_bucket(item.width, item.height, plan.buckets)
        p = item.flip_p if item.flip_p is not None else plan.settings.flip_p
        for flip in (False, True) if p > 0 and not validation else (False,):
            if cache.key(item.path, bucket, flip) in cache:
                reused += 1
            else:
                todo.setdefault(bucket, []).append((item.path, flip))
    computed = failed = 0
    for bucket in sorted(todo):
        jobs = todo[bucket]
        for start in range(0, len(jobs), batch_size):
            done, pixels, masks = [], [], []
            for path, flip in jobs[start : start + batch_size]:
                try:
                    sample, mask = _centre_sample(path, bucket, flip, cache.masks)
                except (OSError, ValueError, SyntaxError) as err:
                    failed += 1
                    plan.record_problem(Problem(path, f"cannot decode for the latent cache: {err}"))
                    continue
                pixels.append(sample)
                masks.append(mask)
                done.append((path, flip))
            if not done:
                continue
            with torch.no_grad():
                latents = encode_fn(torch.stack(pixels))
            if latents.shape[0] != len(done):
                raise ValueError(f"encode_fn returned {latents.shape[0]} latents for {len(done)} images")
            for (path, flip), latent, mask in zip(done, latents, masks, strict=True):
                if mask is not None:  # stored at latent resolution: area average, as the step does
                    mask = F.interpolate(mask[None], size=tuple(latent.shape[1:]), mode="area")[0]
                cache.put_item(path, bucket, flip, latent, mask)
            computed += len(done)
    seconds = time.perf_counter() - started
    where = cache.directory if cache.directory is not None else "memory"
    logger.info(
        "latent cache (%s): %d computed, %d reused, %d failed in %.1fs",
        where,
        computed,
        reused,
        failed,
        seconds,
    )
    return {"computed": computed, "reused": reused, "failed": failed, "seconds": seconds}


def _centre_sample(
    path: str, bucket: Bucket, flip: bool, masks: MaskSource | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exact centre-cropped pixels of one variant, and its mask when the cache holds masks."""
    if masks is None:
        return process_image(load_image(path), bucket, rng=None, jitter=0.0, flip=flip), None
    img, mask = masks.load(path)
    return process_image_and_mask(img, mask, bucket, rng=None, jitter=0.0, flip=flip)


def cache_directory(logdir: str | Path) -> Path:
    """Where runs under `logdir` share their latents (list and prune them with
    `python -m trainer.data.cache_admin`)."""
    return Path(logdir) / ".cache" / "latents"
