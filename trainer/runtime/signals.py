"""Graceful stop: SIGINT / SIGTERM only set a flag; the loop saves at the next step boundary.

The handlers are installed only around a real run (`with StopFlag() as stop:` in the command,
trainer.cli) and the previous ones are put back afterwards, so code that calls `train()` in
process (tests, notebooks) keeps its own signal behaviour: `timeout` and Ctrl-C stop a test
session as usual. A second SIGINT or SIGTERM ends the run at once without a save (StopNow);
the previous checkpoint stays loadable, since every save is atomic.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

log = logging.getLogger(__name__)

# What `signal.signal` returns and accepts: a handler function, SIG_DFL / SIG_IGN, or None (a
# handler not installed from Python). A handler's return value is ignored.
SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(KeyboardInterrupt):
    """A second stop signal: leave now, without saving. A KeyboardInterrupt, so code that
    cleans up on Ctrl-C cleans up on this too."""


class StopFlag:
    """`requested` names why the run should stop (a signal name, or set by the loop)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, SignalHandler] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. under some test runners)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.restore()
            log.error(
                "second stop signal (%s): stopping now without saving; the last checkpoint is kept", name
            )
            raise StopNow(name)
        self.requested = name
        log.warning(
            "%s received: will save a resumable checkpoint after the current step and stop "
            "(send it again to stop at once without saving)",
            name,
        )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *_exc) -> None:
        self.restore()
