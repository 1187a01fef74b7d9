"""`deterministic`: the backend flags it sets, and a run that trains with them (issue 13 item 11)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import copy_images, train_in_process
from trainer.runtime.determinism import CUBLAS_ENV, configure_determinism
from trainer.runtime.errors import ConfigError


@pytest.fixture(autouse=True)
def restore_backend_flags(monkeypatch):
    """The flags are process-wide: leave them as they were for the other tests."""
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def test_sets_every_flag_and_wins_over_cudnn_benchmark(monkeypatch):
    torch.backends.cudnn.benchmark = True  # what the CUDA speed defaults turn on
    settings = configure_determinism(SimpleNamespace(deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False
    assert os.environ[CUBLAS_ENV] == ":4096:8"
    assert settings == {
        "deterministic_algorithms": True,
        "cudnn.deterministic": True,
        "cudnn.benchmark": False,
        CUBLAS_ENV: ":4096:8",
    }
    # A later run in the same process without the key does not inherit deterministic mode.
    assert configure_determinism(SimpleNamespace(deterministic=False)) == {"deterministic_algorithms": False}
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic is False


def test_keeps_a_valid_cublas_setting_and_refuses_an_invalid_one(monkeypatch):
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    assert configure_determinism(SimpleNamespace(deterministic=True))[CUBLAS_ENV] == ":16:8"
    monkeypatch.setenv(CUBLAS_ENV, ":0:0")
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=':0:0'.*:4096:8, :16:8"):
        configure_determinism(SimpleNamespace(deterministic=True))


def test_a_run_trains_with_deterministic_kernels(tmp_path):
    """Every op of a training step (and its checkpoint) must have a deterministic kernel, or torch
    raises; the session applies the key before anything else."""
    opt = tmp_path / "optimizer.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}}))
    data = copy_images(tmp_path / "data", 4)
    summary, session = train_in_process(
        tmp_path,
        data_root=data,
        optimizer_config=str(opt),
        resolution=64,
        batch_size=2,
        stop_at_step=2,
        no_save_ckpt=True,
        deterministic=True,
    )
    assert summary.global_step == 2 and summary.final_loss is not None
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
    assert json.loads((session.run.path / "train_effective.json").read_text())["deterministic"] is True
