"""Crash safety: SIGKILL mid-save leaves the previous checkpoint loadable; SIGINT saves and resumes exactly."""

from __future__ import annotations

import json
import signal

import pytest

from tests.helpers import (
    adamw_file,
    assert_bitwise_equal,
    base_args,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    run_folders,
    run_train,
    start_train,
    wait_for,
)
from trainer.checkpointing import find_last, list_checkpoints

RUN = dict(batch_size=6, save_every_n_epochs=1, cond_dropout=0.1, flip_p=0.5, resolution=64, max_epochs=30)
STEPS_PER_EPOCH = 2  # 12 images at batch 6: saves come often, so the kill lands in one quickly


@pytest.fixture
def small_data(tmp_path):
    """12 of the bundled images (with captions)."""
    return copy_images(tmp_path / "data", 12)


@pytest.fixture(autouse=True)
def adamw(tmp_path, monkeypatch):
    """Plain AdamW (the optimizer is not the subject; 8-bit AdamW resumes exactly in test_resume)."""
    monkeypatch.setitem(RUN, "optimizer_config", adamw_file(tmp_path))


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path, small_data):
    logdir = tmp_path / "logs"
    proc = start_train(
        base_args(tmp_path, project_name="crash", **RUN, data_root=small_data), tmp_path / "crash.log"
    )

    def saving_after_a_complete_one():
        for run in logdir.glob("crash-*"):
            ckpts = run / "checkpoints"
            if ckpts.exists() and list_checkpoints(ckpts) and list(ckpts.glob(".tmp-*")):
                return run
        return None

    run = wait_for(saving_after_a_complete_one, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob(".tmp-*")), "the kill should have hit a save in progress"

    last = find_last(logdir, "crash")
    assert last.path.parent == run / "checkpoints" and not last.path.name.startswith(".")
    # Resume to one epoch past the last complete checkpoint; a run never killed must agree bitwise.
    stop = last.step + STEPS_PER_EPOCH
    resumed = run_train(
        base_args(
            tmp_path,
            project_name="crash",
            resume_ckpt="findlast",
            stop_at_step=stop,
            **RUN,
            data_root=small_data,
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # stop_at_step is a normal end
    assert f"resumed {last.path}" in resumed.stderr
    final = find_last(logdir, "crash")
    assert final.path.parent == run / "checkpoints" and final.step == stop
    straight = run_train(
        base_args(tmp_path, project_name="straight", stop_at_step=stop, **RUN, data_root=small_data)
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_bitwise_equal(pipeline_weights(find_last(logdir, "straight").path), pipeline_weights(final.path))


def test_sigint_saves_and_the_checkpoint_resumes_exactly(tmp_path, small_data):
    epochs = 6
    run = {**RUN, "max_epochs": epochs}
    straight = run_train(base_args(tmp_path, project_name="straight", **run, data_root=small_data))
    assert straight.returncode == 0, straight.stderr[-3000:]

    logdir = tmp_path / "logs"
    proc = start_train(
        base_args(tmp_path, project_name="stopped", **run, data_root=small_data),
        tmp_path / "s.log",
    )
    wait_for(lambda: any(checkpoint_dirs(r) for r in logdir.glob("stopped-*")), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stderr = proc.log_path.read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT received" in stderr
    last = find_last(logdir, "stopped")
    assert last.manifest["reason"] == "interrupted"
    assert last.step < epochs * STEPS_PER_EPOCH, "the interrupt should land before the end of the run"

    resumed = run_train(
        base_args(tmp_path, project_name="stopped", resume_ckpt="findlast", **run, data_root=small_data)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    straight_run = next(r for r in run_folders(logdir) if r.name.startswith("straight-"))
    final_a = checkpoint_dirs(straight_run)[-1]
    final_b = find_last(logdir, "stopped").path
    assert json.loads((final_b / "manifest.json").read_text())["global_step"] == epochs * STEPS_PER_EPOCH
    assert_bitwise_equal(pipeline_weights(final_a), pipeline_weights(final_b))
