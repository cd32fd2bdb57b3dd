"""The per-batch subset draw is low-discrepancy: every subset of weight w gets its share of
any stretch of batches, and shows up within a few 1/w batches, on every rank and seed, still
a pure function of (seed, rank, batch)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from training.data.config import DataConfig
from training.data.index import mix_weights, schedule_point
from training.data.stream import OneGenStream

DEMO_SUBSETS = ["t2i", "i2i", "semantic", "depth", "pose", "multiview", "faceid"]


def _stream(seed: int, rank: int = 0, probs: dict[str, float] | None = None) -> OneGenStream:
    cfg = DataConfig.from_any({"paths": {"t2i": "unused"}, "batch_size": 4, "seed": seed})
    return OneGenStream({}, probs or mix_weights(DEMO_SUBSETS), cfg, rank=rank)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_every_subset_appears_within_three_over_w_batches(rank):
    probs = mix_weights(DEMO_SUBSETS)
    for seed in range(25):
        s = _stream(seed, rank)
        plan = [s.plan_subset(k) for k in range(200)]
        for name, w in probs.items():
            first = math.ceil(3 / w)  # 36 batches for a weight of 1/12
            assert name in plan[:first], (seed, rank, name)
            hits = [k for k, got in enumerate(plan) if got == name]
            assert max(b - a for a, b in zip(hits, hits[1:], strict=False)) <= first


def test_every_window_holds_each_share_to_within_two_batches():
    probs = {"a": 0.6, "b": 0.3, "c": 0.07, "d": 0.03}
    s = _stream(7, probs=probs)
    plan = [s.plan_subset(k) for k in range(3000)]
    for start in range(0, 3000 - 100, 37):
        counts = Counter(plan[start : start + 100])
        for name, w in probs.items():
            assert abs(counts[name] - 100 * w) <= 2.5, (start, name, counts)


def test_the_schedule_is_a_pure_function_of_seed_rank_and_batch():
    assert schedule_point(3, 1, 17) == schedule_point(3, 1, 17)
    assert schedule_point(3, 1, 17) != schedule_point(3, 2, 17) != schedule_point(4, 1, 17)
    a, b = _stream(5, 1), _stream(5, 1)
    assert [a.plan_subset(k) for k in range(50, 90)] == [b.plan_subset(k) for k in range(50, 90)]
    with pytest.raises(ValueError, match="must be >= 0"):
        schedule_point(0, 0, -1)
