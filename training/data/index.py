"""The global sample index and the deterministic per-batch draws.

The training stream is a pure function of ``(seed, rank, k)``, ``k`` being the
rank's batch number: batch ``k`` draws everything (subset, windows, order,
tasks, caption dropout, bucket) from :func:`batch_rng`, and reads only what
the index says. Nothing depends on which worker builds it, how many workers
there are, or what came before, so a loader started at batch ``k`` yields what
an uninterrupted one yields from ``k`` on, bit for bit.

Reads: a batch reads ``reads_per_batch`` windows of consecutive samples, each
window with one byte-range request (first sample's offset to the last one's
end, from the index parquets written beside every tar). Window placement is
uniform over "virtual starts" (a window may hang over either end of its shard
and is clipped), so every sample is covered by the same number of starts: the
marginal probability of reading a sample is uniform across the subset.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from datagen.shards.frames import frame_problem
from datagen.shards.layout import MANIFEST, ShardFileError
from datagen.shards.reader import ShardReader
from datagen.shards.tar import Entry
from training.data.tasks import FAMILIES

# --- seeding ---------------------------------------------------------------------------------


def batch_rng(seed: int, rank: int, k: int, stream: int = 0) -> np.random.Generator:
    """The generator batch ``k`` of ``rank`` draws from. Distinct for every (seed, rank, k):
    ranks never share a stream. ``stream`` > 0: another generator of the same batch, for a
    draw added later (a batch's view count), which leaves the draws of stream 0 as they were."""
    if seed < 0 or rank < 0 or k < 0:
        raise ValueError(f"seed, rank and batch index must be >= 0, got {seed}, {rank}, {k}")
    entropy = [int(seed), int(rank), int(k), 0x0E6E] + ([int(stream)] if stream else [])
    return np.random.default_rng(np.random.SeedSequence(entropy))


def worker_batches(start: int, worker: int, num_workers: int):
    """Batch numbers worker ``worker`` of ``num_workers`` produces: torch's
    DataLoader asks its workers round-robin and yields in that order, so the
    loader's i-th batch is batch ``start + i``."""
    k = start + worker
    while True:
        yield k
        k += max(1, num_workers)


# --- mixing ----------------------------------------------------------------------------------


def mix_weights(present: Sequence[str], mix: Mapping[str, float] | None = None) -> dict[str, float]:
    """Normalised sampling probability per present subset.

    Default: equal budget per task family present (text-to-image, image-to-
    image, multi-view/ID, as the paper), equal within a family. With ``mix``,
    the given weights (subsets it omits get 0); a subset named in ``mix`` but
    not present is an error, as is a total of 0.
    """
    present = list(dict.fromkeys(present))
    if not present:
        raise ValueError("no subsets to mix")
    if mix:
        unknown = sorted(set(mix) - set(present))
        if unknown:
            raise ValueError(
                f"mix names subsets with no data configured: {unknown}; present: {present}"
            )
        weights = {s: float(mix.get(s, 0.0)) for s in present}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"mix weights must be >= 0: {weights}")
    else:
        family_of = {s: f for f, members in FAMILIES.items() for s in members}
        unknown = [s for s in present if s not in family_of]
        if unknown:
            raise ValueError(f"subsets {unknown} belong to no task family; give `mix` explicitly")
        families = {family_of[s] for s in present}
        weights = {}
        for s in present:
            members = [m for m in present if family_of[m] == family_of[s]]
            weights[s] = 1.0 / len(families) / len(members)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix weights sum to 0: {weights}")
    return {s: w / total for s, w in weights.items()}


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the most evenly spreading step on the circle


def schedule_point(seed: int, rank: int, k: int) -> float:
    """Batch ``k``'s point in [0, 1) of the subset schedule: ``frac(phase + k * golden)``,
    the golden-ratio additive recurrence from a phase per (seed, rank). An independent
    draw per batch leaves a subset of weight w out of its first n batches with probability
    (1 - w)^n (the demo's depth subset, w = 1/12, missed its whole 40-step fit); on this
    low-discrepancy sequence every stretch of batches holds each subset's share to within
    a batch or two, and a subset's next batch is never more than about 2.6 / w away."""
    if seed < 0 or rank < 0 or k < 0:
        raise ValueError(f"seed, rank and batch index must be >= 0, got {seed}, {rank}, {k}")
    phase = np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), 0x5C4ED])).random()
    return math.fmod(phase + int(k) * GOLDEN, 1.0)


def choose_subset(u: float, names: Sequence[str], probs: Sequence[float]) -> str:
    """The subset at point ``u`` in [0, 1) of the schedule (``probs`` laid end to end)."""
    cdf = np.cumsum(probs)
    return names[min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(names) - 1)]


# --- the index -------------------------------------------------------------------------------


@dataclass
class SubsetIndex:
    """All readable samples of one subset, grouped by shard, in tar order."""

    name: str
    urls: list[str]  # shard s's tar URL
    shard_start: np.ndarray  # int64 [S + 1]: shard s holds samples shard_start[s]:shard_start[s+1]
    offsets: np.ndarray  # int64 [N]: byte offset of the sample's first member header
    lengths: np.ndarray  # int64 [N]: bytes up to the next sample (headers + padding)
    keys: pa.Array  # string [N]

    @property
    def num_samples(self) -> int:
        return int(self.offsets.shape[0])

    def shard_sizes(self) -> np.ndarray:
        return np.diff(self.shard_start)

    def key(self, i: int) -> str:
        return self.keys[i].as_py()


def _shard_entries(reader: ShardReader, subset: str, shard: str) -> list[Entry]:
    """The shard's samples (:meth:`ShardReader.entries`: index, else a scan); a shard with
    neither a usable index nor a tar that scans is left out with a warning."""
    try:
        return reader.entries(subset, shard)
    except ShardFileError as exc:
        warnings.warn(f"{exc}; no usable index either: leaving this shard out", stacklevel=2)
        return []


def build_subset_index(roots: Sequence[str], subset: str, threads: int = 8) -> SubsetIndex:
    """The subset's index over one or more datagen outputs (local or fsspec), each a
    :class:`~datagen.shards.ShardReader` root: an output folder or the subset folder.

    Shards come from each ``manifest.json``; byte ranges from the parquet
    index beside each tar, or a header scan where an index lacks them.
    """
    jobs: list[tuple[ShardReader, str]] = []
    for root in roots:
        reader = ShardReader(root)
        manifest = reader.manifest(subset)
        if manifest is None:
            raise FileNotFoundError(
                f"no {MANIFEST} for subset {subset!r} under {root} (looked in {root}/{subset}/ "
                f"and {root}/): run or finish the datagen DAG first"
            )
        if manifest.get("subset", subset) != subset:
            raise ValueError(
                f"{reader.directory(subset)}/{MANIFEST} describes subset "
                f"{manifest['subset']!r}, not {subset!r}"
            )
        problem = frame_problem(manifest, subset)
        if problem:
            raise ShardFileError(f"{reader.directory(subset)}/{MANIFEST}: {problem}")
        jobs += [(reader, s["name"]) for s in manifest["shards"]]
    if not jobs:
        raise ValueError(f"subset {subset!r}: the manifests under {list(roots)} list no shards")
    with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
        tables = list(pool.map(lambda j: _shard_entries(j[0], subset, j[1]), jobs))
    urls, starts, offsets, lengths, keys = [], [0], [], [], []
    for (reader, name), rows in zip(jobs, tables, strict=True):
        if not rows:
            continue
        urls.append(reader.url(subset, name))
        starts.append(starts[-1] + len(rows))
        keys += [r.key for r in rows]
        offsets += [r.offset for r in rows]
        lengths += [r.length for r in rows]
    if not keys:
        raise ValueError(f"subset {subset!r}: no written samples under {list(roots)}")
    return SubsetIndex(
        subset,
        urls,
        np.asarray(starts, np.int64),
        np.asarray(offsets, np.int64),
        np.asarray(lengths, np.int64),
        pa.array(keys, pa.string()),
    )


# --- window planning -------------------------------------------------------------------------


def plan_window(rng: np.random.Generator, index: SubsetIndex, window: int) -> tuple[int, int, int]:
    """One window ``(shard, first, stop)`` (global sample indices, stop
    exclusive) of up to ``window`` consecutive samples.

    Shard s offers ``n_s + window - 1`` virtual starts v in
    ``[-(window-1), n_s)``; the window is ``[v, v + window)`` clipped to the
    shard. Drawing the virtual start uniformly over all shards covers every
    sample by exactly ``window`` starts, i.e. uniformly.
    """
    window = max(1, int(window))
    sizes = index.shard_sizes()
    slots = sizes + (window - 1)
    cum = np.cumsum(slots)
    u = int(rng.integers(0, int(cum[-1])))
    s = int(np.searchsorted(cum, u, side="right"))
    v = u - (int(cum[s - 1]) if s else 0) - (window - 1)
    first = max(v, 0)
    stop = min(v + window, int(sizes[s]))
    base = int(index.shard_start[s])
    return s, base + first, base + stop
