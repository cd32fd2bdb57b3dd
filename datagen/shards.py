"""WebDataset shards that are either whole or invisible, and their bookkeeping.

Layout of an output folder::

    OUT/<subset>/<subset>-<digest>.tar       the samples
    OUT/<subset>/<subset>-<digest>.parquet   its index: one row per key, sizes, tar sha256
    OUT/<subset>/quarantine/<digest>.parquet rejected keys: key, uri, stage, error, message
    OUT/<subset>/manifest.json               shards, counts, checksums, versions, and
                                             the MLflow runs that wrote it (datagen_runs)

Commit protocol: the tar is written under a hidden temporary name and
renamed, then its index is written the same way. The index is the commit
record: a key is committed iff an index (or quarantine file) names it. A tar
without an index is an interrupted commit and :func:`clean_incomplete`
removes it before a rerun, which then writes those keys again. Shard names are
a digest of their keys, so a retried task rewrites the same name instead of
duplicating samples.

Reading back: :class:`ShardReader` (manifests, indexes with their fallbacks, byte-range
reads, whole tars) over :func:`iter_members`, the one tar walker (PAX headers included) that
training, verify, preview and the WebDataset source all use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.decode import BadInput, run_with_timeout
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


# --- walking tar members: the one implementation every reader uses -------------------------
#
# Training windows, the index-less scan, verify, preview and the WebDataset *source* (foreign,
# possibly hostile tars) all walk headers here. The walker checks every header (checksum,
# numbers, PAX records), follows PAX and GNU long names, never reads a payload it is not asked
# for (it seeks over them), caps what it reads itself (extended headers), and stops at a member
# whose data runs past the end it was told: a lying size field cannot make it read or loop.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = frozenset({b"0", b"\0", b"7"})  # file, old-style file, contiguous file
_NO_PAYLOAD = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})  # links, devices, dirs, FIFOs
_PAX = frozenset({b"x", b"X"})  # per-member extended header (X: Solaris)
_EXTENDED = _PAX | {b"g", b"L", b"K"}  # g: global PAX, L/K: GNU long name / link name
_GNU_TYPES = frozenset({b"L", b"K", b"S"})  # tarfile: no ustar prefix for these
MAX_EXTENDED_HEADER = 1 << 20  # bytes of one PAX / GNU long-name header: real ones are tiny
MAX_READ_BYTES = 1 << 30  # one range read (a window of samples) or one member's data
READ_TIMEOUT_S = 60.0  # one range read, as datagen.decode.read_bytes bounds every input read


class TarFormatError(ValueError):
    """A damaged tar: a bad header (checksum, number, PAX record), a truncated header or
    member, an oversized extended header. ``offset`` is the byte where the damage starts."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


class TarMember(NamedTuple):
    """One member as its headers describe it (extended headers already applied)."""

    name: str  # PAX / GNU long names applied; not UTF-8 bytes are surrogate-escaped
    offset: int  # its first header, PAX / GNU long-name headers included: a range starts here
    offset_data: int
    size: int  # bytes of data in the archive
    type: bytes  # the typeflag byte
    sparse: bool = False  # GNU sparse (old format or PAX): its data is not the file's bytes
    truncated: bool = False  # it (data or padding) runs past the end given: the walk stops

    @property
    def isfile(self) -> bool:
        return self.type in _REGULAR or self.sparse

    @property
    def end(self) -> int:
        """Where the next header starts."""
        if self.type in _NO_PAYLOAD:
            return self.offset_data
        return self.offset_data + -(-self.size // _BLOCK) * _BLOCK


class _ChunkSource:
    def __init__(self, data: bytes | bytearray | memoryview):
        self.view = memoryview(data)
        self.size = len(self.view)

    def read_at(self, pos: int, n: int) -> bytes:
        return bytes(self.view[pos : pos + n])


class _FileSource:
    def __init__(self, fh: BinaryIO, size: int | None):
        self.fh, self.size = fh, size

    def read_at(self, pos: int, n: int) -> bytes:
        self.fh.seek(pos)
        chunks, got = [], 0
        while got < n:  # raw (unbuffered) files may return less than asked
            chunk = self.fh.read(n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


def _source(source: Any, size: int | None) -> _ChunkSource | _FileSource:
    if isinstance(source, bytes | bytearray | memoryview):
        return _ChunkSource(source)
    return _FileSource(source, size)


def _number(field: bytes, what: str, pos: int) -> int:
    """A header number: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if text.isdigit():  # not "-1", "+7", "1_0", garbage or base-256 with 0xff (negative)
        try:
            return int(text, 8)
        except ValueError:  # an 8 or a 9
            pass
    raise TarFormatError(f"an invalid header at byte {pos} ({what} field {field!r})", pos)


def _checksum_ok(header: bytes, pos: int) -> bool:
    try:
        stored = _number(header[148:156], "checksum", pos)
    except TarFormatError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the field itself counts as spaces
    if stored == unsigned:
        return True
    high = sum(b > 127 for b in header) - sum(b > 127 for b in header[148:156])
    return stored == unsigned - 256 * high  # a signed sum, as tarfile also accepts


def _pax_info(data: bytes, pos: int = 0) -> tuple[str | None, int | None, bool]:
    """``(path, size, sparse)`` of a PAX extended header (records ``"<len> <key>=<value>\\n"``),
    the last record of a key winning as in tarfile. A malformed record or a path that is not
    UTF-8 (unless ``hdrcharset=BINARY``) is a :class:`TarFormatError`, never a hang on a zero
    length. The writer uses PAX for names over 100 bytes (long keys)."""
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data) and data[at] != 0:
        space = data.find(b" ", at)
        digits = data[at:space] if space > at else b""
        length = int(digits) if digits.isdigit() else 0
        end = at + length
        if length <= space - at + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise TarFormatError(f"malformed PAX record at byte {at} of an extended header", pos)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarFormatError(f"PAX record without '=' at byte {at} of an extended header", pos)
        records[key] = value
        at = end
    raw = records.get(b"GNU.sparse.name", records.get(b"path"))
    path = None
    if raw is not None:
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if records.get(b"hdrcharset") != b"BINARY":
                raise TarFormatError(f"PAX path is not UTF-8: {raw[:60]!r}", pos) from exc
            path = raw.decode("utf-8", "surrogateescape")
    size = None
    if b"size" in records:
        if not records[b"size"].isdigit():
            raise TarFormatError(f"PAX size {records[b'size'][:30]!r} is not a number", pos)
        size = int(records[b"size"])
    sparse = any(k.startswith(b"GNU.sparse.") for k in records)
    return path, size, sparse


def iter_members(source: Any, size: int | None = None) -> Iterator[TarMember]:
    """Every member of a tar, in order: ``source`` is the tar's bytes (or a range of them:
    offsets are relative to it) or a seekable binary file of ``size`` bytes (None: unknown,
    the walk ends where reads come back empty). Payloads are skipped, not read.

    Ends at an end-of-archive (zero) block or the end of the data. A member whose data (or its
    padding: the archive was cut there) runs past the end is yielded with ``truncated`` set
    and ends the walk. A damaged header, a
    truncated one, or an empty file raises :class:`TarFormatError` (with its ``offset``)."""
    src = _source(source, size)
    total = src.size
    pos, first, name, pax_size, sparse = 0, None, None, None, False
    while True:
        header = src.read_at(pos, _BLOCK)
        if not header:
            if pos == 0:
                raise TarFormatError("empty file: no tar header at byte 0", 0)
            if first is not None:
                raise TarFormatError(f"extended header at byte {first} describes no member", first)
            return
        if len(header) < _BLOCK:
            raise TarFormatError(f"a truncated header at byte {pos}", pos)
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header, pos):
            raise TarFormatError(f"an invalid header at byte {pos} (bad checksum)", pos)
        kind = header[156:157]
        length = _number(header[124:136], "size", pos)
        data_at = pos + _BLOCK
        if kind in _EXTENDED:
            if length > MAX_EXTENDED_HEADER:
                raise TarFormatError(
                    f"extended header at byte {pos} claims {length} bytes "
                    f"(> {MAX_EXTENDED_HEADER})",
                    pos,
                )
            padded = -(-length // _BLOCK) * _BLOCK
            data = src.read_at(data_at, padded)  # whole blocks, up to a NUL, as tarfile reads
            if len(data) < length:
                raise TarFormatError(f"extended header at byte {pos} is cut short", pos)
            if kind in _PAX:
                path, psize, psparse = _pax_info(data, pos)
                name = path if path is not None else name
                pax_size = psize if psize is not None else pax_size
                sparse = sparse or psparse
            elif kind == b"L":
                name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind != b"g" and first is None:  # a global header belongs to no one member
                first = pos
            pos = data_at + padded
            continue
        if kind == b"S":  # old GNU sparse: extension blocks before the data
            extended = header[482]
            while extended:
                block = src.read_at(data_at, _BLOCK)
                if len(block) < _BLOCK:
                    raise TarFormatError(f"sparse header at byte {data_at} is cut short", pos)
                extended, data_at = block[504], data_at + _BLOCK
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and kind not in _GNU_TYPES:
                name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old-style directory, as tarfile reads it
        if kind == b"5":
            name = name.rstrip("/")
        if pax_size is not None:
            length = pax_size
        padded_end = data_at + (0 if kind in _NO_PAYLOAD else -(-length // _BLOCK) * _BLOCK)
        truncated = total is not None and padded_end > total
        member = TarMember(
            name=name,
            offset=pos if first is None else first,
            offset_data=data_at,
            size=length,
            type=kind,
            sparse=sparse or kind == b"S",
            truncated=truncated,
        )
        yield member
        if truncated:
            return
        pos, first, name, pax_size, sparse = member.end, None, None, None, False


def member_data(source: Any, member: TarMember, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """A member's data from the bytes or the file it was walked in; more than ``max_bytes``
    or data cut short is a :class:`TarFormatError`."""
    if member.size > max_bytes:
        raise TarFormatError(
            f"member {member.name} has {member.size} bytes > {max_bytes}", member.offset
        )
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source[member.offset_data : member.offset_data + member.size])
    else:
        data = _FileSource(source, None).read_at(member.offset_data, member.size)
    if len(data) < member.size:
        raise TarFormatError(
            f"member {member.name} at byte {member.offset} is cut short "
            f"({len(data)} of {member.size} bytes)",
            member.offset,
        )
    return data


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name as WebDataset groups it: the key is everything before
    the first dot of the base name (folders kept), the field the rest, lowercased. None for a
    name without a dot in its base name (not part of any sample)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    stem, field = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, field.lower()


def _files(source: Any, size: int | None, max_bytes: int) -> Iterator[tuple[TarMember, bytes]]:
    """The regular members and their data; strict, for One-Gen shards: a truncated or a
    sparse member is a :class:`TarFormatError`."""
    for member in iter_members(source, size):
        if member.truncated:
            raise TarFormatError(
                f"member {member.name} at byte {member.offset} is cut short "
                f"({member.size} bytes from byte {member.offset_data}, padded, past the end)",
                member.offset,
            )
        if member.sparse:
            raise TarFormatError(f"member {member.name} is a sparse file", member.offset)
        if member.isfile:
            yield member, member_data(source, member, max_bytes)


def parse_members(chunk: bytes | memoryview) -> list[tuple[str, bytes]]:
    """``(name, data)`` of the regular files in a tar or a byte range of one (a training
    window), every header checked. Stops at the end of the chunk or a zero block."""
    return [(m.name, data) for m, data in _files(chunk, None, MAX_READ_BYTES)]


def iter_samples(
    source: Any, size: int | None = None, max_bytes: int = MAX_READ_BYTES
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: data})`` per sample, in tar order, grouped as WebDataset groups them
    (consecutive members with one key; members without a field are skipped)."""
    key, files = None, {}
    for member, data in _files(source, size, max_bytes):
        parts = split_name(member.name)
        if parts is None:
            continue
        if parts[0] != key:
            if key is not None:
                yield key, files
            key, files = parts[0], {}
        files[parts[1]] = data
    if key is not None:
        yield key, files


def read_tar_samples(data: bytes | memoryview) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a tar's bytes, in order (see :func:`iter_samples`)."""
    return list(iter_samples(data))


def sample_files(chunk: bytes | memoryview, expected_key: str) -> dict[str, bytes]:
    """One sample's fields from its byte range; every member must belong to
    ``expected_key`` (a mismatch means the index and the tar disagree)."""
    files: dict[str, bytes] = {}
    for name, data in parse_members(chunk):
        parts = split_name(name)
        if parts is None or parts[0] != expected_key:
            raise TarFormatError(
                f"member {name!r} found where the index puts sample {expected_key!r}"
            )
        files[parts[1]] = data
    if not files:
        raise TarFormatError(f"no members for sample {expected_key!r}")
    return files


class Entry(NamedTuple):
    """Where one sample lies in its tar: its members, headers and padding included."""

    key: str
    offset: int
    length: int


def scan_entries(source: Any, size: int | None = None) -> list[Entry]:
    """Each sample's :class:`Entry` by walking the headers (payloads are skipped): what an
    index without byte ranges lacks. A sample runs to where the next one starts."""
    entries: list[Entry] = []
    key, start, end = None, 0, 0
    for member in iter_members(source, size):
        if member.truncated:
            raise TarFormatError(
                f"member {member.name} at byte {member.offset} runs past the end of the tar",
                member.offset,
            )
        parts = split_name(member.name) if member.isfile else None
        if parts is None:
            continue
        if parts[0] != key:
            if key is not None:
                entries.append(Entry(key, start, member.offset - start))
            key, start = parts[0], member.offset
        end = member.end
    if key is not None:
        entries.append(Entry(key, start, end - start))
    return entries


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
    tables = [_read_parquet(fs, p, QUARANTINE_SCHEMA, QUARANTINE_OPTIONAL) for p in paths]
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
        DATAGEN_RUNS: runs,
    }
    atomic_write(
        fs, f"{root}/{subset}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    return manifest


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


def read_manifest(out: str, subset: str) -> dict[str, Any] | None:
    """The subset's manifest, None if it has none; :class:`ShardFileError` if damaged."""
    return ShardReader(out).manifest(subset)


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


# --- the one shard reader ------------------------------------------------------------------


def _open_tar(fs: fsspec.AbstractFileSystem, path: str) -> tuple[BinaryIO, int | None]:
    """An open tar and its size (None when the store does not say). Only a regular file is
    opened: a FIFO would block, a device never end. Failures: OSError, ShardFileError."""
    if is_local(fs):
        st = os.stat(path)  # follows links: a dangling one is FileNotFoundError
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ShardFileError(f"{path}: is {kind}")
        return fs.open(path, "rb"), st.st_size
    info = fs.info(path)
    if info.get("type", "file") != "file":
        raise ShardFileError(f"{path}: is not a regular file ({info.get('type')})")
    size = info.get("size")
    return fs.open(path, "rb"), int(size) if size is not None else None


def read_range(
    fs: fsspec.AbstractFileSystem,
    path: str,
    start: int,
    end: int,
    *,
    max_bytes: int = MAX_READ_BYTES,
    timeout_s: float | None = READ_TIMEOUT_S,
) -> bytes:
    """Bytes ``[start, end)`` of a shard in one request; shorter when the file is truncated
    (the samples there are cut short). The size is checked against ``max_bytes`` before
    reading and the read must finish within ``timeout_s``, as every input read is
    (:func:`datagen.decode.read_bytes`). Failures: OSError or :class:`ShardFileError`."""
    if start < 0 or end < start:
        raise ShardFileError(f"{path}: bad byte range [{start}, {end})")
    if end - start > max_bytes:
        raise ShardFileError(f"{path}: a range of {end - start} bytes > max_bytes={max_bytes}")

    def read(_cancelled: Any) -> bytes:
        if not is_local(fs):
            return fs.cat_file(path, start=start, end=end)
        fh, _ = _open_tar(fs, path)
        with fh:
            return _FileSource(fh, None).read_at(start, end - start)

    try:
        return run_with_timeout(read, timeout_s, path)
    except BadInput as exc:  # ReadTimeout
        raise ShardFileError(exc.message) from exc


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


class ShardReader:
    """Reads One-Gen shards back: the one reader that training, verify, preview and the
    WebDataset tooling share (tar walking itself: :func:`iter_members`).

    ``root`` is a datagen output folder (``<root>/<subset>/``) or one subset folder (holding
    ``manifest.json``), local or any fsspec URL. Shards are tar names as the manifest lists
    them (``<subset>-<digest>.tar``). Damage is a :class:`ShardFileError` naming the file,
    except where a fallback is documented (:meth:`entries`)."""

    def __init__(
        self,
        root: str,
        *,
        max_read_bytes: int = MAX_READ_BYTES,
        timeout_s: float | None = READ_TIMEOUT_S,
    ):
        self.root = str(root)
        self.fs, self.path = filesystem(self.root)
        self._url = self.root.rstrip("/") if "://" in self.root else self.path
        self.max_read_bytes, self.timeout_s = max_read_bytes, timeout_s
        self._where: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"ShardReader({self.root!r})"

    # -- where things are --

    def subsets(self, with_manifest: bool = False) -> list[str]:
        """The subset folders under the root (only those holding a manifest, if asked)."""
        names = subsets_in(self.root)
        if with_manifest:
            names = [s for s in names if self.fs.exists(f"{self.path}/{s}/{MANIFEST}")]
        return names

    def _locate(self, subset: str) -> tuple[str, str]:
        if subset not in self._where:
            where = (f"{self.path}/{subset}", f"{self._url}/{subset}")
            if not self.fs.exists(f"{where[0]}/{MANIFEST}") and self.fs.exists(
                f"{self.path}/{MANIFEST}"
            ):
                where = (self.path, self._url)  # the root is the subset folder itself
            self._where[subset] = where
        return self._where[subset]

    def directory(self, subset: str) -> str:
        """The subset's folder (a path on :attr:`fs`): ``<root>/<subset>``, or the root when
        that holds the manifest and ``<root>/<subset>`` does not."""
        return self._locate(subset)[0]

    def url(self, subset: str, shard: str) -> str:
        """The tar's URL (a plain path when local), for any WebDataset reader."""
        return f"{self._locate(subset)[1]}/{shard}"

    # -- bookkeeping --

    def manifest(self, subset: str) -> dict[str, Any] | None:
        """The subset's checked manifest (:func:`manifest_problem`), None if it has none."""
        path = f"{self.directory(subset)}/{MANIFEST}"
        return read_manifest_file(self.fs, path) if self.fs.exists(path) else None

    def shards(self, subset: str) -> list[str]:
        """Tar names: the manifest's, or without a manifest the tar files present."""
        manifest = self.manifest(subset)
        if manifest is not None:
            return [s["name"] for s in manifest["shards"]]
        entries = list_entries(self.fs, self.directory(subset), ".tar")
        return [p.rsplit("/", 1)[-1] for p, kind in entries if kind == "file"]

    def urls(self, subset: str) -> list[str]:
        """The manifest's tar URLs; FileNotFoundError without a manifest."""
        if self.manifest(subset) is None:
            raise FileNotFoundError(
                f"{self.root}/{subset}/{MANIFEST} is missing: run or finish the DAG first"
            )
        return [self.url(subset, name) for name in self.shards(subset)]

    def index(self, subset: str, shard: str) -> pa.Table | None:
        """The index beside the tar (:func:`read_index`), None if there is none."""
        path = f"{self.directory(subset)}/{shard.removesuffix('.tar')}.parquet"
        return read_index(self.fs, path) if self.fs.exists(path) else None

    def entries(self, subset: str, shard: str) -> list[Entry]:
        """Each written sample's :class:`Entry`, in tar order, from the index; a header scan
        of the tar where there is no index or it predates byte ranges, and, with a warning,
        where it is damaged. :class:`ShardFileError` when the tar does not scan either."""
        try:
            index = self.index(subset, shard)
            found = index_entries(index, self.url(subset, shard)) if index is not None else None
        except ShardFileError as exc:
            warnings.warn(f"{exc}; scanning the tar instead", stacklevel=2)
            found = None
        return found if found is not None else self.scan(subset, shard)

    # -- the tars --

    def scan(self, subset: str, shard: str) -> list[Entry]:
        """:func:`scan_entries` of the tar: headers only, payloads skipped."""
        path = f"{self.directory(subset)}/{shard}"
        try:
            fh, size = _open_tar(self.fs, path)
            with fh:
                return scan_entries(fh, size)
        except (OSError, TarFormatError) as exc:
            raise ShardFileError(f"{path}: the tar does not scan: {exc}") from exc

    def read_range(self, subset: str, shard: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the tar (:func:`read_range`: bounded, maybe short)."""
        return read_range(
            self.fs,
            f"{self.directory(subset)}/{shard}",
            start,
            end,
            max_bytes=self.max_read_bytes,
            timeout_s=self.timeout_s,
        )

    def sample(self, subset: str, shard: str, entry: Entry) -> dict[str, bytes]:
        """One sample's fields (``{"jpg": ..., "json": ...}``) with one range read;
        :class:`TarFormatError` when it is cut short or its members are not its own."""
        data = self.read_range(subset, shard, entry.offset, entry.offset + entry.length)
        if len(data) < entry.length:
            raise TarFormatError(
                f"{self.url(subset, shard)}: sample {entry.key} is cut short (truncated tar)"
            )
        return sample_files(data, entry.key)

    def samples(self, subset: str, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Every sample of one tar, streamed: one member in memory at a time, each at most
        ``max_read_bytes``. Damage is a :class:`ShardFileError` naming the tar."""
        path = f"{self.directory(subset)}/{shard}"
        try:
            fh, size = _open_tar(self.fs, path)
            with fh:
                yield from iter_samples(fh, size, self.max_read_bytes)
        except (OSError, TarFormatError) as exc:
            raise ShardFileError(f"{path}: unreadable tar: {exc}") from exc


def shard_urls(out: str, subset: str) -> list[str]:
    """The subset's tar URLs from its manifest, for any WebDataset reader."""
    return ShardReader(out).urls(subset)


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
        paths = _list(fs, f"{directory}/{QUARANTINE_DIR}", ".parquet")
    except ShardFileError as exc:
        report.defects.append(str(exc))
        return keys
    for path in paths:
        try:
            keys.update(
                _read_parquet(fs, path, QUARANTINE_SCHEMA, QUARANTINE_OPTIONAL)
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
