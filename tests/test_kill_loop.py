"""The kill -9 loop: SIGKILL a run again and again, resume each time with `findlast`, and end
bitwise equal to a run that was never interrupted.

DESIGN.md promises that a `kill -9` at any moment leaves the previous checkpoint loadable and
that resume is exact; test_kill.py checks one kill mid-save and one SIGINT. This loop chains
several kills (some while a checkpoint is being written, some after a random delay mid-training)
so that stale temporary folders, repeated exact resumes into the same run folder and saves of a
step that was already lost once all have to work together.

The kill moments come from a seeded `random.Random`; the seed is printed (pytest shows it on a
failure) and SDTRAINER_KILL_SEED=<seed> replays the same choices. Timing on a busy machine still
varies, so a replay lands near, not exactly on, the same instructions.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    adamw_file,
    assert_bitwise_equal,
    base_args,
    copy_images,
    pipeline_weights,
    run_folders,
    run_train,
    start_train,
    wait_for,
)
from trainer.checkpointing import find_last, list_checkpoints
from trainer.checkpointing.store import TRAINING_STATE, load_training_state

# 12 images at batch 6: 2 optimizer steps per epoch, a checkpoint every epoch (kills find saves
# quickly). Each kill advances the run by at most one epoch (see _kill_mid_save/_kill_mid_step),
# so 8 epochs leave the last, uninterrupted resume at least two to do.
RUN = dict(batch_size=6, save_every_n_epochs=1, cond_dropout=0.1, flip_p=0.5, resolution=64, max_epochs=8)
STEPS_PER_EPOCH = 2
KILLS = ("mid-save", "mid-save", "mid-save", "mid-step", "mid-step")  # order shuffled by the seed
PROJECT = "killed"


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: how it was aimed, and the checkpoint `findlast` sees after it."""

    kind: str
    detail: str
    last_step: int


def _seed() -> int:
    replay = os.environ.get("SDTRAINER_KILL_SEED")
    return int(replay) if replay else random.SystemRandom().randrange(2**32)


def _checkpoints_dir(logdir: Path) -> Path | None:
    """The checkpoints folder of the project's one run folder (exact resume never makes a
    second); None before the first run has made its folder."""
    runs = [r for r in run_folders(logdir) if r.name.startswith(f"{PROJECT}-")] if logdir.exists() else []
    assert len(runs) <= 1, f"exact resume should reuse one run folder, found {runs}"
    return runs[0] / "checkpoints" if runs else None


def _fresh_tmp(ckpts: Path | None, since: float) -> Path | None:
    """A temporary checkpoint folder created after `since` (older ones are left by earlier kills)."""
    for tmp in ckpts.glob(".tmp-*") if ckpts else ():
        try:
            if tmp.stat().st_mtime > since:
                return tmp
        except FileNotFoundError:  # renamed into place between glob and stat: that save is done
            continue
    return None


def _complete_after(ckpts: Path | None, since: float) -> float | None:
    """The creation time of a complete checkpoint written after `since`, if there is one."""
    found = list_checkpoints(ckpts) if ckpts else []
    created = [c.manifest["created"] for c in found if c.manifest["created"] > since]
    return max(created) if created else None


def _kill_mid_save(proc, logdir: Path, since: float, rng: random.Random, step_seconds: float) -> str:
    """Let 0 or 1 saves of this process complete, then SIGKILL as soon as the next one starts."""
    complete_first = rng.choice((0, 1))
    if complete_first:
        since = wait_for(lambda: _complete_after(_checkpoints_dir(logdir), since), proc)
    tmp = wait_for(lambda: _fresh_tmp(_checkpoints_dir(logdir), since), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists(), f"the kill should have hit the save into {tmp.name} while it was in progress"
    return f"after {complete_first} complete save(s), during the save into {tmp.name}"


def _kill_mid_step(proc, logdir: Path, since: float, rng: random.Random, step_seconds: float) -> str:
    """SIGKILL at a random moment within about one epoch and a half of training (steps, a save,
    logging: wherever it lands)."""
    delay = rng.uniform(0.0, (STEPS_PER_EPOCH + 1) * step_seconds)
    moment = time.monotonic() + delay
    wait_for(lambda: time.monotonic() >= moment, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"{delay:.2f}s into training"


KILLERS = {"mid-save": _kill_mid_save, "mid-step": _kill_mid_step}


def _seconds_per_step(ckpts: Path) -> float:
    """Wall time per optimizer step of the uninterrupted run (its checkpoints' creation times), so
    the random delays scale with this machine's speed."""
    kept = list_checkpoints(ckpts)
    assert len(kept) >= 2, f"need two checkpoints of the straight run to time it, found {kept}"
    first, last = kept[0], kept[-1]
    return (last.manifest["created"] - first.manifest["created"]) / (last.step - first.step)


def _run_and_kill(
    args: list[str], log: Path, logdir: Path, kind: str, rng: random.Random, step_seconds: float
) -> Kill:
    """Start (or resume, when a checkpoint exists) the run, wait until it trains, kill it as
    `kind` says; then check that what it left is loadable and not older than before."""
    before = find_last(logdir, PROJECT) if _checkpoints_dir(logdir) else None
    started = time.time()
    proc = start_train(args, log)
    try:
        if before is None:  # a fresh run: findlast needs one complete checkpoint to resume from
            since = wait_for(lambda: _complete_after(_checkpoints_dir(logdir), 0.0), proc)
        else:
            wait_for(lambda: f"resumed {before.path}" in log.read_text(), proc)
            since = started
        detail = KILLERS[kind](proc, logdir, since, rng, step_seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the trainer ended by itself ({proc.returncode}), not killed"
    last = find_last(logdir, PROJECT)
    assert last.resumable, f"{last.path} holds no training state"
    load_training_state(last.path / TRAINING_STATE)  # what the next resume loads
    assert before is None or last.step >= before.step, f"findlast went back from {before.path} to {last.path}"
    return Kill(kind, detail, last.step)


@pytest.mark.slow
def test_repeated_kill_9_and_findlast_end_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    seed = _seed()
    print(f"kill loop seed {seed} (replay: SDTRAINER_KILL_SEED={seed})")
    rng = random.Random(seed)
    settings = dict(RUN, data_root=copy_images(tmp_path / "data", 12), optimizer_config=adamw_file(tmp_path))
    straight_logs, logdir = tmp_path / "straight", tmp_path / "logs"

    straight = run_train(base_args(tmp_path, logdir=str(straight_logs), project_name="straight", **settings))
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_last = find_last(straight_logs, "straight")
    step_seconds = _seconds_per_step(straight_last.path.parent)

    kills = []
    for i, kind in enumerate(rng.sample(KILLS, len(KILLS))):
        resume = {"resume_ckpt": "findlast"} if i else {}
        args = base_args(tmp_path, logdir=str(logdir), project_name=PROJECT, **settings, **resume)
        kills.append(_run_and_kill(args, tmp_path / f"run{i}.log", logdir, kind, rng, step_seconds))
        print(f"kill {i + 1}: {kills[-1]}")

    last = find_last(logdir, PROJECT)
    final = run_train(
        base_args(tmp_path, logdir=str(logdir), project_name=PROJECT, resume_ckpt="findlast", **settings)
    )
    assert final.returncode == 0, f"seed {seed}: {final.stderr[-3000:]}"
    assert f"resumed {last.path}" in final.stderr, f"seed {seed}: the last run did not resume exactly"
    done = find_last(logdir, PROJECT)
    assert done.step == RUN["max_epochs"] * STEPS_PER_EPOCH == straight_last.step
    assert done.path.parent == _checkpoints_dir(logdir)
    assert_bitwise_equal(pipeline_weights(straight_last.path), pipeline_weights(done.path))
