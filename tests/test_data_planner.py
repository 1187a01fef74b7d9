"""Epoch plans: repeats, one bucket per batch, batch_id windows, determinism, ranks."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.planner import plan_epoch, repeat_counts

A, B = (64, 64), (128, 64)


def _items(n, *, multiply=1.0, batch_id="default_batch", flip_p=None, prefix="i"):
    return [
        ImageItem(
            f"/d/{prefix}{k:03d}.png",
            64,
            64,
            CaptionSpec(f"c{k}"),
            multiply=multiply,
            batch_id=batch_id,
            flip_p=flip_p,
        )
        for k in range(n)
    ]


def _plan(items, buckets=None, **kw):
    buckets = buckets or [A if k % 3 else B for k in range(len(items))]
    args = {"epoch": 0, "seed": 1, "batch_size": 4} | kw
    return plan_epoch(items, buckets, **args)


def _uses(plan):
    return Counter(ref.item_index for batch in plan.batches for ref in batch)


def test_integer_and_fractional_multiply():
    items = (
        _items(10, multiply=2.0) + _items(10, multiply=0.5, prefix="h") + _items(2, multiply=0.0, prefix="z")
    )
    extra_total = []
    for epoch in range(40):
        counts = repeat_counts(items, random.Random(epoch))
        assert counts[:10] == [2] * 10
        assert all(c in (0, 1) for c in counts[10:20])
        assert counts[20:] == [0, 0]
        extra_total.append(sum(counts[10:20]))
        assert repeat_counts(items, random.Random(epoch)) == counts  # deterministic
    assert set(extra_total) == {5}  # systematic sampling: exactly sum of fractions (=5)
    # every half item gets picked sometimes, and on average half the time
    picked = Counter(
        i for e in range(400) for i, c in enumerate(repeat_counts(items, random.Random(e))) if c and i >= 10
    )
    assert all(150 < picked[i] < 250 for i in range(10, 20))


@pytest.mark.parametrize(
    ("multiply", "low", "high", "total"),
    [(1.7, 1, 2, 1700), (0.3, 0, 1, 300), (2.5, 2, 3, 2500), (0.9, 0, 1, 900), (3.25, 3, 4, 3250)],
)
def test_fractional_multiply_gives_floor_or_ceil_copies_and_the_expected_total(multiply, low, high, total):
    """Every item gets floor(multiply) copies plus at most one extra, and the extras add up to the
    sum of the fractional parts: fractions above 0.5 (1.7, 0.9) tell floor from round."""
    items = _items(1000, multiply=multiply)
    for epoch in range(3):
        counts = repeat_counts(items, random.Random(epoch))
        assert set(counts) == {low, high}, f"multiply {multiply}, epoch {epoch}: counts {sorted(set(counts))}"
        assert abs(sum(counts) - total) <= 1, f"multiply {multiply}, epoch {epoch}: total {sum(counts)}"


def test_one_bucket_per_batch_and_no_duplicates_beyond_multiply():
    items = _items(23) + _items(5, multiply=3.0, prefix="m")
    plan = _plan(items)
    for batch in plan.batches:
        assert len({ref.bucket for ref in batch}) == 1
        assert 1 <= len(batch) <= 4
    uses = _uses(plan)
    assert all(uses[k] == 1 for k in range(23)) and all(uses[k] == 3 for k in range(23, 28))
    positions = [ref.position for batch in plan.batches for ref in batch]
    assert sorted(positions) == list(range(len(positions)))


def test_short_buckets_are_not_padded_and_window_samples_sum():
    items = _items(10)
    plan = _plan(items, [A] * 9 + [B], grad_accum=2)
    sizes = sorted(len(b) for b in plan.batches)
    assert sizes == [1, 1, 4, 4]  # 9 -> 4,4,1 and 1 -> 1; no duplicates
    for start, end in plan.windows:
        total = sum(len(plan.batches[i]) for i in range(start, end))
        assert all(plan.window_samples(i) == total for i in range(start, end))
        assert plan.is_window_end(end - 1)
    assert sum(plan.window_sample_counts) == 10


def test_batch_id_groups_stay_in_one_window():
    items = _items(16) + _items(6, batch_id="faces", prefix="f") + _items(5, batch_id="hands", prefix="h")
    for epoch in range(5):
        plan = _plan(items, [A] * len(items), grad_accum=4, batch_size=2, epoch=epoch)
        window_of = {}
        for w, (start, end) in enumerate(plan.windows):
            assert end - start <= 4
            for i in range(start, end):
                batch_ids = {items[r.item_index].batch_id for r in plan.batches[i]}
                assert len(batch_ids) == 1
                bid = batch_ids.pop()
                if bid != "default_batch":
                    assert window_of.setdefault(bid, w) == w
        assert set(window_of) == {"faces", "hands"}


def test_order_is_a_function_of_seed_and_epoch():
    items = _items(40)

    def order(p):
        return [[(r.item_index, r.flip) for r in b] for b in p.batches]

    assert order(_plan(items, epoch=3)) == order(_plan(items, epoch=3))
    assert order(_plan(items, epoch=3)) != order(_plan(items, epoch=4))
    assert order(_plan(items, epoch=3, seed=2)) != order(_plan(items, epoch=3))


def test_flip_p_from_settings_and_item():
    items = _items(200)
    none = _plan(items, default_flip_p=0.0)
    assert not any(r.flip for b in none.batches for r in b)
    half = _plan(items, default_flip_p=0.5)
    rate = sum(r.flip for b in half.batches for r in b) / 200
    assert 0.38 < rate < 0.62
    forced = _plan(_items(20, flip_p=1.0), default_flip_p=0.0)
    assert all(r.flip for b in forced.batches for r in b)
    off = _plan(_items(20, flip_p=0.0), default_flip_p=1.0)  # item setting wins over train.json
    assert not any(r.flip for b in off.batches for r in b)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_two_replicas_get_disjoint_equal_shares(grad_accum):
    items = _items(37) + _items(4, batch_id="x", prefix="x")
    plans = [_plan(items, num_replicas=2, rank=r, grad_accum=grad_accum, batch_size=3) for r in range(2)]
    assert len(plans[0].batches) == len(plans[1].batches) > 0
    assert [e - s for s, e in plans[0].windows] == [e - s for s, e in plans[1].windows]
    pos = [{r.position for b in p.batches for r in b} for p in plans]
    assert not pos[0] & pos[1]
    # leftovers: fewer than num_replicas batches per window are left out, never duplicated
    covered = sum(len(p) for p in pos)
    assert 41 - 3 * plans[0].dropped_batches <= covered <= 41
    assert plans[0].dropped_batches <= len(plans[0].windows) + 1
    for b in range(len(plans[0].batches)):
        assert plans[0].global_window_samples(b) == plans[0].window_samples(b) + plans[1].window_samples(b)
