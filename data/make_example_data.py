"""Generate the bundled example dataset `data/shapes/` and `data/sample_prompts.txt`.

Flat coloured shapes on flat coloured backgrounds, each with an EveryDream2-style `.txt`
caption sidecar ("a red circle on a blue background"). Strong colours, simple geometry and few
classes (8: four backgrounds, two shapes on each) are what the tiny model learns to draw from
its caption on a CPU in a few minutes at resolution 64 (the quick start); with the earlier 40
colour pairs x 5 shapes, a few hundred steps gave blobs in the dataset's average colours.
Deterministic (fixed seed, pure PIL drawing, no metadata), so re-running it reproduces the
committed files byte for byte:

    python data/make_example_data.py            # writes next to this script
    python data/make_example_data.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20240607
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# (background, shape colour, shape): four classes, so that a tiny model learns the caption-to-image
# map in the quick start's few hundred steps (with 8 classes, or 40 colour pairs x 5 shapes, the
# same steps gave samples in the wrong or the average colours). The backgrounds are four colours
# the tiny VAE (trainer/models/tiny_vae/) reproduces apart at 64 px (it renders flat red and yellow
# as orange, black as dark green and purple as blue), and no class is another's colours swapped
# as the VAE renders them (a yellow circle on blue and a purple square on orange were).
CLASSES = (
    ("blue", "white", "circle"),
    ("green", "red", "star"),
    ("white", "black", "triangle"),
    ("orange", "purple", "square"),
)
# (width, height): mostly square, some landscape and portrait to exercise the aspect buckets.
SIZES = ((192, 192), (192, 192), (256, 160), (160, 256))
COUNT = 60


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


PROMPTS = tuple(f"{_article(c)} {c} {shape} on {_article(b)} {b} background" for b, c, shape in CLASSES)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill
        )
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        t = r * 0.32
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_image(
    rng: random.Random, size: tuple[int, int], shape: str, colour: str, background: str
) -> Image.Image:
    """One image; the shape sits in the central square so centre/aspect crops keep it whole."""
    w, h = size
    img = Image.new("RGB", size, COLOURS[background])
    side = min(w, h)
    r = side * rng.uniform(0.28, 0.38)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * side
    cy = h / 2 + rng.uniform(-0.08, 0.08) * side
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
    return img


def generate(out: Path) -> list[str]:
    """Write COUNT images + captions into out/shapes and the prompts file; returns captions."""
    rng = random.Random(SEED)
    folder = out / "shapes"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    captions = []
    for index in range(COUNT):
        background, colour, shape = CLASSES[index % len(CLASSES)]
        size = SIZES[index % len(SIZES)]
        caption = f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"
        stem = f"{index:03d}_{colour}_{shape}"
        make_image(rng, size, shape, colour, background).save(folder / f"{stem}.png", optimize=True)
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        captions.append(caption)
    (out / "sample_prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    captions = generate(args.out)
    total = sum(f.stat().st_size for f in (args.out / "shapes").iterdir())
    print(f"wrote {len(captions)} images to {args.out / 'shapes'} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
