"""Train the built-in tiny models' VAE: SD's 4-level AutoencoderKL with shrunk widths.

The built-in `tiny-sd1` / `tiny-sd2` models share this VAE (as real SD1.x and SD2.x share
theirs). A random VAE decodes anything to colour noise, so a quick start on a random one shows
nothing a user can judge; this one is trained here, on CPU, on procedurally drawn flat shapes
(like the bundled `data/shapes`, but drawn fresh: other shapes, sizes, positions, several per
image, any colour), so the quick start's samples show the prompted colours and shapes.

Deterministic: every image comes from `random.Random(seed)`, the weights from
`torch.manual_seed`, and training runs on one thread (thread count changes float summation
order). Re-running it on the same machine and torch build reproduces the file; the recorded
sha256 lets a test check that the shipped weights are the ones the config describes.

    python -m tools.train_tiny_vae            # rewrites trainer/models/tiny_vae/
    python -m tools.train_tiny_vae --out DIR  # somewhere else

It writes `config.json` (the diffusers AutoencoderKL config, with `scaling_factor` = 1 / std
of the trained latents), `diffusion_pytorch_model.safetensors` (fp16) and `training.json`
(the recipe, measured PSNR and the weights' sha256). The shipped weights took 5 minutes on one
thread of a 2-core machine at load average ~7.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parents[1] / "trainer" / "models" / "tiny_vae"  # what it writes
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
RECIPE = "training.json"

# SD's VAE (4 levels, 2 resnets per level, attention in the mid block, 8x downsampling, 4 latent
# channels); only the widths are shrunk (SD: 128, 256, 512, 512).
ARCHITECTURE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 2,  # >= 8 channels a group: with 1-2 GroupNorm removes absolute colour
    "out_channels": 3,
    "sample_size": 128,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@dataclass(frozen=True)
class Recipe:
    seed: int = 7
    threads: int = 1  # a fixed count: the summation order (so the bits) depends on it
    steps: int = 1000
    batch_size: int = 8
    crop: int = 64  # trained on crops: the VAE is convolutional, 64 px is 4x cheaper than 128
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-6  # SD's weight: the latent stays informative, scaling_factor rescales it
    initial_logvar: float = -8.0
    eval_images: int = 32  # held-out images (another seed) for the PSNR and the latent std


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.6:  # the saturated palette the example data uses, jittered
        base = rng.choice(
            [(220, 30, 30), (30, 170, 50), (30, 60, 220), (245, 210, 20), (140, 40, 180), (245, 130, 20)]
            + [(245, 245, 245), (20, 20, 20)]
        )
        return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _polygon(cx: float, cy: float, r: float, corners: int, inner: float, turn: float) -> list:
    points = []
    for k in range(corners * (2 if inner < 1 else 1)):
        radius = r if (inner >= 1 or k % 2 == 0) else r * inner
        angle = turn + k * math.pi * 2 / (corners * (2 if inner < 1 else 1))
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_image(rng: random.Random, size: int) -> Image.Image:
    """One to three flat shapes on a flat background, drawn at 2x and downsampled (soft edges,
    as the trainer's resize gives the bundled 192 px images)."""
    big = size * 2
    img = Image.new("RGB", (big, big), _random_colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.choice((1, 1, 2, 3))):
        cx, cy = rng.uniform(0.15, 0.85) * big, rng.uniform(0.15, 0.85) * big
        r = rng.uniform(0.08, 0.4) * big
        fill = _random_colour(rng)
        kind = rng.choice(("ellipse", "rectangle", "polygon", "star", "cross"))
        if kind == "ellipse":
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=fill)
        elif kind == "rectangle":
            draw.rectangle((cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r), fill=fill)
        elif kind == "polygon":
            draw.polygon(_polygon(cx, cy, r, rng.randint(3, 6), 1.0, rng.uniform(0, math.pi)), fill=fill)
        elif kind == "star":
            draw.polygon(_polygon(cx, cy, r, rng.randint(4, 6), 0.45, rng.uniform(0, math.pi)), fill=fill)
        else:
            t = r * rng.uniform(0.2, 0.4)
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], as the trainer feeds the VAE."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def image_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    return to_tensor([draw_image(rng, size) for _ in range(count)])


def psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decode(encode(x).mean) against x."""
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((recon - pixels) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def latent_std(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(vae.encode(pixels).latent_dist.mean.std())


def train(recipe: Recipe, *, log_every: int = 100) -> tuple[AutoencoderKL, dict]:
    """Train from scratch; returns the VAE (fp32, eval mode) and measured figures."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL.from_config(ARCHITECTURE)
    with torch.no_grad():  # start near-deterministic: a posterior std of 1 would drown the signal
        vae.quant_conv.bias[ARCHITECTURE["latent_channels"] :] = recipe.initial_logvar
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    vae.train()
    for step in range(recipe.steps):
        pixels = image_batch(rng, recipe.batch_size, recipe.crop)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(recon, pixels) + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{recipe.steps} loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)"
            )
    vae.eval()
    held_out = image_batch(random.Random(recipe.seed + 1_000_003), recipe.eval_images, 128)
    figures = {
        "psnr_db_held_out_128px": round(psnr(vae, held_out), 2),
        "latent_std": latent_std(vae, held_out),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return vae, figures


def write(vae: AutoencoderKL, recipe: Recipe, figures: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    config = dict(ARCHITECTURE, scaling_factor=round(1.0 / figures["latent_std"], 5))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    record = {
        "recipe": asdict(recipe),
        "figures": {k: v for k, v in figures.items() if k != "train_seconds"},
        "weights_sha256": hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest(),
        "torch": torch.__version__,
    }
    (out / RECIPE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="output folder (default: trainer/models/tiny_vae, the shipped files)",
    )
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    args = parser.parse_args(argv)
    recipe = Recipe(steps=args.steps)
    vae, figures = train(recipe)
    write(vae, recipe, figures, args.out)
    print(f"wrote {args.out / WEIGHTS}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
