"""The shard stream: one rank's infinite sequence of whole batches (an ``IterableDataset``).

Batch ``k`` is a pure function of ``(seed, rank, k)`` and the data: its subset, its windows
of consecutive samples (one byte-range read each), their order, each sample's task and
caption dropout all come from ``batch_rng(seed, rank, k)``. A sample's views are built by
the layout of its subset's sample kind (:mod:`training.data.layouts`).

Skips: a sample that cannot be read, fails ``validate_sample`` or does not decode is
skipped, counted by reason (``SKIP_REASONS``) and replaced by further reads. Only data
problems of the sample are skips (``DATA_ERRORS``); an exception of another type, a
``KeyError`` or ``TypeError`` from our own code, is a bug and propagates with its traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from datagen.schema import SchemaError, validate_sample
from datagen.shards.layout import filesystem
from datagen.shards.reader import read_range
from datagen.shards.tar import sample_files
from training.data.config import DataConfig
from training.data.index import (
    SubsetIndex,
    batch_rng,
    choose_subset,
    plan_window,
    schedule_point,
    worker_batches,
)
from training.data.layouts import BatchPlan, Built, Layout, Sample, SampleFiles, layout_of
from training.data.views import DecodeError, assemble_pixels

# Why a sample was skipped: stable names, used in metric keys (data/skipped.<subset>.<reason>).
SKIP_REASONS = ("unreadable", "truncated", "schema", "decode")

# What a data problem of a sample raises while it is built (a missing field and bad
# metadata: SchemaError or another ValueError; bytes that do not decode: DecodeError,
# cv2.error, OSError from PIL). Nothing else is caught: KeyError, TypeError, AttributeError,
# IndexError are bugs.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    SchemaError,
    ValueError,
    cv2.error,
    OSError,
    Image.DecompressionBombError,
)


def read_meta(key: str, files: Mapping[str, bytes]) -> dict:
    """A sample's json metadata without the schema check (``data.validate: false``): a
    ``SchemaError`` when it is missing, does not parse or is not an object."""
    if "json" not in files:
        raise SchemaError(f"{key}: missing field 'json'")
    try:
        meta = json.loads(bytes(files["json"]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{key}: json metadata does not parse: {exc}") from None
    if not isinstance(meta, dict):
        raise SchemaError(f"{key}: json metadata must be an object")
    return meta


@dataclass
class Candidate:
    index: int  # global sample index in its subset
    files: dict[str, bytes] | None
    error: str | None = None
    reason: str = "unreadable"  # one of SKIP_REASONS when error is set


def skip_reason(exc: BaseException) -> str:
    """The SKIP_REASONS class of an exception raised while building a sample."""
    if isinstance(exc, SchemaError):
        return "schema"
    if isinstance(exc, DecodeError | cv2.error | OSError | Image.DecompressionBombError):
        return "decode"  # PIL's errors are OSErrors
    return "schema"  # a missing field, a mistyped metadata value, bad JSON


class OneGenStream(IterableDataset):
    """Infinite stream of whole batches for one rank (use with ``batch_size=None``)."""

    def __init__(
        self,
        indexes: Mapping[str, SubsetIndex],
        probs: Mapping[str, float],
        cfg: DataConfig,
        rank: int = 0,
        start_batch: int = 0,
    ):
        super().__init__()
        self.indexes = dict(indexes)
        self.names = [s for s in probs if probs[s] > 0]
        self.probs = [float(probs[s]) for s in self.names]
        if not self.names:
            raise ValueError("every subset has mixing weight 0")
        self.cfg = cfg
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.allowed = set(cfg.tasks) if cfg.tasks is not None else None
        self.buckets = cfg.bucket_table()
        self._fs: dict[str, Any] = {}

    # -- the pure per-batch functions --

    def plan_subset(self, k: int) -> str:
        """The subset batch ``k`` comes from: its point on the low-discrepancy schedule."""
        u = schedule_point(self.cfg.seed, self.rank, k)
        return choose_subset(u, self.names, self.probs)

    def make_batch(self, k: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = batch_rng(cfg.seed, self.rank, k)
        rng.random()  # the draw that once chose the subset: the batch's other draws stay
        subset = self.plan_subset(k)
        index = self.indexes[subset]
        bsz = cfg.batch_size
        bucket_u = rng.random()
        reads = min(cfg.reads_per_batch, bsz)
        window = math.ceil(bsz / reads * (1.0 + cfg.overread))
        # The bucket and (faceid, multiview) the image views per sample: set by the batch's
        # first sample, from the subset's buckets, the bucket draw and the view cap.
        bucket: tuple[int, int] | None = None
        layout = layout_of(subset)
        num_views: int | None = layout.num_views
        plan = BatchPlan(self.buckets, bucket_u, self.view_cap(subset, k, layout))

        samples: list[Built] = []
        skipped, ineligible, last_error = 0, 0, None
        reasons: dict[str, int] = {}
        rounds = 0
        seen: set[int] = set()
        while len(samples) < bsz:
            if rounds > 0:
                reads = 1
                window = math.ceil((bsz - len(samples)) * (1.0 + cfg.overread))
            rounds += 1
            if len(seen) >= index.num_samples:  # a subset smaller than a batch: allow repeats
                seen.clear()
            cands: list[Candidate] = []
            for _ in range(reads):
                for cand in self.read_window(index, *plan_window(rng, index, window)):
                    if cand.index not in seen:  # overlapping windows: a sample once per batch
                        seen.add(cand.index)
                        cands.append(cand)
            order = rng.permutation(len(cands))
            # task, direction, caption dropout, source caption
            draws = rng.random((len(cands), 4))
            for j in order:
                if len(samples) == bsz:
                    break
                cand = cands[j]
                if cand.error is not None:
                    skipped, last_error = skipped + 1, f"{cand.reason}: {cand.error}"
                    reasons[cand.reason] = reasons.get(cand.reason, 0) + 1
                    continue
                try:
                    built = self.build_sample(
                        layout,
                        subset,
                        index.key(cand.index),
                        cand.files,
                        draws[j],
                        plan,
                        bucket,
                        num_views,
                    )
                except DATA_ERRORS as exc:  # a bug (KeyError, TypeError, ...) propagates
                    reason = skip_reason(exc)
                    skipped = skipped + 1
                    last_error = f"{reason}: {index.key(cand.index)}: {type(exc).__name__}: {exc}"
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                if built is None:
                    ineligible += 1
                    continue
                bucket, num_views = built.bucket, len(built.views)
                samples.append(built)
            if skipped > cfg.max_skipped_per_batch or rounds > 16 + 4 * bsz:
                raise RuntimeError(
                    f"batch {k} of subset {subset!r}: {skipped} unreadable and {ineligible} unusable samples "
                    f"after {rounds} reads; last error: {last_error}. The shards look broken."
                )

        assert bucket is not None and num_views is not None
        shared = get_worker_info() is not None
        batch: dict[str, Any] = {
            "pixels": assemble_pixels([s.views for s in samples], bucket, shared=shared)
        }
        if samples[0].rays is not None:
            batch["rays"] = torch.from_numpy(np.stack([s.rays for s in samples]))
        return {
            **batch,
            "cond_mask": torch.tensor([s.cond_mask for s in samples], dtype=torch.bool),
            "prompts": [s.prompt for s in samples],
            "tasks": [s.task for s in samples],
            "subsets": [subset] * bsz,
            "keys": [s.key for s in samples],
            "skipped": int(skipped),
            "skip_reasons": dict(sorted(reasons.items())),
            "skip_last": " ".join(str(last_error or "").split())[:300],
            "batch_index": int(k),
        }

    def view_cap(self, subset: str, k: int, layout: Layout) -> int | None:
        """The most image views of batch ``k`` when ``data.<subset>_min_views`` is set: drawn
        in [min, max] from the batch's second generator, so its other draws stay as they
        were without it."""
        if layout.num_views is not None:
            return None
        fewest, most = self.cfg.view_limits(subset)
        if fewest is None:
            return None
        return int(batch_rng(self.cfg.seed, self.rank, k, stream=1).integers(fewest, most + 1))

    # -- pieces --

    def _filesystem(self, url: str):
        if url not in self._fs:
            self._fs[url] = filesystem(url)
        return self._fs[url]

    def read_window(
        self, index: SubsetIndex, shard: int, first: int, stop: int
    ) -> list[Candidate]:
        """Samples ``first:stop`` of ``shard`` in one byte-range read, each its files or the
        reason it cannot be read."""
        url = index.urls[shard]
        start = int(index.offsets[first])
        end = int(index.offsets[stop - 1] + index.lengths[stop - 1])
        try:
            fs, path = self._filesystem(url)
            data = memoryview(read_range(fs, path, start, end))
        except (OSError, ValueError) as exc:
            return [
                Candidate(i, None, f"{url}: {type(exc).__name__}: {exc}", "unreadable")
                for i in range(first, stop)
            ]
        out = []
        for i in range(first, stop):
            rel, n = int(index.offsets[i]) - start, int(index.lengths[i])
            if rel + n > len(data):
                out.append(
                    Candidate(
                        i,
                        None,
                        f"{url}: sample {index.key(i)} is cut short (truncated tar)",
                        "truncated",
                    )
                )
                continue
            try:
                out.append(Candidate(i, sample_files(data[rel : rel + n], index.key(i))))
            except (ValueError, UnicodeDecodeError) as exc:
                out.append(Candidate(i, None, f"{url}: {exc}", "unreadable"))
        return out

    def build_sample(
        self,
        layout: Layout,
        subset: str,
        key: str,
        files: dict[str, bytes],
        draws: np.ndarray,
        plan: BatchPlan,
        bucket: tuple[int, int] | None,
        num_views: int | None,
        allowed: set[str] | None = None,
    ) -> Built | None:
        """Sample ``key`` as the batch's task layout, or None when it cannot join this batch
        (too few views, no allowed task). ``allowed``: these tasks instead of ``data.tasks``
        (the evaluation asks for one task at a time)."""
        if self.cfg.validate:
            meta = validate_sample(subset, {"__key__": key, **files})
        else:
            meta = read_meta(key, files)
        sample = Sample(subset, key, SampleFiles(files), meta, draws, plan)
        return layout.build(self.cfg, allowed or self.allowed, sample, bucket, num_views)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in worker_batches(self.start_batch, worker, workers):
            yield self.make_batch(k)
