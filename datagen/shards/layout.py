"""The layout of an output folder: where every file of a subset lives and what it is named.

    OUT/<subset>/<subset>-<digest>.tar       the samples
    OUT/<subset>/<subset>-<digest>.parquet   its index: one row per key, sizes, tar sha256
    OUT/<subset>/quarantine/<digest>.parquet rejected keys: key, uri, stage, error, message
    OUT/<subset>/manifest.json               shards, counts, checksums, versions, and
                                             the MLflow runs that wrote it (datagen_runs)

Shard names are a digest of their keys, so a retried task rewrites the same name instead of
duplicating samples. The schemas of the index and quarantine tables are defined here, once,
for the writer, the readers and verify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import fsspec
import pyarrow as pa

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
        ("kind", pa.string()),  # error | filtered (an expected non-sample); null in old files
        ("error", pa.string()),
        ("message", pa.string()),
        ("time", pa.float64()),
    ]
)
QUARANTINE_OPTIONAL = frozenset({"kind"})
MANIFEST = "manifest.json"
# manifest["datagen_runs"]: the MLflow runs that wrote the subset, oldest first, one entry
# per run id: {"run_id", "tracking_uri", "experiment"}. Training links a fit to them.
DATAGEN_RUNS = "datagen_runs"
DATAGEN_RUN_KEYS = ("run_id", "tracking_uri", "experiment")
MANIFEST_VOLATILE = frozenset({"updated", DATAGEN_RUNS})
QUARANTINE_DIR = "quarantine"
TMP_MARK = ".tmp-"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def digest_name(subset: str, keys: Iterable[str]) -> str:
    return f"{subset}-{hashlib.sha1(chr(10).join(sorted(keys)).encode()).hexdigest()[:16]}"


# --- reading the bookkeeping back ---------------------------------------------------------


class ShardFileError(ValueError):
    """A file of an output folder (index, quarantine, manifest, tar) is unreadable or
    malformed. The message names the file, so a CLI can print one line, not a traceback."""


def subsets_in(out: str) -> list[str]:
    fs, root = filesystem(out)
    if not fs.isdir(root):
        return []
    return sorted(
        p.rsplit("/", 1)[-1]
        for p in fs.ls(root, detail=False)
        if fs.isdir(p) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )


def list_entries(
    fs: fsspec.AbstractFileSystem, directory: str, suffix: str
) -> list[tuple[str, str]]:
    """(path, type) of the visible entries ending in ``suffix``: type tells a file from a
    folder that merely has a file's name."""
    if not fs.exists(directory):
        return []
    try:
        listing = fs.ls(directory, detail=True)
    except OSError as exc:
        raise ShardFileError(f"{directory}: cannot list: {exc}") from exc
    return sorted(
        (e["name"], e.get("type", "file"))
        for e in listing
        if e["name"].endswith(suffix) and not e["name"].rsplit("/", 1)[-1].startswith(".")
    )
