"""Data pipeline throughput: decode + bucket + transform, discovery scans, latent-cache speed-up.

    python bench/data_throughput.py                 # stand-in encoder, 10k-file scan
    python bench/data_throughput.py --tiny_vae      # encode with builtin:tiny-sd1's VAE
    python bench/data_throughput.py --json

Figures:
* images/s through make_loader at resolution 512 with 0 workers and with all CPU workers
  (JPEGs of ~0.5 MP with a few aspect ratios, so crop/trim/resize really run);
* first (cold) and second (scan-cache) discovery time of a generated 10k-image tree;
* epoch time without a latent cache (decode + transform + encode every epoch) vs the second
  epoch with the cache (read latents only).
Everything is generated into a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from trainer.data import DataSettings, LatentCache, fill_latent_cache, make_loader
from trainer.data.dataset import LoadedDataset
from trainer.data.discovery import discover
from trainer.data.items import CaptionSpec, ImageItem

SIZES = [(768, 640), (640, 768), (900, 500), (700, 700)]


def _photos(folder: Path, n: int) -> list[ImageItem]:
    """Smooth random images (compress like photos, unlike white noise)."""
    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        w, h = SIZES[k % len(SIZES)]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"p{k:04d}.jpg"
        img.save(path, quality=90)
        items.append(ImageItem(str(path), w, h, CaptionSpec(f"photo {k}")))
    return items


def _plan(folder: Path, items: list[ImageItem], workers: int, batch_size: int) -> LoadedDataset:
    settings = DataSettings(data_root=str(folder), resolution=512, batch_size=batch_size, num_workers=workers)
    return LoadedDataset(settings, items, {}, [], [])


def bench_transform(folder: Path, n: int, batch_size: int) -> dict:
    items = _photos(folder, n)
    out = {}
    for label, workers in (("workers_0", 0), (f"workers_{os.cpu_count()}", os.cpu_count() or 1)):
        plan = _plan(folder, items, workers, batch_size)
        started = time.perf_counter()
        count = sum(len(b.paths) for b in make_loader(plan, plan.epoch_plan(0)))
        out[label] = round(count / (time.perf_counter() - started), 1)
    return out


def bench_scan(folder: Path, n: int) -> dict:
    for k in range(n):
        sub = folder / f"d{k // 500:02d}"
        sub.mkdir(exist_ok=True)
        Image.new("RGB", (64 + k % 7 * 8, 64), ((k * 37) % 256, 90, 160)).save(sub / f"i{k:05d}.png")
        (sub / f"i{k:05d}.txt").write_text(f"image {k}, tag")
    cache = folder.parent / "scan_cache.json"
    times = []
    for _ in range(2):
        started = time.perf_counter()
        result = discover(folder, scan_cache=cache)
        times.append(time.perf_counter() - started)
    assert len(result.items) == n, f"scan found {len(result.items)} of {n} images: {result.problems[:3]}"
    return {"images": n, "first_s": round(times[0], 2), "second_s": round(times[1], 2)}


def _stand_in_encoder(pixels: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1) * 0.18215


def _tiny_vae_encoder():
    from trainer.models import load_model  # optional: written by the models helper

    vae = load_model("builtin:tiny-sd1").vae.eval()

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    return encode


def bench_latent_cache(folder: Path, n: int, batch_size: int, encode) -> dict:
    items = _photos(folder, n)
    plan = _plan(folder, items, os.cpu_count() or 1, batch_size)
    started = time.perf_counter()
    with torch.no_grad():
        for batch in make_loader(plan, plan.epoch_plan(0)):
            encode(batch.pixel_values)
    uncached = time.perf_counter() - started
    cache = LatentCache(None, "bench")
    fill = fill_latent_cache(plan, cache, encode, batch_size=batch_size)
    started = time.perf_counter()
    for _ in make_loader(plan, plan.epoch_plan(1), latent_cache=cache):
        pass
    cached = time.perf_counter() - started
    return {
        "epoch_without_cache_s": round(uncached, 2),
        "cache_fill_s": round(fill["seconds"], 2),
        "second_epoch_with_cache_s": round(cached, 3),
        "speedup": round(uncached / max(cached, 1e-9), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=96, help="images for the transform / cache benchmarks")
    parser.add_argument("--scan_images", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--tiny_vae", action="store_true", help="encode with builtin:tiny-sd1's VAE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    encode = _tiny_vae_encoder() if args.tiny_vae else _stand_in_encoder
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("photos", "cache_photos", "scan/tree"):
            (tmp / name).mkdir(parents=True)
        results = {
            "transform_images_per_s_512": bench_transform(tmp / "photos", args.images, args.batch_size),
            "discovery_scan": bench_scan(tmp / "scan" / "tree", args.scan_images),
            "latent_cache": bench_latent_cache(tmp / "cache_photos", args.images, args.batch_size, encode)
            | {"encoder": "builtin:tiny-sd1 VAE" if args.tiny_vae else "stand-in avg-pool"},
            "cpu_count": os.cpu_count(),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    t, s, c = results["transform_images_per_s_512"], results["discovery_scan"], results["latent_cache"]
    print("decode + bucket + transform at 512: " + ", ".join(f"{k}: {v} img/s" for k, v in t.items()))
    print(f"discovery of {s['images']} images: first scan {s['first_s']}s, second (cached) {s['second_s']}s")
    print(
        f"latent cache ({c['encoder']}): epoch without cache {c['epoch_without_cache_s']}s, fill "
        f"{c['cache_fill_s']}s, second epoch with cache {c['second_epoch_with_cache_s']}s (x{c['speedup']})"
    )


if __name__ == "__main__":
    main()
