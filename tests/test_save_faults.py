"""A save that hits a full disk (or another I/O error) removes its partial folder and stops with
one message: the last intact checkpoint, the space needed and free, how to resume (issue 29).

The store is tested on a real full filesystem (a small tmpfs) where this machine may mount one,
else with writers that raise what a full disk raises; the run-level tests check the trainer's
path from the loop to the message and exit code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import subprocess
import uuid
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from tests.helpers import ROOT, base_args, checkpoint_dirs, run_train, small_run
from trainer.checkpointing import store
from trainer.checkpointing.store import list_checkpoints, open_checkpoint, write_checkpoint
from trainer.runtime.errors import CheckpointWriteError

KIB = 1024
Usage = namedtuple("Usage", "total used free")  # what shutil.disk_usage returns


def save(ckpts: Path, step: int, size: int) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"x" * size)

    return write_checkpoint(ckpts, f"p-ep000-gs{step:06d}", write, {"global_step": step, "epoch": 0})


def partial_then(exc: BaseException, written: int = 3000):
    """A checkpoint writer that writes part of a file, then fails with `exc`."""

    def write(tmp: Path) -> None:
        (tmp / "pipeline").mkdir()
        (tmp / "pipeline" / "part.bin").write_bytes(b"y" * written)
        raise exc

    return write


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A real filesystem of `size` bytes at `path` (needs root: skipped where mount is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the patched-writer tests cover it"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_a_failed_save_removes_its_partial_folder_and_names_the_intact_checkpoint(tmp_path, exc):
    ckpts = tmp_path / "p-20260101-000000" / "checkpoints"
    intact = save(ckpts, 1, 5000)
    with pytest.raises(CheckpointWriteError) as err:
        write_checkpoint(ckpts, "p-ep000-gs000002", partial_then(exc), {"global_step": 2, "epoch": 0})
    assert err.value.exit_code == 4
    message = str(err.value)
    assert sorted(p.name for p in ckpts.iterdir()) == [intact.name], "the partial folder was left behind"
    assert open_checkpoint(intact).step == 1
    assert f"last intact checkpoint is {intact} (step 1)" in message
    assert "No space left on device" in message
    assert "5000 bytes" in message and "3000 bytes were written" in message  # needed, and how far it got
    assert "free" in message and "--resume_ckpt findlast" in message


def test_a_failed_first_save_says_no_checkpoint_is_intact(tmp_path):
    ckpts = tmp_path / "p-20260101-000000" / "checkpoints"
    with pytest.raises(CheckpointWriteError, match="no complete checkpoint") as err:
        write_checkpoint(
            ckpts,
            "p-ep000-gs000001",
            partial_then(OSError(errno.EDQUOT, "Disk quota exceeded")),
            {"global_step": 1},
        )
    assert "Disk quota exceeded" in str(err.value)
    assert list(ckpts.iterdir()) == []


def test_a_bug_while_saving_still_removes_the_partial_folder_and_keeps_its_traceback(tmp_path):
    ckpts = tmp_path / "c"
    with pytest.raises(ValueError, match="a bug"):
        write_checkpoint(ckpts, "p-ep000-gs000001", partial_then(ValueError("a bug")), {"global_step": 1})
    assert list(ckpts.iterdir()) == []


def test_a_real_full_filesystem(tmp_path):
    """The errors the writers raise on a really full disk: Python's, safetensors' and torch's."""
    with tmpfs(tmp_path / f"small-{uuid.uuid4().hex[:6]}", 96 * KIB) as disk:
        ckpts = disk / "p-20260101-000000" / "checkpoints"
        intact = save(ckpts, 1, 40 * KIB)
        writers = {
            "python": lambda tmp: (tmp / "w.bin").write_bytes(b"x" * 80 * KIB),
            "safetensors": lambda tmp: save_file({"w": torch.zeros(20 * KIB)}, str(tmp / "w.safetensors")),
            "torch.save": lambda tmp: store.save_training_state(
                tmp / "training_state.pt", {"w": torch.zeros(20 * KIB)}
            ),
        }
        for what, writer in writers.items():
            with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
                write_checkpoint(ckpts, "p-ep000-gs000002", writer, {"global_step": 2})
            assert f"last intact checkpoint is {intact}" in str(err.value), what
            assert sorted(p.name for p in ckpts.iterdir()) == [intact.name], what
        assert open_checkpoint(intact).step == 1


def test_free_space_shortfall_compares_with_the_last_checkpoint(tmp_path, monkeypatch):
    ckpts = tmp_path / "c"
    assert store.space_shortfall(ckpts) is None  # nothing saved yet: nothing to compare with
    save(ckpts, 1, 5000)
    needed = sum(list_checkpoints(ckpts)[-1].manifest["files"].values())
    monkeypatch.setattr(store, "disk_usage", lambda _p: Usage(10**6, 10**6 - 100, 100))
    assert store.space_shortfall(ckpts) == (needed, 100)
    monkeypatch.setattr(store, "disk_usage", lambda _p: Usage(10**9, 0, 10**9))
    assert store.space_shortfall(ckpts) is None


# --- the run: the loop, the message, the exit code ---------------------------------------------


@pytest.fixture
def fast(tmp_path):
    return small_run(tmp_path, log_step=1)


def test_disk_full_mid_run_stops_with_one_message_and_keeps_the_state(tmp_path, fast, monkeypatch, caplog):
    """The third save fails inside the EMA export; the early warning came once, before the
    second save (free space below the first checkpoint's size); the live weights are back in
    the model after the failed save (the EMA swap is undone)."""
    from trainer.checkpointing import contents
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    real_save_pipeline = contents.save_pipeline
    calls, live = {"n": 0}, {}

    def full_in_third_ema_export(components, path):
        calls["n"] += 1  # two per checkpoint: pipeline/ (live weights), then pipeline_ema/
        if calls["n"] == 5:
            live.update({k: v.clone() for k, v in components.unet.state_dict().items()})
        if calls["n"] == 6:
            path.mkdir(parents=True)
            (path / "half-written.bin").write_bytes(b"z" * 1234)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_pipeline(components, path)

    monkeypatch.setattr(contents, "save_pipeline", full_in_third_ema_export)
    monkeypatch.setattr(store, "disk_usage", lambda _p: Usage(10**12, 10**12 - 4096, 4096))
    overrides = {
        **fast,
        "save_every_n_steps": 1,
        "stop_at_step": 5,
        "ema_decay_rate": 0.5,
        "ema_update_interval": 1,
    }
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **overrides))
    session = build_session(cfg)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(CheckpointWriteError) as err:
            train(session)
    finally:
        session.close()
    written = checkpoint_dirs(session.run.path)
    assert [c.name[-8:] for c in written] == ["gs000001", "gs000002"]
    assert not list((session.run.path / "checkpoints").glob(".tmp-*"))
    assert f"last intact checkpoint is {written[-1]} (step 2)" in str(err.value)
    assert "4096 bytes were free" in str(err.value) and "--resume_ckpt findlast" in str(err.value)
    warnings = [r.getMessage() for r in caplog.records if "will not fit" in r.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0]
    assert session.state.global_step == 3
    ema = session.ema.shadow["unet"]
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # the swap would show
    assert all(torch.equal(live[k], v) for k, v in session.model.unet.state_dict().items())


def test_train_py_on_a_full_disk_exits_4_with_one_message(tmp_path, fast):
    """train.py on a real full filesystem: the first checkpoint fits, the second does not."""
    from tests.helpers import train_in_process

    first_logs = tmp_path / "first"
    summary, session = train_in_process(tmp_path, **fast, logdir=str(first_logs), stop_at_step=1)
    (first,) = checkpoint_dirs(session.run.path)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    used = sum(f.stat().st_size for f in first_logs.rglob("*") if f.is_file())
    with tmpfs(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", used + size // 2 + 256 * KIB) as disk:
        shutil.copytree(first_logs, disk / "logs")
        args = base_args(
            tmp_path,
            **fast,
            logdir=str(disk / "logs"),
            resume_ckpt="findlast",
            save_every_n_steps=1,
            stop_at_step=3,
        )
        result = run_train(args)
        ckpts = disk / "logs" / session.run.name / "checkpoints"
        left = sorted(p.name for p in ckpts.iterdir())
        intact_step = open_checkpoint(ckpts / first.name).step
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert left == [first.name], "a partial folder was left on the full disk"
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, errors
    assert f"last intact checkpoint is {ckpts / first.name} (step 1)" in errors[0]
    assert "No space left on device" in errors[0] and "--resume_ckpt findlast" in errors[0]
    assert "will not fit" in result.stderr
    assert intact_step == 1
