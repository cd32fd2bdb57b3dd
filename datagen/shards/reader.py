"""The one shard reader: manifests, indexes with their fallbacks, byte-range reads of a
window of samples and whole tars, over any fsspec filesystem. Training reads through it."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa

from datagen.io import BadInput, run_with_timeout
from datagen.shards.index import index_entries, read_index, read_manifest_file
from datagen.shards.layout import (
    MANIFEST,
    ShardFileError,
    filesystem,
    is_local,
    list_entries,
    subsets_in,
)
from datagen.shards.tar import (
    MAX_READ_BYTES,
    READ_TIMEOUT_S,
    Entry,
    FileSource,
    TarFormatError,
    iter_samples,
    sample_files,
    scan_entries,
)


def read_manifest(out: str, subset: str) -> dict[str, Any] | None:
    """The subset's manifest, None if it has none; :class:`ShardFileError` if damaged."""
    return ShardReader(out).manifest(subset)


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
    (:func:`datagen.io.read_bytes`). Failures: OSError or :class:`ShardFileError`."""
    if start < 0 or end < start:
        raise ShardFileError(f"{path}: bad byte range [{start}, {end})")
    if end - start > max_bytes:
        raise ShardFileError(f"{path}: a range of {end - start} bytes > max_bytes={max_bytes}")

    def read(_cancelled: Any) -> bytes:
        if not is_local(fs):
            return fs.cat_file(path, start=start, end=end)
        fh, _ = _open_tar(fs, path)
        with fh:
            return FileSource(fh, None).read_at(start, end - start)

    try:
        return run_with_timeout(read, timeout_s, path)
    except BadInput as exc:  # ReadTimeout
        raise ShardFileError(exc.message) from exc


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
