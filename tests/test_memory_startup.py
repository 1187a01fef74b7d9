"""The memory plan at start-up: a recipe that cannot fit stops before the model loads; auto_fit
applies the plan's changes instead and the run trains with them."""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import ROOT, base_args, train_in_process
from trainer.cli import main
from trainer.config import load_config


@pytest.fixture
def no_model_load(monkeypatch):
    import trainer.parts.builder as builder_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(builder_mod, "load_model", refuse)


def test_a_budget_too_small_stops_before_the_model_loads_with_the_plan(tmp_path, no_model_load, caplog):
    argv = ["--config", str(ROOT / "train.json"), *base_args(tmp_path, vram=0.001)]
    started = time.monotonic()
    with caplog.at_level("ERROR"):
        assert main(argv) == 2
    assert time.monotonic() - started < 60  # seconds, not a model load and a first step
    assert "vram 0.001 GiB" in caplog.text and "weights" in caplog.text and "optimizer" in caplog.text
    assert not any((tmp_path / "logs").glob("*/checkpoints"))  # no run folder was made


def test_without_vram_a_cpu_run_is_not_checked():
    from trainer.plan.check import startup_check

    cfg = load_config(str(ROOT / "train.json"), [])
    assert startup_check(cfg, device="cpu") == (cfg, None)


def test_auto_fit_applies_the_advice_and_the_run_builds_with_it(tmp_path):
    from trainer.optim import load_optimizer_file
    from trainer.plan import plan_memory
    from trainer.plan.check import startup_check

    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path))
    full = plan_memory(cfg, load_optimizer_file(cfg.optimizer_config), device="cpu", with_advice=False)
    budget_gib = 0.97 * full.total_bytes / 2**30  # just below what the recipe needs as it is
    cfg = cfg.model_copy(update={"vram": budget_gib, "auto_fit": True})
    fitted, opt_file = startup_check(cfg, device="cpu")
    assert opt_file is not None
    assert plan_memory(fitted, opt_file, device="cpu", with_advice=False).total_bytes <= budget_gib * 2**30


def test_an_out_of_memory_step_stops_with_the_plan_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from trainer.runtime.errors import TrainingStopped
    from trainer.step.training_step import TrainingStep

    real = TrainingStep.__call__
    calls = {"n": 0}

    def oom_on_the_fifth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainingStep, "__call__", oom_on_the_fifth)
    with pytest.raises(TrainingStopped, match="out of memory at optimizer step") as stop:
        train_in_process(tmp_path, save_every_n_steps=1, batch_size=4, max_epochs=2)
    assert "weights" in str(stop.value)
    from trainer.checkpointing import find_last

    assert find_last(tmp_path / "logs", "shapes").resumable  # the last complete checkpoint is intact
