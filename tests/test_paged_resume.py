"""Paged optimizer state stays paged across a resume (issue 32 item 1), emulated on CPU.

bitsandbytes pages (CUDA managed memory, evicted to the host under pressure) the state of every
parameter of at least 1e5 elements of a `paged_*` optimizer: `get_state_buffer` allocates it
with `get_paged` and tags it `is_paged`. The trainer loads a checkpoint's training state with
`map_location="cpu"`, and bitsandbytes' `load_state_dict` then moves `state1`/`state2` to the
parameter's device as ordinary tensors: a resumed `paged_adamw8bit` run holds its whole
optimizer state in device memory and can run out of it where the fresh run fit. CPU tensors are
never paged by bitsandbytes, so the test makes its CPU branch behave like its CUDA one (a tagged
buffer registered with the page manager) and follows those tags through the trainer's resume.
"""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.optim.optimizer import Optimizer8bit

from tests.helpers import copy_images, train_in_process

PAGING_THRESHOLD = 1e5  # bitsandbytes' Optimizer8bit.get_state_buffer


@pytest.fixture
def paged_on_cpu(monkeypatch):
    """`get_state_buffer` as on CUDA: large states of paged optimizers come from the pager
    (prefetching them, a CUDA call, is left out)."""
    original = Optimizer8bit.get_state_buffer

    def get_state_buffer(self, p, dtype=torch.float32):
        if not self.is_paged or p.numel() < PAGING_THRESHOLD:
            return original(self, p, dtype)
        buffer = torch.zeros_like(p, dtype=dtype)
        buffer.is_paged = True
        self.page_mng.paged_tensors.append(buffer)
        return buffer

    monkeypatch.setattr(Optimizer8bit, "get_state_buffer", get_state_buffer)
    monkeypatch.setattr(Optimizer8bit, "prefetch_state", lambda self, p: None)  # a CUDA-only hint
    F.GlobalPageManager.get_instance().paged_tensors.clear()


def _large_states(optimizers) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of the moment buffers of every parameter above the paging threshold."""
    out = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.numel() >= PAGING_THRESHOLD and p in opt.state:
                    out += [(k, v) for k, v in opt.state[p].items() if k in ("state1", "state2")]
    return out


def _not_from_the_pager(states: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Keys of the buffers the pager did not hand out. Identity, not the `is_paged` tag: torch.save
    pickles the tag with the tensor, so a loaded copy in ordinary memory still claims it."""
    paged = {id(t) for t in F.GlobalPageManager.get_instance().paged_tensors}
    return [k for k, t in states if id(t) not in paged]


def _run(tmp_path, data, **overrides):
    opt = tmp_path / "paged.json"
    opt.write_text(json.dumps({"base": {"optimizer": "paged_adamw8bit", "lr": 1e-4}}))
    settings = dict(data_root=data, optimizer_config=str(opt), resolution=64, batch_size=2, max_epochs=2)
    return train_in_process(tmp_path, project_name="paged", **settings, **overrides)


def test_paged_state_is_still_paged_after_the_trainers_resume(tmp_path, paged_on_cpu):
    data = copy_images(tmp_path / "data", 4)
    _, fresh = _run(tmp_path, data, stop_at_step=1)
    fresh_states = _large_states(fresh.optim.torch_optimizers())
    assert fresh_states and not _not_from_the_pager(fresh_states)  # the emulation pages them

    summary, resumed = _run(tmp_path, data, resume_ckpt="findlast")
    assert resumed.resumed_from is not None and summary.global_step > 1
    states = _large_states(resumed.optim.torch_optimizers())
    assert len(states) == len(fresh_states)
    unpaged = _not_from_the_pager(states)
    assert not unpaged, f"{len(unpaged)} of {len(states)} large state buffers left the pager on resume"
