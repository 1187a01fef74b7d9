"""After samples, the allocator's cached blocks go back (issue 32, item 5): the pipeline's
activations at the sample resolution are not the training step's shapes, and kept in the
caching allocator they fragment what the next steps allocate."""

from __future__ import annotations

import torch

from tests.helpers import train_in_process
from trainer.eval import observe


def test_cached_blocks_are_released_on_cuda_only(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    observe.release_cached_blocks(torch.device("cpu"))
    assert emptied == []
    observe.release_cached_blocks(torch.device("cuda", 0))
    assert emptied == [1]


def test_every_sampling_releases_the_cached_blocks(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(observe, "release_cached_blocks", lambda device: released.append(device.type))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")  # one prompt; a .txt asks for no samples before training
    summary, _ = train_in_process(
        tmp_path, sample_prompts=str(prompts), sample_steps=1, resolution=64, stop_at_step=2
    )
    assert summary.global_step == 2
    assert released == ["cpu", "cpu"]  # once per sampling (steps 1 and 2), with the run's device
