"""Do a run's samples show the prompted backgrounds? Border colour of each sample image.

    python bench/quickstart_samples.py logs/shapes-20261201-221507   # a finished quick start

For the first and the last sampled step of the run folder, prints each sample's mean border
colour (the outer 10 % ring; the shape sits in the middle), the nearest of the sample prompts'
background colours (data/make_example_data.py's palette) and whether it is the prompted one.
Exit code 0 when more than half of the last-step samples show their prompted background and
fewer of the first-step samples do, else 1: what "visibly learns" means for the quick start, as
a number. `judge()` gives the same verdict to a test (tests/test_quickstart.py, marked slow).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = {  # data/make_example_data.py's colours of the sample prompts' backgrounds
    "blue": (30, 60, 220),
    "green": (30, 170, 50),
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


@dataclass(frozen=True)
class Verdict:
    """Per sampled step judged (the first and the last): which samples show their prompted
    background (True), in file order."""

    first_step: int
    last_step: int
    first: list[bool]
    last: list[bool]
    lines: list[str]

    @property
    def learned(self) -> bool:
        """Most last-step samples (more than half) show their background and fewer step-0
        samples do: the run learned the prompts. Chance is one in len(PALETTE)."""
        return (
            self.last_step > self.first_step
            and 2 * sum(self.last) > len(self.last) > 0
            and sum(self.first) < sum(self.last)
        )


def judge(run_folder: Path) -> Verdict:
    """Judge a run folder's first and last samples (pure: reads the images, prints nothing)."""
    samples = sorted((run_folder / "samples").glob("gs*.png"))
    if not samples:
        raise FileNotFoundError(f"no samples in {run_folder / 'samples'} (was sample_prompts set?)")
    steps = sorted({int(p.name[2:8]) for p in samples})
    hits: dict[int, list[bool]] = {}
    lines = []
    for step in (steps[0], steps[-1]):
        hits[step] = []
        for p in (p for p in samples if p.name.startswith(f"gs{step:06d}-")):
            nearest, prompted = nearest_background(p), prompted_background(p)
            hits[step].append(nearest == prompted)
            lines.append(
                f"step {step:6d}  {p.name[9:]:60s} border {border_colour(p).round().astype(int)} "
                f"nearest {nearest:6s} prompted {prompted:6s} {'ok' if nearest == prompted else '-'}"
            )
    return Verdict(steps[0], steps[-1], hits[steps[0]], hits[steps[-1]], lines)


def report(run_folder: Path) -> bool:
    try:
        verdict = judge(run_folder)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
    print("\n".join(verdict.lines))
    print(
        f"step {verdict.first_step}: {sum(verdict.first)}/{len(verdict.first)} show their background; "
        f"step {verdict.last_step}: {sum(verdict.last)}/{len(verdict.last)}"
    )
    return verdict.learned


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
