"""WebDataset shards that are either whole or invisible, and their bookkeeping.

Layout of an output folder::

    OUT/<subset>/<subset>-<digest>.tar       the samples
    OUT/<subset>/<subset>-<digest>.parquet   its index: one row per key, sizes, tar sha256
    OUT/<subset>/quarantine/<digest>.parquet rejected keys: key, uri, stage, error, message
    OUT/<subset>/manifest.json               shards, counts, checksums, versions

Commit protocol: the tar is written under a hidden temporary name and
renamed, then its index is written the same way. The index is the commit
record: a key is committed iff an index (or quarantine file) names it. A tar
without an index is an interrupted commit and :func:`clean_incomplete`
removes it before a rerun, which then writes those keys again. Shard names are
a digest of their keys, so a retried task rewrites the same name instead of
duplicating samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.schema import SCHEMA_VERSION, SchemaError, validate_sample

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("sample_bytes", pa.int64()),
        ("fields", pa.list_(pa.string())),
        ("tar_bytes", pa.int64()),
        ("tar_sha256", pa.string()),
        # Byte range of the sample's members (headers included) inside the tar:
        # training reads any run of consecutive samples with one range request.
        ("offset", pa.int64()),
        ("length", pa.int64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("subset", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
        ("time", pa.float64()),
    ]
)
MANIFEST = "manifest.json"
QUARANTINE_DIR = "quarantine"
TMP_MARK = ".tmp-"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old state or the whole file."""
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    fs.makedirs(directory, exist_ok=True)
    if is_local(fs):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def tar_bytes(samples: list[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """A reproducible tar: members sorted per sample, fixed mtime/owner, so the
    same samples always give the same bytes and the same checksum."""
    return tar_with_ranges(samples)[0]


def tar_with_ranges(samples: list[tuple[str, Mapping[str, bytes]]]) -> tuple[bytes, list[tuple[int, int]]]:
    """The tar and each sample's (offset, length) in it."""
    buf = io.BytesIO()
    ranges: list[tuple[int, int]] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            start = tar.offset
            for name in sorted(files):
                data = files[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uname = info.gname = "onegen"
                tar.addfile(info, io.BytesIO(data))
            ranges.append((start, tar.offset - start))
    return buf.getvalue(), ranges


def digest_name(subset: str, keys: Iterable[str]) -> str:
    return f"{subset}-{hashlib.sha1(chr(10).join(sorted(keys)).encode()).hexdigest()[:16]}"


@dataclass
class ShardInfo:
    name: str
    samples: int
    tar_bytes: int
    sha256: str


def commit_shard(out: str, subset: str, samples: list[tuple[str, Mapping[str, bytes]]]) -> ShardInfo:
    """Write one tar and then its index. Each sample must already be validated."""
    fs, root = filesystem(out)
    name = digest_name(subset, [k for k, _ in samples])
    data, ranges = tar_with_ranges(samples)
    sha = hashlib.sha256(data).hexdigest()
    atomic_write(fs, f"{root}/{subset}/{name}.tar", data)
    index = pa.table(
        {
            "key": [k for k, _ in samples],
            "shard": [name] * len(samples),
            "status": ["written"] * len(samples),
            "sample_bytes": [sum(len(v) for v in files.values()) for _, files in samples],
            "fields": [sorted(files) for _, files in samples],
            "tar_bytes": [len(data)] * len(samples),
            "tar_sha256": [sha] * len(samples),
            "offset": [o for o, _ in ranges],
            "length": [n for _, n in ranges],
        },
        schema=INDEX_SCHEMA,
    )
    atomic_write(fs, f"{root}/{subset}/{name}.parquet", _parquet_bytes(index))
    return ShardInfo(name, len(samples), len(data), sha)


def commit_quarantine(out: str, subset: str, records: list[dict[str, Any]]) -> str:
    fs, root = filesystem(out)
    name = digest_name(subset, [r["key"] for r in records])
    now = time.time()
    table = pa.table(
        {col: [r.get(col, now if col == "time" else None) for r in records] for col in QUARANTINE_SCHEMA.names},
        schema=QUARANTINE_SCHEMA,
    )
    atomic_write(fs, f"{root}/{subset}/{QUARANTINE_DIR}/{name}.parquet", _parquet_bytes(table))
    return name


def split_shards(samples: list[tuple[str, Mapping[str, bytes]]], max_samples: int, max_bytes: int) -> list[list]:
    """Greedy split by count and size; a single oversized sample gets its own shard."""
    shards: list[list] = []
    current: list = []
    size = 0
    for sample in samples:
        sample_size = sum(len(v) for v in sample[1].values()) + 512 * (len(sample[1]) + 1)
        if current and (len(current) >= max_samples or size + sample_size > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(sample)
        size += sample_size
    if current:
        shards.append(current)
    return shards


# --- reading the bookkeeping back ---------------------------------------------------------


def subsets_in(out: str) -> list[str]:
    fs, root = filesystem(out)
    if not fs.exists(root):
        return []
    return sorted(
        p.rsplit("/", 1)[-1]
        for p in fs.ls(root, detail=False)
        if fs.isdir(p) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )


def _list(fs: fsspec.AbstractFileSystem, directory: str, suffix: str) -> list[str]:
    if not fs.exists(directory):
        return []
    return sorted(
        p for p in fs.ls(directory, detail=False)
        if p.endswith(suffix) and not p.rsplit("/", 1)[-1].startswith(".")
    )


def read_indexes(out: str, subset: str) -> pa.Table:
    fs, root = filesystem(out)
    tables = [pq.read_table(p, filesystem=fs) for p in _list(fs, f"{root}/{subset}", ".parquet")]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def read_quarantine(out: str, subset: str) -> pa.Table:
    fs, root = filesystem(out)
    tables = [pq.read_table(p, filesystem=fs) for p in _list(fs, f"{root}/{subset}/{QUARANTINE_DIR}", ".parquet")]
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()


def committed_keys(out: str, subset: str) -> set[str]:
    keys = set(read_indexes(out, subset).column("key").to_pylist())
    keys.update(read_quarantine(out, subset).column("key").to_pylist())
    return keys


def clean_incomplete(out: str) -> list[str]:
    """Remove leftovers of interrupted commits: temp files and tars without an
    index. Must run only while no job writes to ``out`` (the run lock)."""
    fs, root = filesystem(out)
    removed = []
    for subset in subsets_in(out):
        for directory in (f"{root}/{subset}", f"{root}/{subset}/{QUARANTINE_DIR}"):
            if not fs.exists(directory):
                continue
            for path in fs.ls(directory, detail=False):
                base = path.rsplit("/", 1)[-1]
                orphan = path.endswith(".tar") and not fs.exists(path[: -len(".tar")] + ".parquet")
                if TMP_MARK in base or orphan:
                    fs.rm(path)
                    removed.append(path)
    return removed


def write_manifest(out: str, subset: str, info: Mapping[str, Any], index: pa.Table | None = None,
                   quarantine: pa.Table | None = None) -> dict[str, Any]:
    """Summarise a subset from its indexes (all runs, not just the last); ``index`` and
    ``quarantine`` are read here unless the caller already holds them."""
    fs, root = filesystem(out)
    index = read_indexes(out, subset) if index is None else index
    quarantine = read_quarantine(out, subset) if quarantine is None else quarantine
    shards: dict[str, dict[str, Any]] = {}
    for row in index.select(["shard", "tar_bytes", "tar_sha256"]).to_pylist():
        entry = shards.setdefault(row["shard"], {"name": f"{row['shard']}.tar", "samples": 0,
                                                 "bytes": row["tar_bytes"], "sha256": row["tar_sha256"]})
        entry["samples"] += 1
    manifest = {
        "subset": subset,
        "schema_version": SCHEMA_VERSION,
        "written": index.num_rows,
        "quarantined": quarantine.num_rows,
        "quarantine_by_error": dict(Counter(f"{s}:{e}" for s, e in zip(
            quarantine.column("stage").to_pylist(), quarantine.column("error").to_pylist(), strict=True))),
        "bytes": sum(s["bytes"] for s in shards.values()),
        "shards": sorted(shards.values(), key=lambda s: s["name"]),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    atomic_write(fs, f"{root}/{subset}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(out: str, subset: str) -> dict[str, Any] | None:
    fs, root = filesystem(out)
    path = f"{root}/{subset}/{MANIFEST}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def shard_urls(out: str, subset: str) -> list[str]:
    """The subset's tar URLs from its manifest, for any WebDataset reader."""
    manifest = read_manifest(out, subset)
    if manifest is None:
        raise FileNotFoundError(f"{out}/{subset}/{MANIFEST} is missing: run or finish the DAG first")
    _, root = filesystem(out)
    prefix = out.rstrip("/") if "://" in out else root
    return [f"{prefix}/{subset}/{s['name']}" for s in manifest["shards"]]


def status(out: str) -> dict[str, dict[str, Any]]:
    """Per subset: written, quarantined, shards, bytes, read from the indexes so
    it is right while a job is still running."""
    result = {}
    for subset in subsets_in(out):
        index = read_indexes(out, subset)
        shard_bytes = dict(zip(index.column("shard").to_pylist(), index.column("tar_bytes").to_pylist(), strict=True))
        quarantine = read_quarantine(out, subset)
        result[subset] = {
            "written": index.num_rows,
            "quarantined": quarantine.num_rows,
            "shards": len(shard_bytes),
            "bytes": int(sum(shard_bytes.values())),
            "errors": dict(Counter(quarantine.column("error").to_pylist())),
        }
    return result


@dataclass
class VerifyReport:
    checked_shards: int = 0
    checked_samples: int = 0
    defects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects


def read_tar_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Group a tar's members into samples, in order, as WebDataset does."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, name = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][name] = tar.extractfile(member).read()
    return samples


def verify(out: str, subsets: list[str] | None = None) -> VerifyReport:
    """Re-read every tar and index; report any defect. Checks: manifest vs
    index vs tar agree (names, counts, sizes, sha256), every tar parses,
    every sample passes the schema, keys are unique across the subset, and no
    key is both written and quarantined."""
    fs, root = filesystem(out)
    report = VerifyReport()
    names = subsets if subsets is not None else subsets_in(out)
    if not names:
        report.defects.append(f"{out}: no subsets found")
    for subset in names:
        directory = f"{root}/{subset}"
        manifest = read_manifest(out, subset)
        if manifest is None:
            report.defects.append(f"{subset}: {MANIFEST} is missing (run incomplete?)")
            manifest = {"shards": []}
        in_manifest = {s["name"]: s for s in manifest["shards"]}
        tars = {p.rsplit("/", 1)[-1] for p in _list(fs, directory, ".tar")}
        for name in sorted(set(in_manifest) - tars):
            report.defects.append(f"{subset}/{name}: listed in the manifest but missing")
        for name in sorted(tars - set(in_manifest)):
            report.defects.append(f"{subset}/{name}: present but not in the manifest")
        seen: Counter[str] = Counter()
        for name in sorted(tars):
            report.checked_shards += 1
            index_path = f"{directory}/{name[:-4]}.parquet"
            if not fs.exists(index_path):
                report.defects.append(f"{subset}/{name}: has no index")
                continue
            index = pq.read_table(index_path, filesystem=fs).to_pylist()
            with fs.open(f"{directory}/{name}", "rb") as fh:
                data = fh.read()
            sha = hashlib.sha256(data).hexdigest()
            expected = {row["tar_sha256"] for row in index} | ({in_manifest[name]["sha256"]} if name in in_manifest else set())
            if expected != {sha}:
                report.defects.append(f"{subset}/{name}: sha256 {sha[:12]} does not match {sorted(e[:12] for e in expected)}")
            if any(row["tar_bytes"] != len(data) for row in index):
                report.defects.append(f"{subset}/{name}: size {len(data)} differs from its index")
            try:
                samples = read_tar_samples(data)
            except (tarfile.TarError, EOFError, OSError) as exc:
                report.defects.append(f"{subset}/{name}: unreadable tar: {exc}")
                continue
            keys = [k for k, _ in samples]
            if keys != [row["key"] for row in index]:
                report.defects.append(f"{subset}/{name}: keys in the tar differ from its index")
            for row in index:
                chunk = data[row["offset"] : row["offset"] + row["length"]]
                try:
                    got = read_tar_samples(chunk + b"\0" * 1024)
                except (tarfile.TarError, EOFError, OSError):
                    got = []
                if [k for k, _ in got] != [row["key"]]:
                    report.defects.append(f"{subset}/{name}: byte range of {row['key']} is wrong")
                    break
            for key, files in samples:
                report.checked_samples += 1
                seen[key] += 1
                try:
                    validate_sample(subset, {"__key__": key, **files})
                except SchemaError as exc:
                    report.defects.append(f"{subset}/{name}: {exc}")
        duplicates = [k for k, c in seen.items() if c > 1]
        if duplicates:
            report.defects.append(f"{subset}: {len(duplicates)} keys written more than once, e.g. {duplicates[:3]}")
        quarantined = set(read_quarantine(out, subset).column("key").to_pylist())
        both = quarantined & set(seen)
        if both:
            report.defects.append(f"{subset}: {len(both)} keys both written and quarantined, e.g. {sorted(both)[:3]}")
        if manifest.get("written") is not None and manifest.get("shards") and manifest["written"] != sum(seen.values()):
            report.defects.append(f"{subset}: manifest says {manifest['written']} written, tars hold {sum(seen.values())}")
    return report
