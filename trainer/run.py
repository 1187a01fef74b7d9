"""The run folder: `<logdir>/<project_name>-<YYYYmmdd-HHMMSS>/` and what is written into it.

It holds the effective configs, the log file, TensorBoard events, samples and `checkpoints/`.
A resumed run keeps writing into the folder of the checkpoint it resumed from, so its
TensorBoard curves continue in place.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from dataclasses import dataclass
from pathlib import Path

LOG_FILE = "train.log"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    @property
    def name(self) -> str:
        return self.path.name


def new_run_folder(logdir: str | Path, project_name: str) -> RunFolder:
    """Create a fresh timestamped run folder (waits a second rather than reuse a name)."""
    root = Path(logdir)
    while True:
        path = root / f"{project_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            path.mkdir(parents=True)
            return RunFolder(path)
        except FileExistsError:
            time.sleep(1.0)


def run_folder_of_checkpoint(checkpoint_dir: Path) -> RunFolder:
    """A checkpoint lives in `<run>/checkpoints/<name>`."""
    return RunFolder(Path(checkpoint_dir).resolve().parent.parent)


def attach_file_log(run: RunFolder) -> logging.Handler:
    """Mirror all log records into `<run>/train.log` (appending across resumes)."""
    handler = logging.FileHandler(run.path / LOG_FILE, encoding="utf-8")
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
