"""The checkpoint directory store: atomic writes, manifests, retention, findlast."""

from __future__ import annotations

import json
import time

import pytest

from trainer.checkpointing.store import (
    MANIFEST,
    apply_retention,
    find_last,
    list_checkpoints,
    open_checkpoint,
    write_checkpoint,
)
from trainer.runtime.errors import CheckpointError


def save(ckpts, step, *, resumable=True):
    def write(tmp):
        (tmp / "weights.bin").write_bytes(b"x" * step)
        if resumable:
            (tmp / "training_state.pt").write_bytes(b"state")

    return write_checkpoint(ckpts, f"p-ep000-gs{step:06d}", write, {"global_step": step, "epoch": 0})


def test_manifest_lists_files_and_is_required(tmp_path):
    ckpts = tmp_path / "p-20260101-000000" / "checkpoints"
    path = save(ckpts, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["files"] == {"training_state.pt": 5, "weights.bin": 3}
    (ckpts / ".tmp-p-ep000-gs000009").mkdir()  # an interrupted save
    (ckpts / "no-manifest").mkdir()
    assert [c.step for c in list_checkpoints(ckpts)] == [3]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        open_checkpoint(ckpts / "no-manifest")


def test_damaged_checkpoint_is_refused(tmp_path):
    path = save(tmp_path / "c", 4)
    (path / "weights.bin").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="damaged: 'weights.bin'"):
        open_checkpoint(path)


def test_retention_keeps_the_newest(tmp_path):
    ckpts = tmp_path / "c"
    for step in (1, 2, 3, 4):
        save(ckpts, step)
    removed = apply_retention(ckpts, 2)
    assert [p.name for p in removed] == ["p-ep000-gs000001", "p-ep000-gs000002"]
    assert [c.step for c in list_checkpoints(ckpts)] == [3, 4]
    assert apply_retention(ckpts, None) == []


def test_findlast_picks_the_newest_of_the_project_resumable_or_not(tmp_path):
    save(tmp_path / "proj-20260101-000000" / "checkpoints", 5)
    time.sleep(0.01)
    save(tmp_path / "proj-20260102-000000" / "checkpoints", 2)
    time.sleep(0.01)
    save(tmp_path / "proj-20260103-000000" / "checkpoints", 9, resumable=False)
    save(tmp_path / "proj-extra-20260104-000000" / "checkpoints", 50)
    last = find_last(tmp_path, "proj")
    # EveryDream2's findlast means the latest weights; an older resumable one would drop training
    assert last.step == 9 and last.path.parent.parent.name == "proj-20260103-000000"
    assert not last.resumable
    assert find_last(tmp_path, "proj-extra").step == 50
