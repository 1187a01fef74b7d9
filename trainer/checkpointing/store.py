"""The folder store: atomic checkpoint directories, `findlast`, retention. Knows nothing about what a UNet is.

A checkpoint is one directory under `<run>/checkpoints/`. It is written under a hidden temporary
name, its `manifest.json` (format version, step, epoch, config hash, every file with its size) is
written last, and only then is it renamed into place. A directory without a valid manifest, or
whose files do not match the manifest, is never loaded, so a `kill -9` at any moment leaves the
previous checkpoint as the newest loadable one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["global_step"])

    @property
    def resumable(self) -> bool:
        return TRAINING_STATE in self.manifest.get("files", {})


def write_checkpoint(
    checkpoints_dir: Path, name: str, write_fn: Callable[[Path], None], manifest: dict
) -> Path:
    """Write a checkpoint atomically: `write_fn(tmp_dir)` fills it, then manifest, then rename."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints_dir / f"{_TMP_PREFIX}{name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a killed save of the same name; never a complete checkpoint
    tmp.mkdir()
    write_fn(tmp)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    full_manifest = {**manifest, "format_version": FORMAT_VERSION, "created": time.time(), "files": files}
    _fsync_tree(tmp)
    manifest_tmp = tmp / (MANIFEST + ".partial")
    manifest_tmp.write_text(json.dumps(full_manifest, indent=2, sort_keys=True))
    _fsync_file(manifest_tmp)
    os.replace(manifest_tmp, tmp / MANIFEST)
    final = checkpoints_dir / name
    if final.exists():
        # Same name means same step: e.g. a resumed run saving again at the step it resumed from.
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    return final


def open_checkpoint(path: Path) -> CheckpointInfo:
    """Validate a checkpoint directory. Raises CheckpointError saying what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"'{path}' is not a complete checkpoint (no {MANIFEST}); it was probably interrupted "
            "while saving. Use an earlier checkpoint or --resume_ckpt findlast."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format {manifest.get('format_version')} is not supported "
            f"(this trainer reads format {FORMAT_VERSION})"
        )
    for rel, size in manifest.get("files", {}).items():
        file = path / rel
        if not file.is_file() or file.stat().st_size != size:
            raise CheckpointError(f"checkpoint '{path}' is damaged: '{rel}' is missing or has the wrong size")
    return CheckpointInfo(path=path, manifest=manifest)


def list_checkpoints(checkpoints_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in a run's checkpoints folder, oldest first (by global step)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        if not child.is_dir() or child.name.startswith(_TMP_PREFIX) or not (child / MANIFEST).is_file():
            continue
        try:
            found.append(open_checkpoint(child))
        except CheckpointError as exc:
            log.warning("ignoring checkpoint: %s", exc)
    return sorted(found, key=lambda c: (c.step, c.manifest.get("created", 0)))


def find_last(logdir: Path, project_name: str) -> CheckpointInfo:
    """The newest complete checkpoint of `project_name` under `logdir`, resumable or not.

    The newest wins even when an older one holds training state: EveryDream2's `findlast` means
    "continue from the latest weights" (a chain's last run often had `save_optimizer: false`),
    and going back to an older resumable checkpoint would silently drop the latest training.
    When the project has none, the newest checkpoint of any project under `logdir` is used with
    a warning, as EveryDream2 searches the whole logdir (chains often rename the project).
    """
    logdir = Path(logdir)
    own, others = [], []
    for run_dir in logdir.glob("*-*"):
        project = _project_of(run_dir.name) if run_dir.is_dir() else None
        if project is not None:
            found = list_checkpoints(run_dir / "checkpoints")
            (own if project == project_name else others).extend(found)
    if own:
        return _newest(own)
    if not others:
        raise CheckpointError(
            f"resume_ckpt 'findlast': no complete checkpoint of project '{project_name}' nor of any other "
            f"project under '{logdir}'. Check project_name and logdir, or pass a model or checkpoint path."
        )
    chosen = _newest(others)
    log.warning(
        "findlast: project '%s' has no checkpoint under '%s'; using the newest checkpoint there, %s "
        "(project '%s'), as EveryDream2 does",
        project_name,
        logdir,
        chosen.path,
        chosen.manifest.get("project_name", _project_of(chosen.path.parent.parent.name)),
    )
    return chosen


def _newest(candidates: list[CheckpointInfo]) -> CheckpointInfo:
    return max(candidates, key=lambda c: (c.manifest.get("created", 0), c.step))


def _project_of(dirname: str) -> str | None:
    """'<project>-YYYYmmdd-HHMMSS' -> project; None for folders that are not run folders."""
    project = dirname[:-16]
    if len(dirname) > 16 and dirname[-16] == "-" and _is_run_of(dirname, project):
        return project
    return None


def _is_run_of(dirname: str, project_name: str) -> bool:
    """Run folders are '<project>-YYYYmmdd-HHMMSS'; avoid matching 'proj-extra-...' for 'proj'."""
    suffix = dirname[len(project_name) + 1 :]
    return len(suffix) == 15 and suffix[8] == "-" and suffix.replace("-", "").isdigit()


def apply_retention(checkpoints_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints. Run only after a save completed."""
    if keep_last is None:
        return []
    complete = list_checkpoints(checkpoints_dir)
    doomed = [c.path for c in complete[: max(0, len(complete) - max(1, keep_last))]]
    for path in doomed:
        # Remove the manifest first so a kill mid-delete leaves an ignored, not a damaged, dir.
        (path / MANIFEST).unlink()
        shutil.rmtree(path)
        log.info("retention: removed %s", path)
    return doomed


def save_training_state(path: Path, state: dict) -> None:
    torch.save(state, path)


def load_training_state(path: Path) -> dict:
    """Load with weights_only=True: a training state holds tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            _fsync_file(p)
    for d in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
        _fsync_dir(d)
