"""Reading the bookkeeping back: indexes, quarantine records and manifests, each checked
against its schema so a damaged file is a :class:`ShardFileError` naming it, never a
traceback; ``status`` counts from the indexes, so it is right while a job still runs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.shards.layout import (
    DATAGEN_RUN_KEYS,
    DATAGEN_RUNS,
    INDEX_SCHEMA,
    MANIFEST_VOLATILE,
    QUARANTINE_DIR,
    QUARANTINE_OPTIONAL,
    QUARANTINE_SCHEMA,
    ShardFileError,
    filesystem,
    list_entries,
    subsets_in,
)
from datagen.shards.tar import Entry


def list_paths(fs: fsspec.AbstractFileSystem, directory: str, suffix: str) -> list[str]:
    return [p for p, _ in list_entries(fs, directory, suffix)]


def read_parquet(
    fs: fsspec.AbstractFileSystem,
    path: str,
    schema: pa.Schema,
    optional: frozenset[str] = frozenset(),
    not_null: tuple[str, ...] = ("key",),
) -> pa.Table:
    """``path`` conformed to ``schema`` (``optional`` columns may be absent: nulls;
    ``not_null`` ones must be complete, since accounting and readers rely on them).

    Opened as one file, never as a dataset, so a folder with a parquet name is an
    error; any damage becomes a :class:`ShardFileError` naming the file.
    """
    try:
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ShardFileError(f"{path}: unreadable parquet: {exc}") from exc
    missing = [
        f.name for f in schema if f.name not in table.column_names and f.name not in optional
    ]
    if missing:
        raise ShardFileError(f"{path}: not an index/quarantine file, lacks columns {missing}")
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table.column(f.name)
        try:
            columns.append(column.cast(f.type))
        except (ValueError, TypeError, pa.ArrowException) as exc:
            raise ShardFileError(
                f"{path}: column {f.name!r} is {column.type}, not {f.type}"
            ) from exc
    table = pa.Table.from_arrays(columns, schema=schema)
    holes = [name for name in not_null if table.column(name).null_count]
    if holes:
        raise ShardFileError(f"{path}: columns {holes} have missing values")
    return table


def read_index(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """One shard's index; indexes written before byte ranges existed lack offset/length."""
    return read_parquet(
        fs,
        path,
        INDEX_SCHEMA,
        frozenset({"offset", "length"}),
        ("key", "shard", "tar_bytes", "tar_sha256"),
    )


def read_indexes(out: str, subset: str) -> pa.Table:
    """Every index of ``subset``; raises :class:`ShardFileError` naming a damaged one."""
    fs, root = filesystem(out)
    tables = [read_index(fs, p) for p in list_paths(fs, f"{root}/{subset}", ".parquet")]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def read_quarantine(out: str, subset: str) -> pa.Table:
    """Every quarantine file of ``subset``; raises :class:`ShardFileError` naming a damaged one."""
    fs, root = filesystem(out)
    paths = list_paths(fs, f"{root}/{subset}/{QUARANTINE_DIR}", ".parquet")
    tables = [read_parquet(fs, p, QUARANTINE_SCHEMA, QUARANTINE_OPTIONAL) for p in paths]
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()


def committed_keys(out: str, subset: str) -> set[str]:
    keys = set(read_indexes(out, subset).column("key").to_pylist())
    keys.update(read_quarantine(out, subset).column("key").to_pylist())
    return keys


def previous_datagen_runs(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, str]]:
    """The ``datagen_runs`` of the manifest at ``path``: [] when there is none, it predates
    the field, or it cannot be read (a rerun rewrites a damaged manifest)."""
    try:
        with fs.open(path, "rb") as fh:
            old = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return []
    runs = old.get(DATAGEN_RUNS) if isinstance(old, dict) else None
    if not isinstance(runs, list):
        return []
    return [
        {k: str(r.get(k, "")) for k in DATAGEN_RUN_KEYS}
        for r in runs
        if isinstance(r, dict) and isinstance(r.get("run_id"), str)
    ]


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest without its bookkeeping (``updated``, ``datagen_runs``): equal
    for two manifests describing the same shards made the same way."""
    stable = {k: v for k, v in manifest.items() if k not in MANIFEST_VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problem(manifest: Any) -> str | None:
    """Why ``manifest`` is not what :func:`write_manifest` writes, or None. Shard names
    must be plain ``.tar`` names: readers join them to the subset folder."""
    if not isinstance(manifest, dict):
        return f"is a JSON {type(manifest).__name__}, not an object"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return f"'shards' is {type(shards).__name__}, not a list"
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{i}] is {type(entry).__name__}, not an object"
        name = entry.get("name")
        if (
            not isinstance(name, str)
            or not name.endswith(".tar")
            or name.startswith(".")
            or ({"/", "\\"} & set(name))
        ):
            return f"shards[{i}].name {name!r} is not a plain .tar file name"
        if not isinstance(entry.get("sha256"), str):
            return f"shards[{i}].sha256 is not a string"
        bad = [k for k in ("samples", "bytes") if not _is_int(entry.get(k))]
        if bad:
            return f"shards[{i}]: {bad} are not integers"
    bad = [k for k in ("written", "quarantined") if k in manifest and not _is_int(manifest[k])]
    if bad:
        return f"{bad} are not integers"
    runs = manifest.get(DATAGEN_RUNS, [])  # absent in manifests written before it
    if not isinstance(runs, list) or not all(
        isinstance(r, dict) and isinstance(r.get("run_id"), str) for r in runs
    ):
        return f"'{DATAGEN_RUNS}' is not a list of objects with a run_id"
    return None


def read_manifest_file(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """A ``manifest.json``, checked (:func:`manifest_problem`); :class:`ShardFileError`
    naming it if damaged. Every reader of manifests (verify, preview, training) uses this."""
    try:
        with fs.open(path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ShardFileError(f"{path}: unreadable manifest: {exc}") from exc
    problem = manifest_problem(manifest)
    if problem:
        raise ShardFileError(f"{path}: bad manifest: {problem}")
    return manifest


def index_entries(index: pa.Table, where: str = "index") -> list[Entry] | None:
    """The written samples of an index (:func:`read_index`) in tar order; None when it
    predates byte ranges; :class:`ShardFileError` when its ranges cannot be right (negative,
    empty, overlapping or past the end of the tar it describes)."""
    rows = [r for r in index.to_pylist() if r["status"] in (None, "written")]
    if any(r["offset"] is None or r["length"] is None for r in rows):
        return None
    rows.sort(key=lambda r: r["offset"])
    entries, end = [], 0
    for r in rows:
        if r["offset"] < end or r["length"] <= 0 or r["offset"] + r["length"] > r["tar_bytes"]:
            raise ShardFileError(
                f"{where}: byte range {r['offset']}+{r['length']} of {r['key']} does not fit "
                f"its tar of {r['tar_bytes']} bytes after byte {end}"
            )
        entries.append(Entry(r["key"], int(r["offset"]), int(r["length"])))
        end = r["offset"] + r["length"]
    return entries


def filtered_count(quarantine: pa.Table) -> int:
    """Quarantine records of kind ``filtered`` (expected non-samples, not errors)."""
    return quarantine.column("kind").to_pylist().count("filtered")


def status(out: str) -> dict[str, dict[str, Any]]:
    """Per subset: written, quarantined, shards, bytes, read from the indexes so
    it is right while a job is still running. Raises :class:`ShardFileError` naming a
    damaged file, FileNotFoundError for a missing output folder."""
    fs, root = filesystem(out)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{out}: output folder does not exist")
    result = {}
    for subset in subsets_in(out):
        index = read_indexes(out, subset)
        shard_bytes = dict(
            zip(
                index.column("shard").to_pylist(),
                index.column("tar_bytes").to_pylist(),
                strict=True,
            )
        )
        quarantine = read_quarantine(out, subset)
        filtered = filtered_count(quarantine)
        result[subset] = {
            "written": index.num_rows,
            "quarantined": quarantine.num_rows - filtered,
            "filtered": filtered,
            "shards": len(shard_bytes),
            "bytes": int(sum(shard_bytes.values())),
            "errors": dict(Counter(quarantine.column("error").to_pylist())),
        }
    return result
