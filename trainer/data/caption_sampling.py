"""Batch-time captions: tag shuffling (with a working keep_tags), weighted tags, cond dropout.

Every function takes the per-sample `random.Random`, so each image gets its own permutation
(EveryDream2 seeded every image of an epoch with the same seed, so equal-length tag lists got
the same permutation) and the result is identical with any number of workers and on resume.
"""

from __future__ import annotations

import bisect
import random

from trainer.data.items import CaptionSpec


def _uses_weights(spec: CaptionSpec) -> bool:
    """ED2: weighted sampling applies only when the tag weights are not all equal."""
    return len({w for _, w in spec.tags}) > 1


def _weighted_pick(tags: list[tuple[str, float]], budget: int, rng: random.Random) -> list[str]:
    """ED2's rule: draw tags without replacement, probability proportional to weight, until
    the joined tag text reaches `budget` characters (the last tag may overshoot it)."""
    pool = list(tags)
    picked: list[str] = []
    length = 0
    while pool and length < budget:
        cumulative: list[float] = []
        total = 0.0
        for _, weight in pool:
            total += max(weight, 0.0)
            cumulative.append(total)
        if total <= 0:
            break
        pos = min(bisect.bisect_left(cumulative, rng.uniform(0, total)), len(pool) - 1)
        tag, _ = pool.pop(pos)
        length += len(tag) + (2 if picked else 0)
        picked.append(tag)
    return picked


def shuffled_caption(spec: CaptionSpec, rng: random.Random, keep_tags: int = 0) -> str:
    """The main prompt, then the first `keep_tags` tags in place, then the rest shuffled.

    `keep_tags` counts tags after the main prompt (the main prompt is never moved). With
    unequal tag weights the remaining tags are instead drawn by weight up to the caption's
    `max_caption_length` (ED2's weighted shuffle); kept tags always come first.
    EveryDream2's keep_tags was a no-op (`min(keep_tags, 0)`); here it works.
    """
    if not spec.tags:
        return spec.main_prompt
    keep = max(0, int(keep_tags))
    kept = [t for t, _ in spec.tags[:keep]]
    rest = list(spec.tags[keep:])
    if _uses_weights(spec):
        used = len(spec.main_prompt) + sum(len(t) + 2 for t in kept)
        tail = _weighted_pick(rest, spec.max_caption_length - used, rng)
    else:
        tail = [t for t, _ in rest]
        rng.shuffle(tail)
    return ", ".join([spec.main_prompt, *kept, *tail])


def split_at_separator(text: str, separator: str) -> tuple[list[str], list[str], list[str]] | None:
    """kohya's keep_tokens_separator: `fixed ||| flexible ||| fixed suffix` -> three tag lists
    (split on ',' and stripped, empty chunks dropped); None when `separator` is "" or absent.

    Only the first two separators count: a third stays inside the suffix text, as in kohya.
    """
    if not separator or separator not in text:
        return None
    fixed, flex = text.split(separator, 1)
    suffix = ""
    if separator in flex:
        flex, suffix = flex.split(separator, 1)

    def chunks(part: str) -> list[str]:
        return [c.strip() for c in part.split(",") if c.strip()]

    return chunks(fixed), chunks(flex), chunks(suffix)


def separated_caption(
    parts: tuple[list[str], list[str], list[str]], rng: random.Random, shuffle: bool
) -> str:
    """Fixed part, then the flexible part (shuffled when asked), then the fixed suffix.

    Unlike kohya, the separator never reaches the text encoder: without shuffling the three
    parts are joined with ', ' too (kohya leaves the literal separator in unshuffled captions).
    """
    fixed, flex, suffix = parts
    flex = list(flex)
    if shuffle:
        rng.shuffle(flex)
    return ", ".join([*fixed, *flex, *suffix])


def sample_caption(
    spec: CaptionSpec,
    rng: random.Random,
    *,
    shuffle: bool,
    keep_tags: int,
    cond_dropout: float,
    separator: str = "",
) -> str:
    """The caption one sample trains with: shuffled when asked, then dropped to "" with
    probability `cond_dropout` (unconditional training for classifier-free guidance).

    The dropout draw is taken first and always, so toggling shuffling does not change which
    samples are dropped. A caption containing `separator` (keep_tokens_separator) is shuffled
    by kohya's rule instead of keep_tags and tag weights (`split_at_separator`).
    """
    dropped = rng.random() < cond_dropout
    if not shuffle:
        return "" if dropped else fixed_caption(spec, separator)
    parts = split_at_separator(spec.text, separator)
    text = (
        separated_caption(parts, rng, True) if parts is not None else shuffled_caption(spec, rng, keep_tags)
    )
    return "" if dropped else text


def fixed_caption(spec: CaptionSpec, separator: str = "") -> str:
    """The caption a sample trains with when nothing shuffles it and it is not dropped: the
    same every epoch, so the run can encode it once, up front."""
    parts = split_at_separator(spec.text, separator)
    return separated_caption(parts, random.Random(0), False) if parts is not None else spec.text


def epoch_drops_captions(epoch: int, every_n_epochs: int) -> bool:
    """kohya's caption_dropout_every_n_epochs: every caption of the N-th, 2N-th, ... epoch is
    empty. kohya counts epochs from 1, so with 0-based `epoch` that is (epoch + 1) % N == 0."""
    return every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0
