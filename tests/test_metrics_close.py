"""The run's metrics are closed when the run ends: wandb runs are finished, not left open."""

from __future__ import annotations

import importlib.machinery
import sys
import types

from tests.helpers import train_in_process


class FakeWandbRun:
    def __init__(self):
        self.logged: list[dict] = []
        self.finished = 0

    def log(self, values, step=None):
        assert not self.finished, "logged after finish"
        self.logged.append(values)

    def finish(self):
        self.finished += 1


def test_a_wandb_run_is_finished_once_when_the_training_ends(tmp_path, monkeypatch):
    run = FakeWandbRun()
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec("wandb")
    fake.init = lambda **kwargs: run
    fake.Image = lambda *a, **k: object()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summary, session = train_in_process(
        tmp_path, wandb=True, max_epochs=1, sample_prompts=None, validation_config=None
    )
    assert summary.global_step > 0 and run.logged  # it mirrored the scalars
    assert run.finished == 1
    session.close()  # a second close changes nothing
    assert run.finished == 1
