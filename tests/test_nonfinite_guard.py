"""Non-finite weights are never saved, and the stop names a last good state that is finite (issue 29).

An update that turns the weights into NaN (what `lr: Infinity` does at step 1) is provoked by
a patched optimizer step, so the rest of the run is the trainer's own: the following losses are
NaN, their steps are skipped, and saves and the non-finite guard meet NaN weights.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, base_args, checkpoint_dirs, pipeline_weights, start_weights
from trainer.optim.optimizer_set import OptimizerSet
from trainer.runtime.errors import ModelLoadError, TrainingStopped


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """64 px, plain AdamW, no single files nor optimizer state: only the pipeline folders."""
    root = tmp_path_factory.mktemp("nonfinite")
    opt = root / "optimizer_adamw.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}, "text_encoder_overrides": None}))
    return {
        "logdir": str(root / "logs"),
        "optimizer_config": str(opt),
        "resolution": 64,
        "batch_size": 4,
        "max_epochs": 1,
        "stop_at_step": 6,
        "no_save_ckpt": True,
        "save_optimizer": False,
        "log_step": 1,
    }


def nan_weights_after_step(monkeypatch, step: int) -> None:
    """From optimizer step `step` on, the update leaves NaN in every trained component."""
    real_step = OptimizerSet.step
    calls = {"n": 0}

    def poisoned(self, scaler=None):
        result = real_step(self, scaler)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                for comp in self.components.values():
                    comp.params[0].fill_(float("nan"))
        return result

    monkeypatch.setattr(OptimizerSet, "step", poisoned)


def run_until_stopped(tmp_path, fast, **overrides):
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **{**fast, **overrides}))
    session = build_session(cfg)
    try:
        with pytest.raises(TrainingStopped) as err:
            train(session)
    finally:
        session.close()
    return str(err.value), session


def all_finite(checkpoint: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pipeline_weights(checkpoint).values())


def named_checkpoint(message: str) -> Path:
    """The checkpoint the stop message gives as the last good state."""
    found = re.search(r"last good state is (\S+?) \(step (\d+)", message)
    assert found, message
    return Path(found.group(1))


def test_nan_weights_before_any_checkpoint_save_the_starting_weights(tmp_path, fast, monkeypatch, caplog):
    nan_weights_after_step(monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        message, session = run_until_stopped(tmp_path, fast, max_nonfinite_steps=2)
    assert "2 optimizer steps in a row" in message
    written = checkpoint_dirs(session.run.path)
    assert written, "the last good state must be saved when no checkpoint holds it"
    assert all(all_finite(c) for c in written), "a checkpoint with NaN weights was written"
    last_good = named_checkpoint(message)
    assert last_good in written and "(step 0" in message
    manifest = json.loads((last_good / "manifest.json").read_text())
    assert manifest["global_step"] == 0 and manifest["reason"] == "last_good"
    assert not (last_good / "training_state.pt").exists()  # weights only: no optimizer state of step 0
    saved, start = pipeline_weights(last_good), start_weights()
    assert all(torch.equal(saved[k], start[k]) for k in start), "the saved weights are not the starting ones"
    refused = [r.getMessage() for r in caplog.records if "not saving" in r.getMessage()]
    assert refused and "non-finite" in refused[0]


def test_nan_weights_are_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path, fast, monkeypatch):
    nan_weights_after_step(monkeypatch, 3)
    message, session = run_until_stopped(tmp_path, fast, save_every_n_steps=1)
    written = checkpoint_dirs(session.run.path)
    assert [c.name[-8:] for c in written] == ["gs000001", "gs000002"]
    assert all(all_finite(c) for c in written)
    assert named_checkpoint(message) == written[-1] and "(step 2" in message
    assert session.state.global_step == 3  # stopped at the refused save, not 10 skipped steps later


def test_finite_weights_with_nan_losses_are_saved_resumable(tmp_path, fast, monkeypatch):
    """A NaN loss (a bad batch, fp16 overflow) leaves the weights finite: they are the last good
    state and are saved with the training state, as the step that last updated them says."""
    from trainer.step.training_step import StepOutput, TrainingStep

    real_call = TrainingStep.__call__

    def nan_loss(self, batch):
        out = real_call(self, batch)
        return StepOutput(loss=out.loss * float("nan"), timesteps=out.timesteps)

    monkeypatch.setattr(TrainingStep, "__call__", nan_loss)
    message, session = run_until_stopped(tmp_path, fast, max_nonfinite_steps=2, save_optimizer=True)
    (ckpt,) = checkpoint_dirs(session.run.path)
    assert named_checkpoint(message) == ckpt and "(step 0" in message
    assert (ckpt / "training_state.pt").exists() and all_finite(ckpt)


def test_a_model_with_nonfinite_weights_is_refused_before_training(tmp_path, fast):
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **fast))
    session = build_session(cfg)
    try:
        with torch.no_grad():
            next(session.model.unet.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(ModelLoadError, match="NaN or Inf") as err:
            train(session)
    finally:
        session.close()
    assert "builtin:tiny-sd1" in str(err.value)
    assert session.state.global_step == 0 and not checkpoint_dirs(session.run.path)
