"""The folder store: atomic checkpoint directories, `findlast`, retention. Knows nothing about what a UNet is.

A checkpoint is one directory under `<run>/checkpoints/`. It is written under a hidden temporary
name, its `manifest.json` (format version, step, epoch, config hash, every file with its size) is
written last, and only then is it renamed into place. A directory without a valid manifest, or
whose files do not match the manifest, is never loaded, so a `kill -9` at any moment leaves the
previous checkpoint as the newest loadable one.

A save that fails on the filesystem (disk full, quota, I/O error) removes its partial folder
(on a full disk it holds the space the user needs back) and raises `CheckpointWriteError`,
which names the last intact checkpoint, the space needed and free, and how to resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from shutil import disk_usage

import torch
from safetensors import SafetensorError

from trainer.runtime.errors import CheckpointError, CheckpointWriteError

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
    """Write a checkpoint atomically: `write_fn(tmp_dir)` fills it, then manifest, then rename.

    Any failure removes the temporary folder. A filesystem failure (an `OSError`, or one that a
    writer library wraps: safetensors, torch.save) becomes a `CheckpointWriteError`; anything
    else is a bug and propagates as it is."""
    free_before = _free_bytes(checkpoints_dir)
    tmp = checkpoints_dir / f"{_TMP_PREFIX}{name}"
    try:
        return _write_atomically(checkpoints_dir, tmp, name, write_fn, manifest)
    except BaseException as exc:
        written = _tree_bytes(tmp)
        removal_error = _remove_partial(tmp)
        code = storage_errno(exc) if isinstance(exc, Exception) else None  # not for Ctrl-C
        if code is None:
            raise
        raise CheckpointWriteError(
            write_failure_message(
                checkpoints_dir,
                name,
                manifest.get("global_step"),
                exc,
                code,
                written,
                free_before,
                removal_error,
            )
        ) from exc


def _write_atomically(
    checkpoints_dir: Path, tmp: Path, name: str, write_fn: Callable[[Path], None], manifest: dict
) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
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


# safetensors' writer reports an OS error only in its message: "... I/O error: No space left on
# device (os error 28)".
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def storage_errno(exc: BaseException) -> int | None:
    """The errno of the filesystem failure behind `exc`, or None when it is not one.

    Looks through the exception's chain: torch.save to a file object raises a RuntimeError whose
    context is the OSError from the write; safetensors raises a SafetensorError that names the
    OS error in its message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        if isinstance(current, SafetensorError) and (found := _OS_ERROR_IN_MESSAGE.search(str(current))):
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def write_failure_message(
    checkpoints_dir: Path,
    name: str,
    step: int | None,
    exc: BaseException,
    code: int,
    written: int,
    free_before: int | None,
    removal_error: str | None,
) -> str:
    """One paragraph: what failed, that the partial folder is gone, the last intact checkpoint,
    the space needed and free, and how to continue."""
    at_step = f" at step {step}" if step is not None else ""
    intact = newest_checkpoint(checkpoints_dir)
    removed = (
        f"its partial folder could not be removed ({removal_error}): delete {checkpoints_dir / (_TMP_PREFIX + name)}"
        if removal_error
        else "its partial folder was removed"
    )
    if intact is not None:
        last = f"The last intact checkpoint is {intact.path} (step {intact.step})"
        needed = f"about {format_bytes(checkpoint_bytes(intact))} (the size of that checkpoint)"
        resume = "then continue from it with --resume_ckpt findlast"
    else:
        last = f"There is no complete checkpoint in {checkpoints_dir} yet"
        needed = "more than was written"
        resume = "then start the run again"
    free = (
        f"{format_bytes(free_before)} were free" if free_before is not None else "the free space is unknown"
    )
    error = str(exc) if isinstance(exc, OSError) else f"{os.strerror(code)} ({type(exc).__name__}: {exc})"
    return (
        f"could not write checkpoint {name}{at_step}: {error}; {removed}. "
        f"{last}. The save needs {needed}; {format_bytes(written)} were written before it failed, and "
        f"{free} on that disk when it started ({format_bytes(_free_bytes(checkpoints_dir) or 0)} now). "
        f"Free some space (keep_last_checkpoints and no_save_ckpt make checkpoints take less), "
        f"{resume}. The training state in memory is unchanged, but this run stops here."
    )


def space_shortfall(checkpoints_dir: Path) -> tuple[int, int] | None:
    """(bytes the next save will need, bytes free) when the newest checkpoint here is larger
    than the free space on its disk; None when it fits or there is nothing to compare with."""
    newest = newest_checkpoint(checkpoints_dir)
    if newest is None:
        return None
    needed, free = checkpoint_bytes(newest), _free_bytes(checkpoints_dir)
    return (needed, free) if free is not None and free < needed else None


def newest_checkpoint(checkpoints_dir: Path) -> CheckpointInfo | None:
    """The most recently created complete checkpoint in this folder, as `find_last` ranks them."""
    found = list_checkpoints(checkpoints_dir)
    return _newest(found) if found else None


def checkpoint_bytes(info: CheckpointInfo) -> int:
    """A checkpoint's size: its files as the manifest lists them."""
    return sum(int(size) for size in info.manifest.get("files", {}).values())


def format_bytes(n: int) -> str:
    if n < 2**20:
        return f"{n} bytes"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return disk_usage(candidate).free
    return None


def _tree_bytes(root: Path) -> int:
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _remove_partial(tmp: Path) -> str | None:
    """Remove a failed save's temporary folder; the error text if that fails too (reported in
    the message, never dropped)."""
    if not tmp.exists():
        return None
    try:
        shutil.rmtree(tmp)
    except OSError as exc:
        log.error("could not remove the partial checkpoint folder %s: %s", tmp, exc)
        return str(exc)
    return None


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
    own: list[CheckpointInfo] = []
    others: list[CheckpointInfo] = []
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
    """Through a Python file object: a failed write then surfaces as the OSError behind torch's
    RuntimeError (`storage_errno` finds it), where a path gives only "unexpected pos"."""
    with open(path, "wb") as fh:
        torch.save(state, fh)


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
