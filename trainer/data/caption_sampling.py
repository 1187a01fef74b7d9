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


def sample_caption(
    spec: CaptionSpec,
    rng: random.Random,
    *,
    shuffle: bool,
    keep_tags: int,
    cond_dropout: float,
) -> str:
    """The caption one sample trains with: shuffled when asked, then dropped to "" with
    probability `cond_dropout` (unconditional training for classifier-free guidance).

    The dropout draw is taken first and always, so toggling shuffling does not change which
    samples are dropped.
    """
    dropped = rng.random() < cond_dropout
    text = shuffled_caption(spec, rng, keep_tags) if shuffle else spec.text
    return "" if dropped else text
