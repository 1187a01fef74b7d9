"""Progress counters and random-number state: everything besides weights that exact resume needs.

Data order is a pure function of (seed, epoch), so the data position is just the epoch and the
number of batches already consumed in it. Noise and timesteps need no state at all: each sample
draws them from a generator seeded with its own seed (trainer/step/training_step.py). Python, NumPy and torch
global RNGs are captured, because libraries (and DataLoader worker seeding) draw from them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Counters of a run. `global_step` counts optimizer steps; `batch_in_epoch` micro-batches."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
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
        # Checkpoints written before per-sample seeds hold a "generator" entry: a training-wide
        # generator that no draw used any more, so ignoring it resumes them exactly.


def capture_global_rng() -> dict:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, in weights_only-safe types.

    CUDA: only this process's own device (`torch.cuda.current_device()`), never every visible
    GPU. Each rank saves its own entry (training states are lists indexed by rank), so the state
    does not depend on how many GPUs the process could see: a run saved with 8 visible GPUs
    resumes with 1 (`get_rng_state_all` + `set_rng_state_all` indexed devices that no longer
    exist).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # the 5-tuple form
    state = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_global_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    _restore_cuda_rng(state.get("cuda"))


def _restore_cuda_rng(saved) -> None:
    """Put the saved CUDA state on this process's current device.

    `saved` is one state (this format) or a list with one state per visible device (checkpoints
    written before it: entry `current_device()` is taken when it exists, else entry 0, with a
    warning). A checkpoint from a CPU run leaves the CUDA generator as seeded; a CUDA state
    resumed on CPU is dropped with a note. The trainer's own draws (noise, timesteps, stochastic
    rounding) come from explicit generators, so this only affects libraries' global draws.
    """
    available = torch.cuda.is_available()
    if saved is None:
        if available:
            log.info("the checkpoint has no CUDA RNG state (saved on CPU): the CUDA generator keeps its seed")
        return
    if not available:
        log.info("the checkpoint's CUDA RNG state is not restored: CUDA is not available in this run")
        return
    device = torch.cuda.current_device()
    if isinstance(saved, (list, tuple)):
        index = device if device < len(saved) else 0
        if index != device or len(saved) != torch.cuda.device_count():
            log.warning(
                "the checkpoint holds CUDA RNG states of %d device(s), this process sees %d: restoring entry %d "
                "on device %d",
                len(saved),
                torch.cuda.device_count(),
                index,
                device,
            )
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (the run's own generator is seeded separately)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
