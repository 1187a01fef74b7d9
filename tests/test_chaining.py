"""findlast as EveryDream2's chaining (doc/CHAINING.md): exact resume when state and settings
allow, else the newest weights with a warning; seed -1 on resume; horizon change warnings."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil

import pytest

from tests.helpers import (
    ROOT,
    assert_bitwise_equal,
    base_args,
    canonical_key,
    copy_images,
    pipeline_weights,
    run_folders,
)
from trainer.checkpointing import EXACT, WEIGHTS
from trainer.config import load_config
from trainer.run.session import build_session
from trainer.runtime.errors import CheckpointError

# 8 images at batch 4: 2 optimizer steps per epoch; 64 px and plain AdamW keep each run ~1-2 s.
RUN = dict(resolution=64, batch_size=4, max_epochs=1, lr=None, no_save_ckpt=True, cond_dropout=0.0)


def opt_file(tmp_path, scheduler="constant") -> str:
    path = tmp_path / f"opt-{scheduler}.json"
    spec = {"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": scheduler, "lr_warmup_steps": 0}
    path.write_text(json.dumps({"base": spec, "text_encoder_overrides": None}))
    return str(path)


def args(tmp_path, **overrides) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        copy_images(data, 8)
    values = {**RUN, "data_root": str(data), "optimizer_config": opt_file(tmp_path), **overrides}
    return base_args(tmp_path, **values)


def train(tmp_path, **overrides):
    from trainer.run.loop import train as run_loop

    session = build_session(load_config(str(ROOT / "train.json"), args(tmp_path, **overrides)))
    try:
        return run_loop(session), session
    finally:
        session.close()


def start(tmp_path, **overrides):
    """Build a session (what a run starts from) without training."""
    session = build_session(load_config(str(ROOT / "train.json"), args(tmp_path, **overrides)))
    session.close()
    return session


def live_weights(session) -> dict:
    return {
        **{f"unet/{k}": v for k, v in session.model.unet.state_dict().items()},
        **{f"text_encoder/{k}": v for k, v in session.model.text_encoder.state_dict().items()},
    }


def warnings_of(caplog, text):
    return [r.message for r in caplog.records if r.levelno == logging.WARNING and text in r.message]


EFFECTIVE = "train_effective.json"


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """One interrupted run (seed -1, cosine schedule, resumable checkpoint at step 1 of 2) that
    the tests below start from in different ways; starting does not train."""
    tmp_path = tmp_path_factory.mktemp("chain")
    summary, session = train(
        tmp_path, project_name="ch", seed=-1, optimizer_config=opt_file(tmp_path, "cosine"), stop_at_step=1
    )
    shutil.copy(session.run.path / EFFECTIVE, tmp_path / EFFECTIVE)
    return tmp_path, summary, session


def start_from(chained, **overrides):
    """Start from the shared interrupted run. An exact resume rewrites its run folder's
    train_effective.json (the settings it now runs with), which the next resume's change table
    compares against: each start begins from the folder as the first run left it, whatever the
    order the tests run in."""
    tmp_path, _, first = chained
    shutil.copy(tmp_path / EFFECTIVE, first.run.path / EFFECTIVE)
    return start(tmp_path, **{"optimizer_config": opt_file(tmp_path, "cosine"), **overrides})


def test_findlast_after_save_optimizer_false_continues_from_the_weights(tmp_path, caplog):
    first, s1 = train(tmp_path, project_name="ch", save_optimizer=False)
    with caplog.at_level(logging.INFO):
        s2 = start(tmp_path, project_name="ch", resume_ckpt="findlast", batch_size=2)
    assert s2.plan.mode == WEIGHTS and s2.resumed_from is None and s2.state.global_step == 0
    assert s2.run.path != s1.run.path and len(run_folders(tmp_path / "logs")) == 2
    [warning] = warnings_of(caplog, "continuing from the weights of")
    assert "no training state (the previous run had save_optimizer: false)" in warning
    assert "optimizer state, LR schedule, step counter and data order start anew" in warning
    assert any(r.message.startswith("start: weights of ") for r in caplog.records)
    saved = pipeline_weights(first.checkpoints[-1])
    live = {canonical_key(k): v for k, v in live_weights(s2).items()}
    assert_bitwise_equal({k: v for k, v in live.items() if k in saved}, saved)


def test_findlast_keeps_the_exact_resume_and_seed_minus_one_is_the_recorded_seed(chained, caplog):
    _, first, s1 = chained
    assert s1.cfg.seed != -1
    recorded = json.loads((s1.run.path / "train_effective.json").read_text())["seed"]
    with caplog.at_level(logging.INFO):
        s2 = start_from(chained, project_name="ch", seed=-1, resume_ckpt="findlast")
    assert s2.plan.mode == EXACT and s2.state.global_step == 1 and s2.resumed_from == first.checkpoints[-1]
    assert s2.cfg.seed == s1.cfg.seed == recorded and s2.run.path == s1.run.path
    assert not warnings_of(caplog, "continuing from the weights of")
    assert any(r.message.startswith("start: exact resume of ") for r in caplog.records)


def test_findlast_with_changed_settings_names_them_and_an_explicit_path_refuses(chained, caplog):
    _, first, _ = chained
    with caplog.at_level(logging.INFO):
        s2 = start_from(
            chained, project_name="ch", seed=-1, resume_ckpt="findlast", batch_size=2, resolution=128
        )
    assert s2.plan.mode == WEIGHTS and s2.state.global_step == 0
    [warning] = warnings_of(caplog, "continuing from the weights of")
    assert "settings changed (batch_size: checkpoint 4 -> now 2; " in warning
    assert "resolution: checkpoint 64 -> now 128" in warning
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 4 -> now 2.*--resume_ckpt findlast"):
        start_from(chained, project_name="ch", seed=-1, resume_ckpt=str(first.checkpoints[-1]), batch_size=2)


def test_findlast_without_a_checkpoint_of_the_project_takes_the_logdirs_newest(chained, caplog):
    """EveryDream2 searches the whole logdir (chains often rename the project)."""
    _, first, _ = chained
    with caplog.at_level(logging.INFO):
        s2 = start_from(chained, project_name="ch1", resume_ckpt="findlast")
    assert s2.plan.mode == WEIGHTS and s2.plan.checkpoint.path == first.checkpoints[-1]
    assert warnings_of(caplog, "project 'ch1' has no checkpoint under")
    assert "it belongs to project 'ch', not 'ch1'" in warnings_of(caplog, "continuing from the weights")[0]


def test_a_resume_that_changes_the_run_length_shows_the_schedule_horizon_in_the_change_table(chained, caplog):
    with caplog.at_level(logging.WARNING):  # the first run had 2 steps: cosine decay int(1.5 x 2) = 3
        s2 = start_from(chained, project_name="ch", seed=-1, resume_ckpt="findlast", max_epochs=2)
    assert s2.plan.mode == EXACT
    [table] = warnings_of(caplog, "settings differ from the checkpoint's")
    before, after = 1e-4 * 0.5 * (1 + math.cos(math.pi / 3)), 1e-4 * 0.5 * (1 + math.cos(math.pi / 6))
    for component in ("unet", "text_encoder"):
        assert re.search(rf"\n  {component} +decay steps +3 -> 6\n", table)
        assert re.search(rf"\n  {component} +lr at step 1 +{before:.6g} -> {after:.6g}\n", table)
    assert re.search(r"\n  run +total optimizer steps +2 -> 4", table)
    assert re.search(r"\n  run +max_epochs +1 -> 2", table)
