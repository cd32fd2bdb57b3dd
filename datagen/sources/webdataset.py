"""Existing WebDataset tars as input: members addressed by byte range, never unpacked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec
import pyarrow as pa

from datagen.io import BadInput, open_regular
from datagen.shards.tar import TarFormatError, TarMember, iter_members, member_data, split_name
from datagen.sources.base import (
    MAX_CAPTION_BYTES,
    MAX_KEY_LENGTH,
    Source,
    SourceError,
    decode_caption,
    dedupe_keys,
    manifest_table,
    short_digest,
)


def tar_key(shard: str, stem: str) -> str:
    """``<shard>-<stem>`` when the stem already is key-safe; otherwise the
    cleaned stem plus a digest of the original, so ``a b`` and ``a_b`` (or two
    long stems cut to the same prefix) stay apart and the key stays valid."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)
    plain = f"{shard}-{cleaned}"
    if cleaned == stem and len(plain) <= MAX_KEY_LENGTH:
        return plain
    digest = short_digest(stem)
    room = MAX_KEY_LENGTH - len(shard) - len(digest) - 2
    return f"{shard}-{cleaned[:room]}-{digest}"


def _shard_prefix(url: str) -> str:
    """Name plus a digest of the full URL: train/000.tar and val/000.tar differ."""
    readable = re.sub(r"[^A-Za-z0-9]+", "_", Path(url).name.removesuffix(".tar"))[:80]
    return f"{readable}_{short_digest(url, 6)}"


# --- existing WebDataset tars --------------------------------------------------------------


def _expand(urls: str | Iterable[str]) -> list[str]:
    import braceexpand

    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for url in urls:
        for expanded in braceexpand.braceexpand(url):
            if any(ch in expanded for ch in "*?["):
                fs, pattern = fsspec.core.url_to_fs(expanded)
                out.extend(sorted(fs.glob(pattern)))
            else:
                out.append(expanded)
    return out


@dataclass
class _Sample:
    """The members of one tar sample seen so far."""

    image: tuple[int, int] | None = None
    caption: str | None = None
    json_caption: str | None = None
    exts: set[str] = field(default_factory=set)
    error: str | None = None


@dataclass
class _TarScan:
    url: str
    image_exts: tuple[str, ...]
    samples: dict[str, _Sample] = field(default_factory=dict)
    end: int = 0  # where the next header starts: everything before it was read
    problem: str | None = None  # why reading stopped early, if it did

    def fail(self, sample: _Sample, reason: str) -> None:
        if sample.error is None:
            sample.error = reason


def _member_text(fh: Any, member: TarMember, scan: _TarScan, sample: _Sample) -> bytes | None:
    if member.size > MAX_CAPTION_BYTES:
        scan.fail(
            sample,
            f"BadCaption: {scan.url}: member {member.name} has {member.size} bytes "
            f"> {MAX_CAPTION_BYTES}",
        )
        return None
    return member_data(fh, member, MAX_CAPTION_BYTES)


def _add_member(fh: Any, member: TarMember, scan: _TarScan, size: int | None) -> bool:
    """File one member under its sample. True when its data runs past the end
    of the file: the sample is then marked as truncated."""
    parts = split_name(member.name) if member.isfile else None
    if parts is None:
        return False
    stem, ext = parts
    sample = scan.samples.setdefault(stem, _Sample())
    if size is not None and member.offset_data + member.size > size:  # its data is cut
        scan.fail(
            sample,
            f"TruncatedTar: {scan.url}: member {member.name} claims {member.size} "
            f"bytes from byte {member.offset_data}, but the file has {size}",
        )
        return True
    if ext in sample.exts:
        scan.fail(
            sample,
            f"DuplicateMember: {scan.url}: sample {stem} has member "
            f"{member.name} more than once (names compared case-insensitively)",
        )
    sample.exts.add(ext)
    if member.sparse:
        scan.fail(sample, f"BadTarMember: {scan.url}: member {member.name} is a sparse file")
    elif ext in scan.image_exts and sample.image is None:
        sample.image = (member.offset_data, member.size)
    elif ext == "txt":
        data = _member_text(fh, member, scan, sample)
        if data is not None:
            sample.caption, error = decode_caption(data, f"{scan.url}: member {member.name}")
            if error:
                scan.fail(sample, error)
    elif ext == "json":
        data = _member_text(fh, member, scan, sample)
        try:
            meta = json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None  # metadata is optional: broken json means no caption from it
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            sample.json_caption = meta["caption"]
    return False


def _read_members(fh: Any, scan: _TarScan, size: int | None) -> None:
    """Walk the headers with the shard walker (:func:`datagen.shards.iter_members`): payloads
    are skipped, not read, and a member whose size runs past the end of the file (a lying size
    field, up to exabytes in base-256 or PAX) ends the walk instead of a read."""
    for member in iter_members(fh, size):
        attributed = _add_member(fh, member, scan, size)
        if member.truncated:  # its data or its padding is cut: nothing after it was written
            if not attributed:
                scan.problem = (
                    f"TruncatedTar: {scan.url}: member {member.name} ends past "
                    f"the end of the file ({size} bytes)"
                )
            scan.end = member.offset
            return
        scan.end = member.end


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression_hint(fh: Any) -> str:
    fh.seek(0)
    head = fh.read(6)
    kind = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
    return (
        f" ({kind}-compressed: only uncompressed tars can be addressed by byte range)"
        if kind
        else ""
    )


def _scan_tar(url: str, image_exts: tuple[str, ...]) -> _TarScan:
    """Every sample of one tar, and why reading stopped early if it did: a truncated or
    invalid header, an empty file, a member past the end of the file."""
    scan = _TarScan(url, image_exts)
    try:
        fh, size = open_regular(url)
    except BadInput as exc:
        if exc.error == "MissingFile":
            raise SourceError(f"WebDataset shard {url} does not exist") from exc
        scan.problem = f"UnreadableTar: {exc.message}"
        return scan
    with fh:
        try:
            _read_members(fh, scan, size)
        except TarFormatError as exc:
            hint = _compression_hint(fh) if scan.end == 0 else ""
            scan.problem = f"UnreadableTar: {url}: {exc}; members after it are not read{hint}"
        except (OSError, ValueError) as exc:
            scan.problem = (
                f"UnreadableTar: {url}: {type(exc).__name__}: {exc} after byte {scan.end}"
            )
    return scan


def _tar_rows(url: str, shard: str, scan: _TarScan) -> list[dict[str, Any]]:
    rows = []
    for stem, sample in scan.samples.items():
        offset, size = sample.image or (0, 0)
        # A sample without an image keeps its row (empty range): decode quarantines it.
        rows.append(
            {
                "key": tar_key(shard, stem),
                "uri": url,
                "caption": sample.caption if sample.caption is not None else sample.json_caption,
                "byte_offset": offset,
                "byte_size": size,
                "source_error": sample.error,
                "origin": f"{url}: sample {stem}",
            }
        )
    if scan.problem:
        # Samples before the break are kept; what could not be read is one row, named.
        name = "unreadable_tail" if scan.samples else "unreadable"
        rows.append(
            {
                "key": f"{shard}-{name}",
                "uri": url,
                "byte_offset": scan.end,
                "byte_size": 0,
                "source_error": scan.problem,
            }
        )
    return rows


def webdataset_shards(
    urls: str | Iterable[str], image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
) -> pa.Table:
    """Samples of existing (uncompressed) WebDataset tars, addressed by byte range.

    Captions come from a ``txt`` member or the ``caption`` of a ``json`` member.
    Keys are prefixed with the shard name and a digest of its URL, so two
    shards cannot collide. A truncated or corrupt tar keeps the samples read
    before the break; the rest becomes a ``<shard>-unreadable_tail`` row, and
    samples with duplicate or truncated members carry a source error.
    """
    rows: list[dict[str, Any]] = []
    for url in _expand(urls):
        rows.extend(_tar_rows(url, _shard_prefix(url), _scan_tar(url, image_exts)))
    return manifest_table(dedupe_keys(rows))


@dataclass(frozen=True)
class WebDatasetParams:
    kind: Literal["webdataset"]
    urls: str | list[str]


class WebDatasetSource(Source):
    """``source: {kind: webdataset, urls: ...}``: :func:`webdataset_shards`."""

    kind: ClassVar[str] = "webdataset"
    Params: ClassVar[type] = WebDatasetParams

    @classmethod
    def rows(cls, params: WebDatasetParams, work_dir: str, seed: int) -> pa.Table:
        return webdataset_shards(params.urls)
