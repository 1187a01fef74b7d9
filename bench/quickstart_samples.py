"""Do a run's samples show the prompted backgrounds? Border colour of each sample image.

    python bench/quickstart_samples.py logs/shapes-20261201-221507   # a finished quick start

For the first and the last sampled step of the run folder, prints each sample's mean border
colour (the outer 10 % ring; the shape sits in the middle), the nearest of the sample prompts'
background colours (data/make_example_data.py's palette) and whether it is the prompted one.
Exit code 0 when every last-step sample shows its prompted background and the step-0 samples
do not all do so, else 1. What "visibly learns" means for the quick start, as a number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = {  # data/make_example_data.py's colours of the sample prompts' backgrounds
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "orange": (245, 130, 20),
}


def border_colour(path: Path, frac: float = 0.1) -> np.ndarray:
    """Mean RGB of the outer ring of the image."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    h, w = a.shape[:2]
    m = max(1, int(min(h, w) * frac))
    mask = np.ones((h, w), bool)
    mask[m:-m, m:-m] = False
    return a[mask].mean(axis=0)


def nearest_background(path: Path) -> str:
    colour = border_colour(path)
    return min(PALETTE, key=lambda name: float(np.linalg.norm(colour - np.array(PALETTE[name]))))


def prompted_background(path: Path) -> str:
    """'gs000100-live-00-a_red_circle_on_a_blue_background.png' -> 'blue'."""
    words = path.stem.split("_")
    return words[words.index("background") - 1]


def report(run_folder: Path) -> bool:
    samples = sorted((run_folder / "samples").glob("gs*.png"))
    if not samples:
        raise SystemExit(f"error: no samples in {run_folder / 'samples'} (was sample_prompts set?)")
    steps = sorted({int(p.name[2:8]) for p in samples})
    hits = {}
    for step in (steps[0], steps[-1]):
        hits[step] = []
        for p in (p for p in samples if p.name.startswith(f"gs{step:06d}-")):
            hit = nearest_background(p) == prompted_background(p)
            hits[step].append(hit)
            print(
                f"step {step:6d}  {p.name[9:]:60s} border {border_colour(p).round().astype(int)} "
                f"nearest {nearest_background(p):6s} prompted {prompted_background(p):6s} {'ok' if hit else '-'}"
            )
    return len(steps) > 1 and all(hits[steps[-1]]) and not all(hits[steps[0]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_folder", type=Path)
    ok = report(p.parse_args(argv).run_folder)
    print(
        "the last samples show the prompted backgrounds" if ok else "the samples do not show the prompts yet"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
