"""A run folder in use is locked: a second process is refused, a killed one leaves no stale lock (issue 29)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, base_args, checkpoint_dirs, run_train, small_run, train_in_process
from trainer.checkpointing.store import open_checkpoint, write_checkpoint
from trainer.run.folder import LOCK_FILE, RunFolder, lock_resumed_folder, lock_run_folder
from trainer.runtime.errors import CheckpointError, RunFolderInUse


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock the trainer's way and keeps it."""
    code = (
        "import sys, time; from pathlib import Path; from trainer.run.folder import RunFolder, lock_run_folder; "
        "lock_run_folder(RunFolder(Path(sys.argv[1]))); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_lock_is_refused_with_the_folder_and_the_holder(tmp_path):
    run = RunFolder(tmp_path / "p-20260101-000000")
    run.path.mkdir()
    first = lock_run_folder(run)
    holder = json.loads((run.path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(RunFolderInUse) as err:
        lock_run_folder(run)  # even from the same process: one run per folder
    assert err.value.exit_code == 2
    assert str(run.path) in str(err.value) and f"process {os.getpid()}" in str(err.value)
    first.lock.release()
    lock_run_folder(run).lock.release()


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    """Data-loader workers are forked: a worker outliving a killed trainer for a few seconds must
    not hold the lock (flock locks belong to the open file, which fork shares)."""
    run = RunFolder(tmp_path / "p-20260101-000000")
    run.path.mkdir()
    locked = lock_run_folder(run)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only says it runs, then sleeps
        os.write(ready_w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"  # the child runs (past fork's hooks) and is alive
        locked.lock.release()
        lock_run_folder(run).lock.release()  # the sleeping child does not hold it
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_another_process_holding_the_lock_refuses_then_a_sigkill_frees_it(tmp_path):
    run = RunFolder(tmp_path / "p-20260101-000000")
    run.path.mkdir()
    proc = hold_lock(run.path)
    try:
        with pytest.raises(RunFolderInUse, match=f"process {proc.pid}"):
            lock_run_folder(run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock_run_folder(run).lock.release()  # the kernel dropped the dead process's lock


def save(ckpts: Path, step: int) -> Path:
    return write_checkpoint(
        ckpts, f"p-ep000-gs{step:06d}", lambda tmp: (tmp / "w.bin").write_bytes(b"x"), {"global_step": step}
    )


def test_findlast_refuses_a_folder_another_run_moved_on_while_this_one_loaded(tmp_path):
    """Two `findlast` started together chose the same checkpoint; the first took the folder,
    saved a newer checkpoint and finished. The second, locking after it, must not resume the
    stale one into the same folder (its saves would replace the other run's checkpoints)."""
    run = RunFolder(tmp_path / "p-20260101-000000")
    chosen = open_checkpoint(save(run.checkpoints, 4))
    time.sleep(0.01)
    newer = save(run.checkpoints, 6)
    with pytest.raises(CheckpointError) as err:
        lock_resumed_folder(run, chosen, findlast=True)
    assert str(newer) in str(err.value) and "--resume_ckpt findlast" in str(err.value)
    lock_resumed_folder(run, chosen, findlast=False).lock.release()  # an explicit path may go back
    lock_resumed_folder(run, open_checkpoint(newer), findlast=True).lock.release()


@pytest.fixture
def fast(tmp_path):
    return small_run(tmp_path, save_optimizer=True)


def test_a_session_on_a_locked_run_folder_is_refused_until_the_holder_dies(tmp_path, fast):
    from trainer.config import load_config
    from trainer.run.session import build_session

    _, first = train_in_process(tmp_path, **fast, stop_at_step=1)
    proc = hold_lock(first.run.path)
    resume = load_config(str(ROOT / "train.json"), base_args(tmp_path, **fast, resume_ckpt="findlast"))
    try:
        with pytest.raises(RunFolderInUse) as err:
            build_session(resume)
        assert str(first.run.path) in str(err.value) and f"process {proc.pid}" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    session = build_session(resume)  # a killed holder leaves no stale lock
    session.close()
    assert session.run.path == first.run.path and session.resumed_from is not None


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "train.json"), *args]
    out = open(log, "w")  # noqa: SIM115 - closed by the OS when the child exits
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out, stderr=out)


def wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out: {log.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_findlast_runs_one_trains_the_other_is_refused_and_kill_9_leaves_no_lock(tmp_path, fast):
    """train.py end to end: the first resume holds the folder (paused, to be sure it is still in
    use), the second exits 2 naming folder and PID, the first then finishes. A third, killed with
    SIGKILL while training, does not keep the folder locked: the next findlast resumes it."""
    _, first = train_in_process(tmp_path, **fast, stop_at_step=1)
    folder = first.run.path
    resume = base_args(tmp_path, **fast, resume_ckpt="findlast")

    a_log = tmp_path / "a.log"
    a = start_train([*resume, "--stop_at_step", "3"], a_log)
    wait_until(lambda: "exact resume" in a_log.read_text(), a, a_log)
    a.send_signal(signal.SIGSTOP)
    try:
        b = run_train([*resume, "--stop_at_step", "3"])
    finally:
        a.send_signal(signal.SIGCONT)
    assert b.returncode == 2, b.stderr[-3000:]
    assert str(folder) in b.stderr and f"process {a.pid}" in b.stderr and "Traceback" not in b.stderr
    assert a.wait(timeout=300) == 0, a_log.read_text()[-3000:]
    assert checkpoint_dirs(folder)[-1].name.endswith("gs000003")

    c_log = tmp_path / "c.log"
    c = start_train([*resume, "--stop_at_step", "200", "--max_epochs", "20", "--num_workers", "1"], c_log)
    wait_until(lambda: "exact resume" in c_log.read_text(), c, c_log)
    c.send_signal(signal.SIGKILL)
    c.wait()
    d = run_train([*resume, "--stop_at_step", "4"])
    assert d.returncode == 0, d.stderr[-3000:]
    assert checkpoint_dirs(folder)[-1].name.endswith("gs000004")
