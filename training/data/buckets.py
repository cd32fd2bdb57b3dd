"""Resolution buckets by task family and view count (``data.buckets``), as the paper trains
stage 2: text-to-image at 512 px, the other families at 256, ID photos at 512 with 2-3 views
and at 256 with more, so that every batch holds a similar number of tokens.

``data.buckets`` is one list of ``[H, W]`` for every batch, or a mapping whose keys are
``default``, a task family (``text2image``, ``image2image``, ``multiview_id``) or a subset
(``faceid``, ``multiview``, ...; a subset's entry wins over its family's, a family's over
``default``). Each value is a list of ``[H, W]``; for the subsets whose samples have a varying
number of views (faceid, multiview) it may be a mapping of view-count ranges (``"2-3"``,
``"4-"``, ``"5"``) to lists, which must cover every count from the subset's fewest views to
its ``data.<subset>_max_views`` once. Everything is resolved per subset when the config is
checked, so a batch's buckets are a lookup by (subset, view count): the choice stays a pure
function of the batch's subset, view count, first sample and draw.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datagen.schema import SUBSETS, TASK_FAMILIES
from training.data.errors import ConfigError, unknown_key
from training.data.tasks import FIXED_LAYOUTS

Bucket = tuple[int, int]

DEFAULT_BUCKETS: tuple[Bucket, ...] = ((256, 256), (256, 384), (384, 256))
# Subsets whose sample kind gives each batch the view count of its first sample.
VARIABLE_VIEWS: tuple[str, ...] = tuple(
    s.name for s in SUBSETS.values() if s.kind not in FIXED_LAYOUTS
)
_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*$")


def nearest_bucket(buckets: Sequence[Sequence[int]], width: int, height: int) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log) to a W x H frame; ties: the first."""
    target = math.log(max(width, 1) / max(height, 1))
    best = min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - target), i),
    )
    return int(buckets[best][0]), int(buckets[best][1])


@dataclass(frozen=True)
class ViewRange:
    low: int
    high: float  # math.inf for an open range ("4-")
    buckets: tuple[Bucket, ...]

    def holds(self, n: int) -> bool:
        return self.low <= n <= self.high


@dataclass(frozen=True)
class BucketTable:
    """Every subset's buckets, by view-count range where ``data.buckets`` gives ranges."""

    by_subset: Mapping[str, tuple[ViewRange, ...]]
    mode: str  # data.bucket_mode
    weights: tuple[float, ...] | None  # bucket_mode=random with one flat list

    def for_batch(self, subset: str, num_views: int) -> tuple[Bucket, ...]:
        for r in self.by_subset[subset]:
            if r.holds(num_views):
                return r.buckets
        # bucket_table checked that the ranges cover every view count a batch can have
        raise RuntimeError(f"data.buckets: no buckets for {subset} batches of {num_views} views")

    def pick(self, subset: str, num_views: int, frame: tuple[int, int], u: float) -> Bucket:
        """``aspect``: the bucket nearest the first sample's frame (W, H); ``random``: the one
        the batch's draw ``u`` falls on (weighted by ``data.bucket_weights`` if given)."""
        buckets = self.for_batch(subset, num_views)
        if self.mode != "random":
            return nearest_bucket(buckets, *frame)
        sums = list(itertools.accumulate(self.weights or (1.0,) * len(buckets)))
        cdf = [c / sums[-1] for c in sums]
        return buckets[min(bisect.bisect_right(cdf, u), len(cdf) - 1)]


def _bucket_list(key: str, value: Any) -> tuple[Bucket, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must list at least one [H, W]; got {value!r}")
    out = []
    for b in value:
        ok = isinstance(b, Sequence) and not isinstance(b, str) and len(b) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
        if not ok or any(x <= 0 or x % 16 for x in b):
            shown = list(b) if isinstance(b, Sequence) and not isinstance(b, str) else b
            raise ConfigError(f"{key}: {shown} must be [H, W], multiples of 16 (VAE /8, patch 2)")
        out.append((int(b[0]), int(b[1])))
    return tuple(out)


def _view_range(key: str, text: Any) -> tuple[int, float]:
    m = _RANGE.match(str(text))
    if m is None:
        raise ConfigError(f"{key}: view-count range {text!r} must read like 2-3, 4- or 5")
    low = int(m.group(1))
    high: float = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else math.inf)
    if low < 2 or high < low:
        raise ConfigError(f"{key}: view-count range {text!r} must start at 2 or more, end after")
    return low, high


def _entry(key: str, value: Any) -> tuple[ViewRange, ...]:
    """A list (any view count) or a mapping of view-count ranges."""
    if not isinstance(value, Mapping):
        return (ViewRange(0, math.inf, _bucket_list(key, value)),)
    if not value:
        raise ConfigError(f"{key}: an empty mapping; give [[H, W], ...] or view-count ranges")
    ranges = []
    for text, buckets in value.items():
        low, high = _view_range(f"{key}.{text}", text)
        ranges.append(ViewRange(low, high, _bucket_list(f"{key}.{text}", buckets)))
    ranges.sort(key=lambda r: r.low)
    for a, b in zip(ranges, ranges[1:], strict=False):
        if b.low <= a.high:
            raise ConfigError(f"{key}: view-count ranges overlap at {b.low} views")
    return tuple(ranges)


def _check_covered(key: str, subset: str, ranges: tuple[ViewRange, ...], most: int) -> None:
    if len(ranges) == 1 and ranges[0].low == 0:
        return
    if subset not in VARIABLE_VIEWS:
        raise ConfigError(
            f"{key}: view-count ranges only for {', '.join(VARIABLE_VIEWS)} (their batches' "
            f"view count varies); {subset} needs a list of [H, W]"
        )
    for n in range(SUBSETS[subset].min_views, most + 1):
        if not any(r.holds(n) for r in ranges):
            raise ConfigError(
                f"{key}: no range holds {n} views ({subset} batches have "
                f"{SUBSETS[subset].min_views}..{most}); add one holding it"
            )


def bucket_table(
    value: Any, mode: str, weights: Sequence[float] | None, max_views: Mapping[str, int]
) -> BucketTable:
    """``data.buckets`` checked and resolved per subset; ``max_views``: the most views a batch
    of each variable-view subset has (``data.faceid_max_views``, ``data.multiview_max_views``).
    Every error is one line naming the key."""
    if isinstance(value, Mapping):
        known = ("default", *TASK_FAMILIES, *SUBSETS)
        entries = {}
        for k, v in value.items():
            if k not in known:
                raise ConfigError(unknown_key(f"data.buckets.{k}", known))
            entries[k] = _entry(f"data.buckets.{k}", v)
        if weights is not None:
            raise ConfigError(
                "data.bucket_weights: only with one list of data.buckets; per-family buckets "
                "are drawn uniformly (bucket_mode=random)"
            )
        by_subset = {}
        for name, s in SUBSETS.items():
            k = next((k for k in (name, s.family, "default") if k in entries), None)
            if k is None:
                raise ConfigError(
                    f"data.buckets: none for {name} (family {s.family}); give "
                    f"data.buckets.{s.family} or data.buckets.default"
                )
            _check_covered(f"data.buckets.{k}", name, entries[k], max_views.get(name, 1))
            by_subset[name] = entries[k]
        return BucketTable(by_subset, mode, None)
    flat = _entry("data.buckets", value)
    if weights is not None:
        if len(weights) != len(flat[0].buckets):
            raise ConfigError("data.bucket_weights: needs one weight per bucket")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("data.bucket_weights: must be >= 0 with a positive sum")
    kept = tuple(float(w) for w in weights) if weights else None
    return BucketTable({name: flat for name in SUBSETS}, mode, kept)
