"""The commit protocol: a shard is either whole or invisible.

The tar is written under a hidden temporary name and renamed, then its index is written the
same way. The index is the commit record: a key is committed iff an index (or quarantine
file) names it. A tar without an index is an interrupted commit and :func:`clean_incomplete`
removes it before a rerun, which then writes those keys again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.schema import SCHEMA_VERSION
from datagen.shards.frames import frame_fields
from datagen.shards.index import (
    filtered_count,
    previous_datagen_runs,
    read_indexes,
    read_quarantine,
)
from datagen.shards.layout import (
    DATAGEN_RUN_KEYS,
    DATAGEN_RUNS,
    INDEX_SCHEMA,
    MANIFEST,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    TMP_MARK,
    digest_name,
    filesystem,
    is_local,
    subsets_in,
)
from datagen.shards.tar import tar_with_ranges


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


@dataclass
class ShardInfo:
    name: str
    samples: int
    tar_bytes: int
    sha256: str


def commit_shard(
    out: str, subset: str, samples: list[tuple[str, Mapping[str, bytes]]]
) -> ShardInfo:
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
        {
            col: [r.get(col, now if col == "time" else None) for r in records]
            for col in QUARANTINE_SCHEMA.names
        },
        schema=QUARANTINE_SCHEMA,
    )
    atomic_write(fs, f"{root}/{subset}/{QUARANTINE_DIR}/{name}.parquet", _parquet_bytes(table))
    return name


def split_shards(
    samples: list[tuple[str, Mapping[str, bytes]]], max_samples: int, max_bytes: int
) -> list[list]:
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


def clean_incomplete(out: str) -> list[str]:
    """Remove leftovers of interrupted commits: temp files and tars without an
    index. Must run only while no job writes to ``out`` (the run lock). Only files
    are removed: a folder with a tar's name is left for ``verify`` to report."""
    fs, root = filesystem(out)
    removed = []
    for subset in subsets_in(out):
        for directory in (f"{root}/{subset}", f"{root}/{subset}/{QUARANTINE_DIR}"):
            if not fs.isdir(directory):
                continue
            for entry in fs.ls(directory, detail=True):
                path, base = entry["name"], entry["name"].rsplit("/", 1)[-1]
                if entry.get("type", "file") != "file":
                    continue
                orphan = path.endswith(".tar") and not fs.exists(path[: -len(".tar")] + ".parquet")
                if TMP_MARK in base or orphan:
                    fs.rm(path)
                    removed.append(path)
    return removed


def write_manifest(
    out: str,
    subset: str,
    info: Mapping[str, Any],
    index: pa.Table | None = None,
    quarantine: pa.Table | None = None,
    datagen_run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Summarise a subset from its indexes (all runs, not just the last); ``index`` and
    ``quarantine`` are read here unless the caller already holds them. ``datagen_run``
    (``{run_id, tracking_uri, experiment}``, the MLflow run writing it) is added to the
    previous manifest's ``datagen_runs``, once per run id."""
    fs, root = filesystem(out)
    runs = previous_datagen_runs(fs, f"{root}/{subset}/{MANIFEST}")
    if datagen_run is not None and all(r["run_id"] != datagen_run["run_id"] for r in runs):
        runs.append({k: str(datagen_run[k]) for k in DATAGEN_RUN_KEYS})
    index = read_indexes(out, subset) if index is None else index
    quarantine = read_quarantine(out, subset) if quarantine is None else quarantine
    shards: dict[str, dict[str, Any]] = {}
    for row in index.select(["shard", "tar_bytes", "tar_sha256"]).to_pylist():
        entry = shards.setdefault(
            row["shard"],
            {
                "name": f"{row['shard']}.tar",
                "samples": 0,
                "bytes": row["tar_bytes"],
                "sha256": row["tar_sha256"],
            },
        )
        entry["samples"] += 1
    manifest = {
        "subset": subset,
        "schema_version": SCHEMA_VERSION,
        "written": index.num_rows,
        "quarantined": quarantine.num_rows - filtered_count(quarantine),
        "filtered": filtered_count(quarantine),
        "quarantine_by_error": dict(
            Counter(
                f"{s}:{e}"
                for s, e in zip(
                    quarantine.column("stage").to_pylist(),
                    quarantine.column("error").to_pylist(),
                    strict=True,
                )
            )
        ),
        "bytes": sum(s["bytes"] for s in shards.values()),
        "shards": sorted(shards.values(), key=lambda s: s["name"]),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        **frame_fields(subset),
        DATAGEN_RUNS: runs,
    }
    atomic_write(
        fs, f"{root}/{subset}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    return manifest
