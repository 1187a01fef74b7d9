"""Value objects shared by the data pipeline: one image's settings, and one reported problem.

Discovery (`discovery.py`) produces these; bucketing, batching and transforms consume them.
They are frozen so that a plan built from them cannot drift while a run is in progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BATCH_ID = "default_batch"


@dataclass(frozen=True)
class CaptionSpec:
    """A caption as EveryDream2 models it: a main prompt plus optional weighted tags.

    The text used for training is `main_prompt, tag1, tag2, ...`; tags may be shuffled per
    epoch (keeping the first `keep_tags` in place) and, when weighted, sampled by weight up to
    `max_caption_length` characters.
    """

    main_prompt: str
    tags: tuple[tuple[str, float], ...] = ()
    max_caption_length: int = 2048

    @property
    def text(self) -> str:
        """The unshuffled caption text."""
        return ", ".join([self.main_prompt, *(t for t, _ in self.tags)]) if self.tags else self.main_prompt


@dataclass(frozen=True)
class ImageItem:
    """One trainable image and its merged settings (global < local < per-image).

    `width` / `height` are the displayed size, i.e. after EXIF orientation. Settings left as
    None fall back to the train.json value at batch time (so `flip_p` from train.json and
    from folders both work).
    """

    path: str
    width: int
    height: int
    caption: CaptionSpec
    multiply: float = 1.0
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None
    loss_scale: float = 1.0
    batch_id: str = DEFAULT_BATCH_ID
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Problem:
    """A file that was skipped, with the reason, reported at start-up and in the run summary."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
