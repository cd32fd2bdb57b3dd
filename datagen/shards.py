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


def tar_with_ranges(
    samples: list[tuple[str, Mapping[str, bytes]]],
) -> tuple[bytes, list[tuple[int, int]]]:
    """The tar and each sample's (offset, length) in it.

    PAX format so every allowed key fits: ustar names hold 100 bytes and a
    200-char key plus ``.intrinsics.npy`` does not. tarfile adds a PAX extended
    header only to members that need one, so tars of short names are
    byte-identical to ustar ones (same checksums). A sample's range starts at
    its first header, PAX header included, so a range read parses alone.
    """
    buf = io.BytesIO()
    ranges: list[tuple[int, int]] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
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


def _list(fs: fsspec.AbstractFileSystem, directory: str, suffix: str) -> list[str]:
    return [p for p, _ in list_entries(fs, directory, suffix)]


def _read_parquet(
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
    return _read_parquet(
        fs,
        path,
        INDEX_SCHEMA,
        frozenset({"offset", "length"}),
        ("key", "shard", "tar_bytes", "tar_sha256"),
    )


def read_indexes(out: str, subset: str) -> pa.Table:
    """Every index of ``subset``; raises :class:`ShardFileError` naming a damaged one."""
    fs, root = filesystem(out)
    tables = [read_index(fs, p) for p in _list(fs, f"{root}/{subset}", ".parquet")]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def read_quarantine(out: str, subset: str) -> pa.Table:
    """Every quarantine file of ``subset``; raises :class:`ShardFileError` naming a damaged one."""
    fs, root = filesystem(out)
    paths = _list(fs, f"{root}/{subset}/{QUARANTINE_DIR}", ".parquet")
    tables = [_read_parquet(fs, p, QUARANTINE_SCHEMA) for p in paths]
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()


def committed_keys(out: str, subset: str) -> set[str]:
    keys = set(read_indexes(out, subset).column("key").to_pylist())
    keys.update(read_quarantine(out, subset).column("key").to_pylist())
    return keys


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
) -> dict[str, Any]:
    """Summarise a subset from its indexes (all runs, not just the last); ``index`` and
    ``quarantine`` are read here unless the caller already holds them."""
    fs, root = filesystem(out)
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
        "quarantined": quarantine.num_rows,
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
    }
    atomic_write(
        fs, f"{root}/{subset}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    return manifest


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
    return f"{bad} are not integers" if bad else None


def read_manifest(out: str, subset: str) -> dict[str, Any] | None:
    """The subset's manifest, None if it has none; :class:`ShardFileError` if damaged."""
    fs, root = filesystem(out)
    path = f"{root}/{subset}/{MANIFEST}"
    if not fs.exists(path):
        return None
    return read_manifest_file(fs, path)


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


def shard_urls(out: str, subset: str) -> list[str]:
    """The subset's tar URLs from its manifest, for any WebDataset reader."""
    manifest = read_manifest(out, subset)
    if manifest is None:
        raise FileNotFoundError(
            f"{out}/{subset}/{MANIFEST} is missing: run or finish the DAG first"
        )
    _, root = filesystem(out)
    prefix = out.rstrip("/") if "://" in out else root
    return [f"{prefix}/{subset}/{s['name']}" for s in manifest["shards"]]


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


def _check_ranges(data: bytes, index: list[dict[str, Any]]) -> str | None:
    """Whether each index row's byte range reads back as exactly its own sample."""
    for row in index:
        if row["offset"] is None or row["length"] is None:
            continue  # an index from before byte ranges: readers scan the tar instead
        chunk = data[row["offset"] : row["offset"] + row["length"]]
        try:
            got = read_tar_samples(chunk + b"\0" * 1024)
        except (tarfile.TarError, EOFError, OSError, ValueError):
            got = []
        if [k for k, _ in got] != [row["key"]]:
            return f"byte range of {row['key']} is wrong"
    return None


def _check_samples(
    subset: str, where: str, samples: list[tuple[str, dict[str, bytes]]], report: VerifyReport
) -> None:
    for key, files in samples:
        report.checked_samples += 1
        try:
            validate_sample(subset, {"__key__": key, **files})
        except SchemaError as exc:
            report.defects.append(f"{where}: {exc}")
        except (TypeError, KeyError, AttributeError) as exc:  # metadata of the wrong shape
            report.defects.append(f"{where}: {key}: metadata breaks the schema: {exc!r}")


def _verify_shard(
    fs: fsspec.AbstractFileSystem,
    directory: str,
    subset: str,
    name: str,
    kind: str,
    listed: Mapping[str, Any] | None,
    report: VerifyReport,
) -> list[str] | None:
    """Check one tar against its index and manifest entry; return the keys it holds, or
    None when it could not be read (its samples are then not counted)."""
    where, defect = f"{subset}/{name}", report.defects.append
    if kind != "file":
        defect(f"{where}: not a regular file ({kind})")
        return None
    index_path = f"{directory}/{name[:-4]}.parquet"
    if not fs.exists(index_path):
        defect(f"{where}: has no index")
        return None
    try:
        index = read_index(fs, index_path).to_pylist()
        with fs.open(f"{directory}/{name}", "rb") as fh:
            data = fh.read()
    except ShardFileError as exc:
        defect(str(exc))
        return None
    except OSError as exc:
        defect(f"{where}: unreadable: {exc}")
        return None
    sha = hashlib.sha256(data).hexdigest()
    expected = {row["tar_sha256"] for row in index} | ({listed["sha256"]} if listed else set())
    if expected != {sha}:
        defect(f"{where}: sha256 {sha[:12]} does not match {sorted(e[:12] for e in expected)}")
    if any(row["tar_bytes"] != len(data) for row in index) or (
        listed and listed["bytes"] != len(data)
    ):
        defect(f"{where}: size {len(data)} differs from its index or manifest")
    if listed and listed["samples"] != len(index):
        defect(f"{where}: manifest says {listed['samples']} samples, its index {len(index)}")
    try:
        samples = read_tar_samples(data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        defect(f"{where}: unreadable tar: {exc}")
        return None
    if [k for k, _ in samples] != [row["key"] for row in index]:
        defect(f"{where}: keys in the tar differ from its index")
    problem = _check_ranges(data, index)
    if problem:
        defect(f"{where}: {problem}")
    _check_samples(subset, where, samples, report)
    return [k for k, _ in samples]


def _quarantined_keys(
    fs: fsspec.AbstractFileSystem, directory: str, report: VerifyReport
) -> set[str]:
    """Keys of every readable quarantine file; each damaged one is a defect of its own."""
    keys: set[str] = set()
    try:
        paths = _list(fs, f"{directory}/{QUARANTINE_DIR}", ".parquet")
    except ShardFileError as exc:
        report.defects.append(str(exc))
        return keys
    for path in paths:
        try:
            keys.update(_read_parquet(fs, path, QUARANTINE_SCHEMA).column("key").to_pylist())
        except ShardFileError as exc:
            report.defects.append(str(exc))
    return keys


def _verify_subset(out: str, subset: str, report: VerifyReport) -> None:
    fs, root = filesystem(out)
    directory, defect = f"{root}/{subset}", report.defects.append
    try:
        manifest = read_manifest(out, subset)
        if manifest is None:
            defect(f"{subset}: {MANIFEST} is missing (run incomplete?)")
            manifest = {"shards": []}
    except ShardFileError as exc:
        defect(str(exc))
        manifest = None  # unusable: check the shards against their indexes only
    try:
        tars = {p.rsplit("/", 1)[-1]: kind for p, kind in list_entries(fs, directory, ".tar")}
        indexes = {
            p.rsplit("/", 1)[-1][: -len(".parquet")] for p in _list(fs, directory, ".parquet")
        }
    except ShardFileError as exc:
        defect(str(exc))
        return
    in_manifest = {s["name"]: s for s in manifest["shards"]} if manifest else {}
    if manifest is not None:
        for name in sorted(set(in_manifest) - set(tars)):
            defect(f"{subset}/{name}: listed in the manifest but missing")
        for name in sorted(set(tars) - set(in_manifest)):
            defect(f"{subset}/{name}: present but not in the manifest")
    for base in sorted(indexes - {n[:-4] for n in tars}):
        defect(
            f"{subset}/{base}.parquet: index without its tar {base}.tar (its keys count as committed)"
        )
    seen: Counter[str] = Counter()
    complete = True  # every tar read: only then can the manifest's count be checked
    for name, kind in sorted(tars.items()):
        report.checked_shards += 1
        try:
            keys = _verify_shard(fs, directory, subset, name, kind, in_manifest.get(name), report)
        except Exception as exc:  # the last resort: verify reports a defect, never a traceback
            defect(f"{subset}/{name}: cannot be checked: {type(exc).__name__}: {exc}")
            keys = None
        complete = complete and keys is not None
        seen.update(keys or [])
    duplicates = [k for k, c in seen.items() if c > 1]
    if duplicates:
        defect(f"{subset}: {len(duplicates)} keys written more than once, e.g. {duplicates[:3]}")
    both = _quarantined_keys(fs, directory, report) & set(seen)
    if both:
        defect(f"{subset}: {len(both)} keys both written and quarantined, e.g. {sorted(both)[:3]}")
    written = manifest.get("written") if manifest else None
    if complete and written is not None and manifest["shards"] and written != sum(seen.values()):
        defect(f"{subset}: manifest says {written} written, tars hold {sum(seen.values())}")


def verify(out: str, subsets: list[str] | None = None) -> VerifyReport:
    """Re-read every tar and index; report any defect, never raise on damaged data.

    Checks: the folder and its files are readable, manifest vs index vs tar
    agree (names, counts, sizes, sha256), every index has its tar, every tar
    parses and its byte ranges address its samples, every sample passes the
    schema, keys are unique across the subset, and no key is both written and
    quarantined."""
    fs, root = filesystem(out)
    report = VerifyReport()
    try:
        if not fs.exists(root):
            report.defects.append(f"{out}: output folder does not exist")
            return report
        if not fs.isdir(root):
            report.defects.append(f"{out}: is not a folder")
            return report
        names = subsets if subsets is not None else subsets_in(out)
    except OSError as exc:
        report.defects.append(f"{out}: cannot list: {exc}")
        return report
    if not names:
        report.defects.append(f"{out}: no subsets found")
    for subset in names:
        _verify_subset(out, subset, report)
    return report
