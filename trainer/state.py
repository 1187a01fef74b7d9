"""Progress counters and random-number state: everything besides weights that exact resume needs.

Data order is a pure function of (seed, epoch), so the data position is just the epoch and the
number of batches already consumed in it. Noise and timesteps come from one explicit
`torch.Generator`; Python, NumPy and torch global RNGs are captured too, because libraries
(and DataLoader worker seeding) draw from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainingState:
    """Counters of a run. `global_step` counts optimizer steps; `batch_in_epoch` micro-batches."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in (
            "global_step",
            "epoch",
            "batch_in_epoch",
            "samples_seen",
            "nonfinite_in_row",
            "nonfinite_total",
        ):
            setattr(self, key, int(state[key]))
        self.generator.set_state(state["generator"])


def capture_global_rng() -> dict:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, in weights_only-safe types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (the run's own generator is seeded separately)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
