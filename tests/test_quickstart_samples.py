"""The quick start visibly learns: after it, samples show the prompted backgrounds; at step 0 not.

Slow (the whole quick start, a few minutes on 2 cores): marked `slow`, run in CI's slow step.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, run_folders, run_train

PALETTE = {  # data/make_example_data.py's colours of the sample prompts' backgrounds
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "orange": (245, 130, 20),
}


def border_colour(path: Path, frac: float = 0.1) -> np.ndarray:
    """Mean RGB of the outer ring of the image (the shape sits in the middle)."""
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
    words = path.stem.split("_")
    return words[words.index("background") - 1]


def background_hits(samples: list[Path]) -> list[bool]:
    return [nearest_background(p) == prompted_background(p) for p in samples]


@pytest.mark.slow
def test_quick_start_samples_show_prompted_backgrounds(tmp_path):
    train = json.loads((ROOT / "train.json").read_text())
    proc = run_train(  # the quick start's own train.json and optimizer.json, logs in tmp_path
        ["--optimizer_config", str(ROOT / "optimizer.json"), "--logdir", str(tmp_path / "logs")], timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_folders(tmp_path / "logs")
    samples = sorted((run / "samples").glob("gs*.png"))
    first = [p for p in samples if p.name.startswith("gs000000-")]
    steps = sorted({int(p.name[2:8]) for p in samples})
    last = [p for p in samples if p.name.startswith(f"gs{steps[-1]:06d}-")]
    assert len(first) == len(last) == 4 and steps[-1] > 0, [p.name for p in samples]
    assert train["sample_prompts"] == "data/sample_prompts.json"
    assert all(background_hits(last)), {p.name: border_colour(p).round() for p in last}
    assert not all(background_hits(first)), {p.name: border_colour(p).round() for p in first}
