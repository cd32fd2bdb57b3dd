"""``onegen datagen verify``: every tar re-read against its index and manifest, and the
accounting checked (written + quarantined + filtered, each key once)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from datagen.schema import SchemaError, validate_sample
from datagen.shards.index import list_paths, read_parquet
from datagen.shards.layout import (
    MANIFEST,
    QUARANTINE_DIR,
    QUARANTINE_OPTIONAL,
    QUARANTINE_SCHEMA,
    ShardFileError,
    filesystem,
    list_entries,
    subsets_in,
)
from datagen.shards.reader import ShardReader
from datagen.shards.tar import TarFormatError, read_tar_samples, sample_files


@dataclass
class VerifyReport:
    checked_shards: int = 0
    checked_samples: int = 0
    defects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects


def _check_ranges(data: bytes, index: list[dict[str, Any]]) -> str | None:
    """Whether each index row's byte range reads back as exactly its own sample."""
    view = memoryview(data)
    for row in index:
        offset, length = row["offset"], row["length"]
        if offset is None or length is None:
            continue  # an index from before byte ranges: readers scan the tar instead
        try:
            ok = (
                offset >= 0
                and length > 0
                and bool(sample_files(view[offset : offset + length], row["key"]))
            )
        except TarFormatError:
            ok = False
        if not ok:
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
    reader: ShardReader,
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
    try:
        table = reader.index(subset, name)
        if table is None:
            defect(f"{where}: has no index")
            return None
        index = table.to_pylist()
        with reader.fs.open(f"{reader.directory(subset)}/{name}", "rb") as fh:
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
    except TarFormatError as exc:
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
        paths = list_paths(fs, f"{directory}/{QUARANTINE_DIR}", ".parquet")
    except ShardFileError as exc:
        report.defects.append(str(exc))
        return keys
    for path in paths:
        try:
            keys.update(
                read_parquet(fs, path, QUARANTINE_SCHEMA, QUARANTINE_OPTIONAL)
                .column("key")
                .to_pylist()
            )
        except ShardFileError as exc:
            report.defects.append(str(exc))
    return keys


def _verify_subset(out: str, subset: str, report: VerifyReport) -> None:
    reader = ShardReader(out)
    fs, directory, defect = reader.fs, reader.directory(subset), report.defects.append
    try:
        manifest = reader.manifest(subset)
        if manifest is None:
            defect(f"{subset}: {MANIFEST} is missing (run incomplete?)")
            manifest = {"shards": []}
    except ShardFileError as exc:
        defect(str(exc))
        manifest = None  # unusable: check the shards against their indexes only
    try:
        tars = {p.rsplit("/", 1)[-1]: kind for p, kind in list_entries(fs, directory, ".tar")}
        indexes = {
            p.rsplit("/", 1)[-1][: -len(".parquet")] for p in list_paths(fs, directory, ".parquet")
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
            keys = _verify_shard(reader, subset, name, kind, in_manifest.get(name), report)
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
