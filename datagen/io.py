"""Untrusted reads: regular files only, the size cap checked before reading, a timeout on
every read, so FIFOs, devices, huge sparse files and reads that never return end as a
:class:`BadInput` with a stable ``error`` class instead of a hung or killed worker.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
READ_CHUNK = 4 << 20  # bytes per read call: a cancelled read stops within one chunk


class BadInput(Exception):
    """An input that cannot become a sample. ``error`` is a stable class name."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message


@dataclass(frozen=True)
class DecodeParams:
    """Limits on one input. ``max_aspect_ratio``: long side / short side, the
    widest aspect-ratio bucket training uses (None: no limit)."""

    min_side: int = 64
    max_pixels: int = 64_000_000
    max_bytes: int = 200_000_000
    max_aspect_ratio: float | None = 4.0
    read_timeout_s: float | None = 60.0


_DEFAULTS = DecodeParams()


# --- reading: regular files only, size capped before reading, bounded in time ------------


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _check_mode(uri: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise BadInput("NotAFile", f"{uri} is a directory")
    if not stat.S_ISREG(mode):
        raise BadInput("NotARegularFile", f"{uri} is {_file_kind(mode)}, not a regular file")


def _os_error(uri: str, exc: OSError) -> BadInput:
    if isinstance(exc, FileNotFoundError):
        return BadInput("MissingFile", f"{uri} does not exist")
    if isinstance(exc, IsADirectoryError):
        return BadInput("NotAFile", f"{uri} is a directory")
    return BadInput("Unreadable", f"{uri}: {exc}")


def _open_local(uri: str, path: str) -> tuple[BinaryIO, int]:
    """Stat, then open without blocking and stat the open file again: a path
    swapped for a FIFO or device between the two cannot block or be read."""
    try:
        _check_mode(uri, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise _os_error(uri, exc) from exc
    try:
        st = os.fstat(fd)
        _check_mode(uri, st.st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _open_remote(uri: str, fs: Any, path: str) -> tuple[BinaryIO, int | None]:
    """fsspec's ``info`` stands in for ``stat``: only ``type == file`` is read."""
    try:
        info = fs.info(path)
    except OSError as exc:
        raise _os_error(uri, exc) from exc
    kind = info.get("type")
    if kind == "directory":
        raise BadInput("NotAFile", f"{uri} is a directory")
    if kind != "file":
        raise BadInput("NotARegularFile", f"{uri} is of type {kind!r}, not a regular file")
    size = info.get("size")
    try:
        return fs.open(path, "rb"), int(size) if size is not None else None
    except OSError as exc:
        raise _os_error(uri, exc) from exc


def open_regular(uri: str) -> tuple[BinaryIO, int | None]:
    """An open binary file and its size (None if the store does not say), or
    :class:`BadInput` for anything that is not a regular file."""
    if not isinstance(uri, str) or not uri:
        raise BadInput("BadUri", f"input uri {uri!r} is empty or not a string")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise BadInput("BadUri", f"{uri}: {exc}") from exc
    if isinstance(fs, LocalFileSystem):
        return _open_local(uri, path)
    return _open_remote(uri, fs, path)


def _byte_range(
    uri: str, file_size: int | None, offset: int | None, size: int | None, max_bytes: int
) -> tuple[int, int | None]:
    """``(start, bytes to read)``, checked against the file and ``max_bytes``
    before a single byte is read; ``None`` bytes: unknown size, read to the end."""
    start = 0 if offset is None else int(offset)
    if start < 0 or (size is not None and int(size) < 0):
        raise BadInput("BadByteRange", f"{uri}: negative byte range offset={offset} size={size}")
    if file_size is not None and start > file_size:
        raise BadInput(
            "BadByteRange", f"{uri}: offset {start} is past the end of the file ({file_size} bytes)"
        )
    length = (
        int(size) if size is not None else (file_size - start if file_size is not None else None)
    )
    if length is not None and file_size is not None and start + length > file_size:
        raise BadInput(
            "BadByteRange",
            f"{uri}: bytes {start}..{start + length} run past the end of the file ({file_size} bytes)",
        )
    if length is not None and length > max_bytes:
        raise BadInput("TooLarge", f"{uri}: {length} bytes > max_bytes={max_bytes}")
    return start, length


def _read_exactly(
    uri: str, fh: BinaryIO, length: int | None, max_bytes: int, cancelled: threading.Event
) -> bytes:
    """At most ``length`` bytes (or ``max_bytes + 1`` when unknown), in chunks
    so an abandoned read stops at the next chunk."""
    limit = length if length is not None else max_bytes + 1
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        if cancelled.is_set():
            raise BadInput("ReadTimeout", f"{uri}: read abandoned")
        chunk = fh.read(min(READ_CHUNK, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if length is None and got > max_bytes:
        raise BadInput("TooLarge", f"{uri}: more than max_bytes={max_bytes} bytes")
    if length is not None and got < length:
        raise BadInput("ShortRead", f"{uri}: the file ended after {got} of {length} bytes")
    return b"".join(chunks)


def _read(
    uri: str, offset: int | None, size: int | None, max_bytes: int, cancelled: threading.Event
) -> bytes:
    fh, file_size = open_regular(uri)
    with fh:
        start, length = _byte_range(uri, file_size, offset, size, max_bytes)
        try:
            if start:
                fh.seek(start)
            return _read_exactly(uri, fh, length, max_bytes, cancelled)
        except OSError as exc:
            raise _os_error(uri, exc) from exc


def run_with_timeout(fn: Callable[[threading.Event], T], timeout_s: float | None, what: str) -> T:
    """``fn(cancelled)`` in a daemon thread; :class:`BadInput` ``ReadTimeout``
    after ``timeout_s``. A read stuck in the kernel cannot be interrupted from
    Python, so the thread is abandoned (it is told to stop via ``cancelled``)
    and the job moves on instead of hanging with it."""
    cancelled = threading.Event()
    if timeout_s is None or timeout_s <= 0:
        return fn(cancelled)
    done = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"onegen-read {what[:80]}", daemon=True).start()
    if not done.wait(timeout_s):
        cancelled.set()
        raise BadInput("ReadTimeout", f"{what}: no data after {timeout_s:g} s (read_timeout_s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_bytes(
    uri: str,
    offset: int | None = None,
    size: int | None = None,
    *,
    max_bytes: int = _DEFAULTS.max_bytes,
    timeout_s: float | None = _DEFAULTS.read_timeout_s,
) -> bytes:
    """Bytes of a local path or fsspec URL, or of a byte range in it (tar members).

    Only regular files are opened; the size (of the range) is checked against
    the file and ``max_bytes`` before reading, and the whole read, stat
    included, must finish within ``timeout_s``: a FIFO, ``/dev/zero``, a huge
    sparse file or a hung mount becomes a :class:`BadInput`, never a hang.
    """
    return run_with_timeout(
        lambda cancelled: _read(uri, offset, size, max_bytes, cancelled), timeout_s, uri
    )
