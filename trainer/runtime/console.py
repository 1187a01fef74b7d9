"""What the console shows: known-harmless library warnings hidden, repeated warnings summarised,
log lines printed around the progress bar rather than through it.

Hiding is by exact message (logger name + a pattern of the whole message), never by logger or
level, so a library's other warnings still show. Each entry says why it is harmless here.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter

# (logger name, full-message pattern, why it is harmless for this trainer)
KNOWN_HARMLESS = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community: .*",
        "an optional CPU kernel for 4-bit inference; training uses bitsandbytes' 8-bit optimizers only",
    ),
    (
        "kernels._internals.hf_hub",
        r"Skipping publisher trust check for 'kernels-community/[\w.-]+' because Hugging Face Hub is in "
        r"offline mode\.",
        "the same optional kernel, asked for while the trainer keeps the Hub offline (trainer/__init__.py)",
    ),
    (
        "transformers.utils.import_utils",
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
        r" for backward compatibility\..*",
        "the pipelines' image processors (safety checker input) are never used in training",
    ),
)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.fullmatch(record.getMessage()) is None


def hide_known_harmless_warnings() -> None:
    """Install the KNOWN_HARMLESS filters (idempotent). Call before the libraries are imported."""
    for name, pattern, _why in KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageFilter) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_MessageFilter(pattern))


class RepeatLimiter(logging.Filter):
    """Let the first `keep` records of each message template through; count the rest.

    For commands that may meet thousands of similar warnings (one per image): the console shows
    a few of each kind and `summary()` says how many more there were.
    """

    def __init__(self, keep: int = 3):
        super().__init__()
        self.keep = keep
        self.seen: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        self.seen[key] += 1
        return self.seen[key] <= self.keep

    def summary(self) -> list[str]:
        return [
            f"... {n - self.keep} more warnings like: {template}"
            for (_name, template), n in self.seen.items()
            if n > self.keep
        ]


@contextlib.contextmanager
def progress_safe_logging():
    """Route console log lines through tqdm while a progress bar is live, so a line printed
    mid-run does not leave a broken half-drawn bar behind it (tqdm's own helper); and hide
    transformers' own bars meanwhile ("Writing model shards" at every save), which would draw
    over the training bar. Both are put back afterwards."""
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
