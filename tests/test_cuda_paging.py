"""Paged optimizer state across the trainer's resume, on a real GPU (issue 32 item 1).

The CPU test (tests/test_paged_resume.py) emulates bitsandbytes' pager; this one runs the
real one: tiny-sd1's larger layers (the token embedding, 1.6 M elements; convolutions over
1e5) are above the paging threshold, so their `paged_adamw8bit` state is CUDA managed memory
in the fresh run and must still be after `resume_ckpt: findlast`. Run by bench/gpu_suite.py
--phase 1 (`pytest -m cuda`); skipped, and counted as skipped, without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import copy_images
from tests.test_paged_resume import _large_states, _not_from_the_pager, _run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_suite.py runs it)"),
]


def test_paged_state_survives_the_trainers_resume_on_cuda(tmp_path):
    data = copy_images(tmp_path / "data", 4)
    _, fresh = _run(tmp_path, data, stop_at_step=1)
    fresh_states = _large_states(fresh.optim.torch_optimizers())
    assert fresh_states and not _not_from_the_pager(fresh_states)
    summary, resumed = _run(tmp_path, data, resume_ckpt="findlast")
    assert resumed.resumed_from is not None and summary.global_step > 1
    states = _large_states(resumed.optim.torch_optimizers())
    assert len(states) == len(fresh_states) and not _not_from_the_pager(states)
    assert all(t.device.type == "cuda" for _, t in states)
