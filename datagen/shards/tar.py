"""Tar bytes in and out: writing one shard's members together, and the one tar walker
(PAX and GNU long names included, every header checked) that training, verify, preview and
the WebDataset source all read through, over a file or a byte range of one."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NamedTuple


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
READ_TIMEOUT_S = 60.0  # one range read, as datagen.io.read_bytes bounds every input read


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


class FileSource:
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


def _source(source: Any, size: int | None) -> _ChunkSource | FileSource:
    if isinstance(source, bytes | bytearray | memoryview):
        return _ChunkSource(source)
    return FileSource(source, size)


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
        data = FileSource(source, None).read_at(member.offset_data, member.size)
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
