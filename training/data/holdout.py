"""Held-out samples (``data.holdout``): a fixed fraction of each subset's keys the fit never
trains on, for the held-out metrics of ``training.evaluation``.

A key is held out by a hash of (subset, key) alone: the same keys on every rank, in every
run and every resume, whatever the seed, the process count or the shards' order, and a key
added to the data later does not move any other key across the split.
"""

from __future__ import annotations

import hashlib

import numpy as np

from training.data.index import SubsetIndex

_SPAN = float(2**64)


def holdout_point(subset: str, key: str) -> float:
    """The key's point in [0, 1): held out when below ``data.holdout``."""
    digest = hashlib.blake2b(f"{subset}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN


def held_out_mask(index: SubsetIndex, fraction: float) -> np.ndarray:
    """bool [N]: which of the index's samples are held out."""
    if fraction <= 0.0:
        return np.zeros(index.num_samples, bool)
    keys = index.keys.to_pylist()
    return np.fromiter((holdout_point(index.name, k) < fraction for k in keys), bool, len(keys))


def select(index: SubsetIndex, keep: np.ndarray) -> SubsetIndex:
    """The index of the samples where ``keep`` is True, grouped by shard as before (shards
    left empty drop out)."""
    keep = np.asarray(keep, bool)
    shard_of = np.repeat(np.arange(len(index.urls)), index.shard_sizes())
    sizes = np.bincount(shard_of[keep], minlength=len(index.urls))
    shards = np.flatnonzero(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes[shards])]).astype(np.int64)
    rows = np.flatnonzero(keep)
    return SubsetIndex(
        index.name,
        [index.urls[int(s)] for s in shards],
        starts,
        index.offsets[rows],
        index.lengths[rows],
        index.keys.take(rows),
    )


def split_holdout(index: SubsetIndex, fraction: float) -> tuple[SubsetIndex, SubsetIndex]:
    """(train, held out) parts of ``index``."""
    held = held_out_mask(index, fraction)
    return select(index, ~held), select(index, held)
