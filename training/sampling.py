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

import tarfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen.shards import (
    MANIFEST,
    ShardFileError,
    filesystem,
    is_local,
    read_index,
    read_manifest_file,
)
from training.tasks import FAMILIES

# --- seeding ---------------------------------------------------------------------------------


def batch_rng(seed: int, rank: int, k: int) -> np.random.Generator:
    """The one generator batch ``k`` of ``rank`` draws from. Distinct for
    every (seed, rank, k): ranks never share a stream."""
    if seed < 0 or rank < 0 or k < 0:
        raise ValueError(f"seed, rank and batch index must be >= 0, got {seed}, {rank}, {k}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(k), 0x0E6E]))


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


def choose_subset(rng: np.random.Generator, names: Sequence[str], probs: Sequence[float]) -> str:
    """The first draw of every batch: which subset it comes from."""
    u = rng.random()
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


def scan_tar_ranges(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, int, int]]:
    """(key, offset, length) per sample by walking the tar's headers (the
    fallback for indexes without byte ranges). Seeks over the payloads."""
    ranges: list[tuple[str, int, int]] = []
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        current, start = None, 0
        for member in tar:
            if not member.isfile():
                continue
            key = member.name.rsplit("/", 1)[-1].partition(".")[0]
            if key != current:
                if current is not None:
                    ranges.append((current, start, member.offset - start))
                current, start = key, member.offset
            end = member.offset_data + ((member.size + 511) // 512) * 512
        if current is not None:
            ranges.append((current, start, end - start))
    return ranges


def _subset_dir(root: str, subset: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(fs, directory path, URL prefix) of ``subset`` under ``root``; ``root``
    may be a datagen output folder (holding ``<subset>/``) or the subset folder."""
    fs, path = filesystem(root)
    url = root.rstrip("/")
    if fs.exists(f"{path}/{subset}/{MANIFEST}"):
        path, url = f"{path}/{subset}", f"{url}/{subset}"
    elif not fs.exists(f"{path}/{MANIFEST}"):
        raise FileNotFoundError(
            f"no {MANIFEST} for subset {subset!r} under {root} (looked in {root}/{subset}/ and {root}/): "
            "run or finish the datagen DAG first"
        )
    if "://" not in url:
        url = path
    return fs, path, url


def _read_manifest(fs: fsspec.AbstractFileSystem, directory: str) -> dict:
    return read_manifest_file(fs, f"{directory}/{MANIFEST}")


def _indexed_ranges(table: pa.Table) -> list[tuple[str, int, int]] | None:
    """``(key, offset, length)`` of the written samples, in tar order; None when the index
    predates byte ranges."""
    table = table.filter(pc.equal(table["status"], "written"))
    offs, lens = table["offset"].to_pylist(), table["length"].to_pylist()
    if any(o is None or n is None for o, n in zip(offs, lens, strict=True)):
        return None
    rows = sorted(zip(table["key"].to_pylist(), offs, lens, strict=True), key=lambda r: r[1])
    return [(k, int(o), int(n)) for k, o, n in rows]


def _shard_table(
    fs: fsspec.AbstractFileSystem, directory: str, tar_name: str
) -> list[tuple[str, int, int]]:
    base = tar_name[: -len(".tar")] if tar_name.endswith(".tar") else tar_name
    index_path = f"{directory}/{base}.parquet"
    if fs.exists(index_path):
        try:
            rows = _indexed_ranges(read_index(fs, index_path))
        except ShardFileError as exc:
            warnings.warn(f"{exc}; scanning the tar instead", stacklevel=2)
        else:
            if rows is not None:
                return rows
    try:
        return scan_tar_ranges(fs, f"{directory}/{tar_name}")
    except (OSError, tarfile.TarError, EOFError) as exc:
        warnings.warn(
            f"{directory}/{tar_name}: no usable index and the tar does not scan ({exc}); "
            "leaving this shard out",
            stacklevel=2,
        )
        return []


def build_subset_index(roots: Sequence[str], subset: str, threads: int = 8) -> SubsetIndex:
    """The subset's index over one or more datagen outputs (local or fsspec).

    Shards come from each ``manifest.json``; byte ranges from the parquet
    index beside each tar, or a header scan where an index lacks them.
    """
    jobs: list[tuple[fsspec.AbstractFileSystem, str, str, str]] = []
    for root in roots:
        fs, directory, url = _subset_dir(root, subset)
        manifest = _read_manifest(fs, directory)
        if manifest.get("subset", subset) != subset:
            raise ValueError(
                f"{directory}/{MANIFEST} describes subset {manifest['subset']!r}, not {subset!r}"
            )
        for shard in manifest.get("shards", []):
            jobs.append((fs, directory, url, shard["name"]))
    if not jobs:
        raise ValueError(f"subset {subset!r}: the manifests under {list(roots)} list no shards")
    with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
        tables = list(pool.map(lambda j: _shard_table(j[0], j[1], j[3]), jobs))
    urls, starts, offsets, lengths, keys = [], [0], [], [], []
    for (_, _, url, name), rows in zip(jobs, tables, strict=True):
        if not rows:
            continue
        urls.append(f"{url}/{name}")
        starts.append(starts[-1] + len(rows))
        keys += [r[0] for r in rows]
        offsets += [r[1] for r in rows]
        lengths += [r[2] for r in rows]
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


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file in one request (may come back short when
    the file is truncated)."""
    if is_local(fs):
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    return fs.cat_file(path, start=start, end=end)


# --- minimal tar member parsing (one sample's byte range) ------------------------------------


class TarFormatError(ValueError):
    """A member header is damaged (bad checksum, bad size) or data is missing."""


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` of a PAX extended header (records ``"<len> <key>=<value>\\n"``), the
    last one winning as in tarfile; None without one. The writer uses PAX for names over
    100 bytes (long keys), so this is on the hot path of long-key samples. A malformed
    record is a :class:`TarFormatError`, never a hang on a zero length."""
    path, pos = None, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise TarFormatError(f"malformed PAX record at byte {pos} of an extended header")
        name, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarFormatError(f"PAX record without '=' at byte {pos} of an extended header")
        if name == b"path":
            try:
                path = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TarFormatError(f"PAX path is not UTF-8: {value[:60]!r}") from exc
        pos = end
    return path


def parse_members(chunk: bytes | memoryview) -> list[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar byte range, checking every
    header's checksum. Stops at the end of the chunk or an all-zero block."""
    buf = memoryview(chunk)
    out: list[tuple[str, bytes]] = []
    pos, long_name = 0, None
    while pos + 512 <= len(buf):
        header = bytes(buf[pos : pos + 512])
        if header == b"\0" * 512:
            break
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 32 * 8 + sum(header[156:])
        if stored != computed:
            raise TarFormatError(f"bad tar header checksum at byte {pos}")
        size = _octal(header[124:136])
        kind = header[156:157]
        data_start, data_end = pos + 512, pos + 512 + size
        if data_end > len(buf):
            raise TarFormatError(
                f"member at byte {pos} is cut short ({len(buf) - data_start} of {size} bytes)"
            )
        data = bytes(buf[data_start:data_end])
        pos = data_start + ((size + 511) // 512) * 512
        if kind in (b"L",):
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind in (b"x",):
            long_name = _pax_path(data) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = (
                header[345:500].split(b"\0", 1)[0].decode("utf-8")
                if header[257:262] == b"ustar"
                else ""
            )
            if prefix:
                name = f"{prefix}/{name}"
        long_name = None
        out.append((name, data))
    return out


def sample_files(chunk: bytes | memoryview, expected_key: str) -> dict[str, bytes]:
    """One sample's fields from its byte range; every member must belong to
    ``expected_key`` (a mismatch means the index and the tar disagree)."""
    files: dict[str, bytes] = {}
    for name, data in parse_members(chunk):
        key, _, field = name.rsplit("/", 1)[-1].partition(".")
        if key != expected_key:
            raise TarFormatError(
                f"member {name!r} found where the index puts sample {expected_key!r}"
            )
        files[field.lower()] = data
    if not files:
        raise TarFormatError(f"no members for sample {expected_key!r}")
    return files
