"""Global RNG capture and restore (trainer/checkpointing/state.py): each of Python, NumPy and torch rewinds.

Exact resume restores these generators because libraries (and DataLoader worker seeding) draw
from them. Each generator is its own test case, so a restore that forgets any one of them fails
by name; the round trip through a weights_only file is how a checkpoint carries the state.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from trainer.checkpointing.state import capture_global_rng, restore_global_rng

# Draws include the Gaussian paths: Python and NumPy (legacy) cache a second normal value, which
# is part of the captured state.
DRAWS = {
    "python": lambda: [random.random() for _ in range(4)] + [random.gauss(0.0, 1.0)],
    "numpy": lambda: np.random.rand(4).tolist() + [float(np.random.standard_normal())],
    "torch": lambda: torch.rand(4).tolist() + torch.randn(3).tolist(),
}


def _through_checkpoint_file(state: dict) -> dict:
    """What a resumed run gets back: torch.save, then torch.load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("via_file", [False, True], ids=["in-memory", "weights-only-file"])
@pytest.mark.parametrize("generator", sorted(DRAWS))
def test_restore_rewinds_each_global_generator(generator, via_file):
    # leave a cached Gaussian value pending in Python and NumPy, so it must be captured too
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    saved = capture_global_rng()
    if via_file:
        saved = _through_checkpoint_file(saved)
    first = {name: draw() for name, draw in DRAWS.items()}  # advances all three generators
    restore_global_rng(saved)
    again = DRAWS[generator]()
    assert again == first[generator], f"the {generator} RNG was not restored"
