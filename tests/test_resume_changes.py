"""Resume with changed settings (issue 29): what may change on an exact resume is applied.

A run stopped at step 2 (resumable checkpoint) is continued with another LR, schedule, run
length or optimizer hyper-parameters: the first update after the resume uses the new values
(param groups, TensorBoard `lr/...`), the schedule continues at its step from the new base, the
optimizer's moments (and D-Adaptation's d) are the checkpoint's, and one change table says
old -> new. Settings that cannot change stay refused (docs/CHECKPOINTS.md).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, base_args, copy_images, scalars
from trainer.checkpointing.store import TRAINING_STATE, load_training_state
from trainer.config import load_config
from trainer.run.loop import train
from trainer.run.session import build_session
from trainer.runtime.errors import CheckpointError

# 8 images at batch 4: 2 optimizer steps per epoch; 64 px and plain AdamW keep each run ~1-2 s.
RUN = dict(
    resolution=64,
    batch_size=4,
    max_epochs=2,
    lr=1e-3,
    no_save_ckpt=True,
    cond_dropout=0.0,
    project_name="rc",
)
OLD_LR, NEW_LR = 1e-3, 5e-4
HEADER = "settings differ from the checkpoint's"  # the change table's first line


def opt_file(tmp_path, tag: str, **base) -> str:
    """optimizer.json for both components (the text encoder copies the train lr)."""
    path = tmp_path / f"optimizer-{tag}.json"
    spec = {"optimizer": "adamw", "lr_scheduler": "constant", "lr_warmup_steps": 0, **base}
    path.write_text(json.dumps({"base": spec, "text_encoder_overrides": None}))
    return str(path)


def start(tmp_path, data, **overrides):
    """A built session (the run's start, nothing trained yet) with its logdir in `tmp_path`; the
    caller closes it."""
    values = {**RUN, "data_root": str(data), "optimizer_config": opt_file(tmp_path, "plain"), **overrides}
    return build_session(load_config(str(ROOT / "train.json"), base_args(tmp_path, **values)))


def run(session):
    try:
        return train(session)
    finally:
        session.close()


def first_run(tmp_path_factory, name: str, **overrides) -> Path:
    """Two optimizer steps of a 4-step run, then a resumable checkpoint; returns its folder
    (the tests copy the run's logdir and resume the copy)."""
    tmp_path = tmp_path_factory.mktemp(name)
    data = copy_images(tmp_path / "data", 8)
    summary = run(start(tmp_path, data, stop_at_step=2, **overrides))
    assert summary.status == "stop_at_step" and summary.global_step == 2
    return tmp_path


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return first_run(tmp_path_factory, "plain")


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    return first_run(tmp_path_factory, "fused", fused_back_pass=True)


@pytest.fixture(scope="module")
def dadapt(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("dadapt-opt")
    return first_run(
        tmp_path_factory, "dadapt", lr=None, optimizer_config=opt_file(tmp_path, "d", optimizer="dadapt_adam")
    )


class Stopped:
    """A copy of a first run's logdir in the test's own folder, resumed from there."""

    def __init__(self, first: Path, tmp_path: Path):
        shutil.copytree(first / "logs", tmp_path / "logs")
        self.tmp_path, self.data = tmp_path, first / "data"
        [self.checkpoint] = list((tmp_path / "logs").glob("*/checkpoints/*"))

    def start(self, **overrides):
        return start(self.tmp_path, self.data, **overrides)

    def resume(self, **overrides):
        session = self.start(resume_ckpt="findlast", **overrides)
        assert session.resumed_from == self.checkpoint and session.state.global_step == 2
        return session

    def opt_file(self, tag: str, **base) -> str:
        return opt_file(self.tmp_path, tag, **base)


def table_rows(text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The change table's rows, (scope, setting) -> (old, new), from a log text."""
    assert text.count(HEADER) == 1, f"expected one change table in:\n{text}"
    lines = text.split(HEADER, 1)[1].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.startswith("  "):
            break
        scope, setting, change = re.split(r"\s{2,}", line.strip())
        old, new = change.split(" -> ")
        rows[(scope, setting)] = (old, new)
    return rows


def groups(session) -> list[dict]:
    return [g for opt in session.optim.torch_optimizers() for g in opt.param_groups]


def saved_optimizer_state(checkpoint, component: str) -> dict:
    return load_training_state(checkpoint / TRAINING_STATE)["optimizers"]["components"][component][
        "optimizer"
    ]


def logged_lrs(session, tag: str) -> dict[int, float]:
    return dict(scalars(session.run.path, tag))


def lrs(by_step: dict[int, float]):
    """Expected LRs by step, to TensorBoard's float32 precision."""
    return pytest.approx(by_step, rel=1e-6)


def cosine(step: int, decay: int) -> float:
    """diffusers' cosine without warmup: half a cycle from 1 to 0 over `decay` steps."""
    return 0.5 * (1.0 + math.cos(math.pi * step / decay))


def test_a_new_constant_lr_is_what_the_resumed_run_trains_with(plain, tmp_path):
    session = Stopped(plain, tmp_path).resume(lr=NEW_LR)
    # before the first step after the resume: every param group, and what the loop reads
    assert {g["lr"] for g in groups(session)} == {NEW_LR}
    assert session.optim.nominal_learning_rates() == {"unet": NEW_LR, "text_encoder": NEW_LR}
    assert all(s.base_lrs == [NEW_LR] for s in session.optim.lr_schedulers().values())
    assert json.loads((session.run.path / "train_effective.json").read_text())["lr"] == NEW_LR
    summary = run(session)
    assert summary.global_step == 4
    for tag in ("lr/unet", "lr/text_encoder"):
        assert logged_lrs(session, tag) == lrs({1: OLD_LR, 2: OLD_LR, 3: NEW_LR, 4: NEW_LR})


def test_a_new_cosine_schedule_and_run_length_continue_at_the_step_from_the_new_base(plain, tmp_path):
    stopped = Stopped(plain, tmp_path)
    cosine_opt = stopped.opt_file("cosine", lr_scheduler="cosine")
    session = stopped.resume(lr=NEW_LR, max_epochs=3, optimizer_config=cosine_opt)
    assert session.total_optimizer_steps == 6  # automatic decay: int(1.5 x 6) = 9 steps
    assert {g["lr"] for g in groups(session)} == {NEW_LR * cosine(2, 9)}
    run(session)
    expected = {1: OLD_LR, 2: OLD_LR} | {s: NEW_LR * cosine(s, 9) for s in range(3, 7)}
    for tag in ("lr/unet", "lr/text_encoder"):
        assert logged_lrs(session, tag) == lrs(expected)


def test_the_change_table_says_old_and_new_once(plain, tmp_path):
    stopped = Stopped(plain, tmp_path)
    cosine_opt = stopped.opt_file("cosine", lr_scheduler="cosine", weight_decay=0.05)
    session = stopped.resume(lr=NEW_LR, max_epochs=4, sample_steps=3, optimizer_config=cosine_opt)
    session.close()
    rows = table_rows((session.run.path / "train.log").read_text())
    for component in ("unet", "text_encoder"):
        assert rows[(component, "lr")] == ("0.001", "0.0005")
        assert rows[(component, "scheduler")] == ("constant", "cosine")
        assert rows[(component, "decay steps")] == ("6", "12")  # automatic: 1.5 x the run's steps
        assert rows[(component, "weight decay")] == ("0.01", "0.05")  # AdamW's default before
        assert rows[(component, "lr at step 2")] == ("0.001", f"{NEW_LR * cosine(2, 12):.6g}")
        assert (component, "warmup steps") not in rows and (component, "betas") not in rows
    assert rows[("run", "max_epochs")] == ("2", "4")
    assert rows[("run", "total optimizer steps")] == ("4", "8")
    assert rows[("run", "sample_steps")] == ("100", "3")
    assert len(rows) == 2 * 5 + 3


def test_nothing_is_printed_when_nothing_changed_and_what_is_not_known_is_named(plain, tmp_path):
    stopped = Stopped(plain, tmp_path)
    session = stopped.resume()
    session.close()
    train_log = session.run.path / "train.log"
    assert HEADER not in train_log.read_text() and "resume: " not in train_log.read_text()
    # That session rewrote train_effective.json: the checkpoint's run-level settings are unknown now.
    stopped.resume(lr=NEW_LR, max_epochs=4).close()
    text = train_log.read_text()
    rows = table_rows(text)
    assert rows[("unet", "lr")] == ("0.001", "0.0005")
    assert rows[("run", "total optimizer steps")] == ("4", "8")  # from the checkpoint's schedule record
    assert ("run", "max_epochs") not in rows
    assert "note: run-level settings of the checkpoint (max_epochs, " in text
    assert "train_effective.json is not the configuration this checkpoint was saved with" in text


def test_optimizer_moments_survive_and_new_hyper_parameters_apply(plain, tmp_path):
    stopped = Stopped(plain, tmp_path)
    new_opt = stopped.opt_file("hyper", betas=[0.8, 0.95], epsilon=1e-6, weight_decay=0.05)
    session = stopped.resume(optimizer_config=new_opt)
    session.close()
    for group in groups(session):
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
        assert group["lr"] == OLD_LR
    for name, comp in session.optim.components.items():
        saved = saved_optimizer_state(stopped.checkpoint, name)["state"]
        assert len(saved) == len(comp.params) > 0
        for index, param in enumerate(comp.params):
            live = comp.optimizer.state[param]
            assert live.keys() == saved[index].keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(live[k], saved[index][k]) for k in live)
    rows = table_rows((session.run.path / "train.log").read_text())
    assert rows[("unet", "betas")] == ("(0.9, 0.999)", "(0.8, 0.95)")
    assert rows[("unet", "eps")] == ("1e-08", "1e-06")


def test_an_adaptive_optimizer_keeps_its_step_size_estimate_under_a_new_lr(dadapt, tmp_path):
    stopped = Stopped(dadapt, tmp_path)
    saved_group = saved_optimizer_state(stopped.checkpoint, "unet")["param_groups"][0]
    assert saved_group["d"] != 1e-6  # D-Adaptation moved d from d0 in two steps
    session = stopped.resume(lr=0.5, optimizer_config=stopped.opt_file("d", optimizer="dadapt_adam"))
    session.close()
    group = session.optim.components["unet"].optimizer.param_groups[0]
    assert group["lr"] == 0.5
    assert (group["d"], group["k"]) == (saved_group["d"], saved_group["k"])


def test_the_fused_back_pass_applies_a_new_lr_too(fused, tmp_path):
    stopped = Stopped(fused, tmp_path)
    session = stopped.resume(fused_back_pass=True, lr=NEW_LR)
    per_parameter = session.optim.fused["unet"]
    assert {g["lr"] for g in groups(session)} == {NEW_LR}
    assert {s.base_lrs[0] for s in per_parameter.schedulers} == {NEW_LR}
    assert {s.last_epoch for s in per_parameter.schedulers} == {2}
    saved = load_training_state(stopped.checkpoint / TRAINING_STATE)["optimizers"]["fused"]["unet"]
    for name, opt, param in zip(
        per_parameter.names, per_parameter.optimizers, per_parameter.params, strict=True
    ):
        live, kept = opt.state[param], saved["params"][name]["optimizer"]["state"][0]
        assert live.keys() == kept.keys() and all(torch.equal(live[k], v) for k, v in kept.items())
    run(session)
    assert logged_lrs(session, "lr/unet") == lrs({1: OLD_LR, 2: OLD_LR, 3: NEW_LR, 4: NEW_LR})
    rows = table_rows((session.run.path / "train.log").read_text())
    assert rows[("unet", "lr")] == ("0.001", "0.0005")


def test_settings_that_cannot_change_are_still_refused_by_name(plain, tmp_path):
    stopped = Stopped(plain, tmp_path)
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 4 -> now 2"):
        stopped.start(resume_ckpt=str(stopped.checkpoint), batch_size=2)
    amsgrad = stopped.opt_file("amsgrad", amsgrad=True)
    with pytest.raises(
        CheckpointError, match=r"unet: option 'amsgrad' was False in the checkpoint and is True now"
    ):
        stopped.start(resume_ckpt=str(stopped.checkpoint), optimizer_config=amsgrad)


def test_a_checkpoint_without_a_schedule_record_still_resumes_and_says_what_it_cannot_compare(
    plain, tmp_path
):
    """Older checkpoints have no horizon (schedule) record: the LR rows still come from the
    saved scheduler state, and the notes say what could not be compared."""
    from trainer.checkpointing.resume_changes import collect_changes

    stopped = Stopped(plain, tmp_path)
    session = stopped.resume(lr=NEW_LR)
    session.close()
    state = load_training_state(stopped.checkpoint / TRAINING_STATE)
    del state["horizon"]
    changes = collect_changes(state, session.optim, session.cfg, session.total_optimizer_steps, None)
    rows = {(c.scope, c.setting): (c.old, c.new) for c in changes.rows}
    assert rows[("unet", "lr")] == ("0.001", "0.0005")
    assert rows[("unet", "lr at step 2")] == ("0.001", "0.0005")
    assert any("schedule" in note for note in changes.notes)
    assert any("run-level" in note for note in changes.notes)
    assert all(note in changes.render() for note in changes.notes)
