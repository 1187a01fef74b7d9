"""The run folder: `<logdir>/<project_name>-<YYYYmmdd-HHMMSS>/` and what is written into it.

It holds the effective configs, the log file, TensorBoard events, samples and `checkpoints/`.
A resumed run keeps writing into the folder of the checkpoint it resumed from, so its
TensorBoard curves continue in place.

One process at a time writes a run folder: its rank 0 holds `run.lock` (`RunLock`) from before
the first write until the session closes, and a second process is refused (`RunFolderInUse`,
naming the holder). Two runs in one folder would delete each other's partial checkpoints and
replace each other's finished ones.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import logging.handlers
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.runtime.errors import CheckpointError, RunFolderInUse, TrainerError

log = logging.getLogger(__name__)

LOG_FILE = "train.log"
LOCK_FILE = "run.lock"


class RunLock:
    """An exclusive advisory lock (`flock`) on `<run>/run.lock`, held by the one process that
    writes the run folder.

    flock, not a PID file: the kernel drops the lock when its holder dies, however it dies
    (`kill -9` included), so a crash never leaves a folder locked. The file's content (pid, host,
    since when) only names the holder in the refusal; the file staying behind means nothing.
    Forked children (data-loader workers) close their copy of the descriptor: a flock belongs to
    the open file, which fork shares, so a worker outliving a killed trainer by the few seconds
    it takes to notice would otherwise keep the folder locked.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: Path) -> RunLock | None:
        """Lock `folder` or raise `RunFolderInUse`. None (with a warning) where the filesystem
        has no locks: training goes on, unprotected, and the log says so."""
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderInUse(
                f"run folder {folder} is in use by {holder} (lock file {path}). Two runs writing one folder "
                "delete each other's partial checkpoints and replace each other's finished ones. Wait for that "
                "run to end or stop it (Ctrl-C saves and stops it), then start this one again."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            log.warning(
                "cannot lock run folder %s (%s): this filesystem has no file locks, so nothing stops a second "
                "process from writing into this folder while this run trains",
                folder,
                exc,
            )
            return None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0
        )
        _HELD_FDS.add(fd)
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (idempotent); also done by the kernel when the process ends."""
        if self._fd is not None and self._fd in _HELD_FDS:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)
        self._fd = None


# What flock fails with on filesystems without locks (some network and FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

# This process's lock descriptors. Process-wide on purpose: a fork copies every descriptor, and
# only a fork hook (registered once) can close them in the child.
_HELD_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _HELD_FDS:
        os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def _holder(fd: int) -> str:
    """Who holds the lock, from the lock file (empty while the holder is between truncating and
    writing it)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except json.JSONDecodeError:
        info = {}
    if "pid" not in info:
        return "another process"
    mine = info["pid"] == os.getpid() and info.get("host") == socket.gethostname()
    this = " (this process: close the other session on this folder first)" if mine else ""
    return f"process {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}{this}"


@dataclass(frozen=True)
class RunFolder:
    path: Path
    lock: RunLock | None = field(default=None, compare=False, repr=False)  # rank 0's, while it writes here

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def name(self) -> str:
        return self.path.name


def new_run_folder(logdir: str | Path, project_name: str) -> RunFolder:
    """Create a fresh timestamped run folder (waits a second rather than reuse a name), locked."""
    root = Path(logdir)
    while True:
        path = root / f"{project_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            path.mkdir(parents=True)
            return lock_run_folder(RunFolder(path))
        except FileExistsError:
            time.sleep(1.0)


def run_folder_of_checkpoint(checkpoint_dir: Path) -> RunFolder:
    """A checkpoint lives in `<run>/checkpoints/<name>`."""
    return RunFolder(Path(checkpoint_dir).resolve().parent.parent)


def lock_run_folder(run: RunFolder) -> RunFolder:
    """The folder with this process's lock on it, or `RunFolderInUse`."""
    return replace(run, lock=RunLock.acquire(run.path))


def lock_resumed_folder(run: RunFolder, checkpoint: Any, *, findlast: bool) -> RunFolder:
    """Lock the folder of the checkpoint an exact resume restored (`checkpoint`: its
    `CheckpointInfo`). With `findlast`, also refuse a folder that moved on since the checkpoint
    was chosen: two `findlast` started together both pick the same newest checkpoint, and the one
    that locks second must not resume it after the first saved newer ones (its saves would
    replace them). An explicit checkpoint path may go back to an older checkpoint on purpose."""
    locked = lock_run_folder(run)
    if findlast:
        try:
            _refuse_if_moved_on(run, checkpoint)
        except CheckpointError:
            if locked.lock is not None:
                locked.lock.release()
            raise
    return locked


def _refuse_if_moved_on(run: RunFolder, checkpoint: Any) -> None:
    # The store pulls in torch; the lock itself needs only the standard library.
    from trainer.checkpointing.store import list_checkpoints

    created = checkpoint.manifest.get("created", 0)
    newer = [c for c in list_checkpoints(run.checkpoints) if c.manifest.get("created", 0) > created]
    if newer or not checkpoint.path.is_dir():
        latest = max(newer, key=lambda c: c.manifest.get("created", 0)) if newer else None
        what = f"saved {latest.path} (step {latest.step})" if latest else "removed it (retention)"
        raise CheckpointError(
            f"resume_ckpt findlast chose {checkpoint.path} (step {checkpoint.step}), but while this run loaded it "
            f"another run in the same folder {what}. Resuming the older checkpoint there would replace that run's "
            "checkpoints. Start again with --resume_ckpt findlast to continue from the newest one."
        )


def claim_run_folder(accelerator: Any, take: Callable[[], RunFolder]) -> RunFolder:
    """Rank 0 takes the run folder (`take` creates or locks it); every rank returns it, or every
    rank raises rank 0's refusal (a rank left waiting would hang the launch)."""
    run, error = None, None
    if accelerator.is_main_process:
        try:
            run = take()
        except TrainerError as exc:
            error = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = None if error is None else (type(error).__name__, str(error))
        holder = [(None if run is None else str(run.path), message)]
        broadcast_object_list(holder, from_process=0)
        path, message = holder[0]
        if error is None and message is not None:
            error = {"RunFolderInUse": RunFolderInUse, "CheckpointError": CheckpointError}.get(
                message[0], TrainerError
            )(message[1])
        run = run or (RunFolder(Path(path)) if path is not None else None)
    if error is not None:
        raise error
    assert run is not None  # rank 0 took it or raised; the others got its path
    return run


class RunLogHandler(logging.FileHandler):
    """`<run>/train.log`'s handler, which also holds the run folder's lock: the process that
    writes the run's log is the one that owns the folder, and both end together when the handler
    closes (`Session.close`, or a start-up that failed after the folder was taken)."""

    def __init__(self, path: Path, lock: RunLock | None) -> None:
        super().__init__(path, encoding="utf-8")
        self.run_lock = lock  # not `lock`: logging.Handler's own thread lock has that name

    def close(self) -> None:
        super().close()
        if self.run_lock is not None:
            self.run_lock.release()


def attach_file_log(run: RunFolder) -> logging.Handler:
    """Mirror all log records into `<run>/train.log` (appending across resumes)."""
    handler = RunLogHandler(run.path / LOG_FILE, run.lock)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


class StartupLog:
    """Holds what is logged before the run folder exists, for its train.log.

    The run folder is created only once everything that can fail on bad input has passed, so an
    early error leaves no empty run; the start-up lines logged until then (model, data,
    optimizer table) still open the run's train.log. `attach` or `discard` ends the buffering.
    """

    def __init__(self) -> None:
        self._buffer = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.file_handler: logging.Handler | None = None
        logging.getLogger().addHandler(self._buffer)

    def attach(self, run: RunFolder) -> logging.Handler:
        """Start `<run>/train.log` with the buffered records; returns its handler."""
        self.file_handler = attach_file_log(run)
        self._buffer.setTarget(self.file_handler)
        self.discard()
        return self.file_handler

    def detach_file(self) -> None:
        """For a start-up that failed after the run folder existed: stop writing its train.log."""
        if self.file_handler is not None:
            logging.getLogger().removeHandler(self.file_handler)
            self.file_handler.close()

    def discard(self) -> None:
        logging.getLogger().removeHandler(self._buffer)
        self._buffer.close()  # flushes into the target, if attached


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
