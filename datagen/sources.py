"""Input manifests: every source becomes one Arrow table with a row per input.

Columns: ``key`` (stable, dot-free), ``uri`` (local path or fsspec URL),
``caption`` (nullable), ``byte_offset`` / ``byte_size`` (nullable; a byte range
inside ``uri``, how members of existing tars are addressed without unpacking),
``source_error`` (nullable; ``"Class: reason"`` when the source already knows
the row cannot be used, e.g. a caption that is not UTF-8 or a truncated tar).
Only names and offsets travel through the driver, never pixels.

One bad input never refuses the run: it keeps a row with a ``source_error``
and the decode stage quarantines that key with the reason, naming the file.
Only a manifest that cannot be used at all (a missing folder, an unreadable
parquet file, wrong column types) is a :class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from datagen.decode import BadInput, open_regular, read_bytes
from datagen.schema import KEY_PATTERN
from datagen.shards import TarFormatError, TarMember, iter_members, member_data, split_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
        ("source_error", pa.string()),
    ]
)
MAX_KEY_LENGTH = 200  # datagen.schema.KEY_PATTERN
MAX_CAPTION_BYTES = 1 << 20  # a sidecar or tar caption larger than this is not a caption
CAPTION_TIMEOUT_S = 30.0  # reading one sidecar caption


# Bumped whenever the keys derived for the same inputs change (2: tar stems that
# cleaning alters get a digest of the original stem), so resuming an output made
# with the old keys is refused instead of writing those inputs again.
KEY_SCHEME_VERSION = "2"


class SourceError(ValueError):
    """A manifest that cannot be used as given; the message says how to fix it."""


def _utf8(text: str) -> bytes:
    """Bytes of a name that may hold undecodable bytes (``surrogateescape``)."""
    return text.encode("utf-8", "surrogateescape")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(_utf8(text)).hexdigest()[:n]


def key_from_path(relative: str) -> str:
    """A stable, dot-free key from a relative path, unique even after sanitising.

    ``cats/tom.v2.jpg`` -> ``cats_tom_v2_jpg-<8 hex of the path>``: readable,
    and the hash keeps ``a/b.jpg`` and ``a_b.jpg`` apart.
    """
    readable = re.sub(r"[^A-Za-z0-9]+", "_", relative).strip("_")[:120] or "x"
    return f"{readable}-{_digest(relative)}"


def tar_key(shard: str, stem: str) -> str:
    """``<shard>-<stem>`` when the stem already is key-safe; otherwise the
    cleaned stem plus a digest of the original, so ``a b`` and ``a_b`` (or two
    long stems cut to the same prefix) stay apart and the key stays valid."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)
    plain = f"{shard}-{cleaned}"
    if cleaned == stem and len(plain) <= MAX_KEY_LENGTH:
        return plain
    digest = _digest(stem)
    room = MAX_KEY_LENGTH - len(shard) - len(digest) - 2
    return f"{shard}-{cleaned[:room]}-{digest}"


def _shard_prefix(url: str) -> str:
    """Name plus a digest of the full URL: train/000.tar and val/000.tar differ."""
    readable = re.sub(r"[^A-Za-z0-9]+", "_", Path(url).name.removesuffix(".tar"))[:80]
    return f"{readable}_{_digest(url, 6)}"


def check_manifest(table: pa.Table) -> pa.Table:
    """Reject duplicate or invalid keys up front: accounting is by key."""
    keys = table.column("key").to_pylist()
    bad = [k for k in keys if k is None or not KEY_PATTERN.match(k)]
    if bad:
        raise SourceError(
            f"{len(bad)} invalid keys (need [A-Za-z0-9_-], no dots), e.g. {bad[:5]}; "
            "use datagen.sources.key_from_path to derive keys"
        )
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dups = sorted({k for k in keys if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise SourceError(f"{len(dups)} duplicate keys in the manifest, e.g. {dups[:5]}")
    return table


def conform(table: pa.Table) -> pa.Table:
    """``table`` in MANIFEST_SCHEMA, missing nullable columns added (a manifest
    cached before ``source_error`` existed)."""
    for name in MANIFEST_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(
                name, pa.nulls(table.num_rows, MANIFEST_SCHEMA.field(name).type)
            )
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return check_manifest(pa.table(cols, schema=MANIFEST_SCHEMA))


def dedupe_keys(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose key an earlier row already took get a new, unique key and a
    ``DuplicateKey`` source error: quarantined by name, not refusing the run."""
    seen: set[str] = set()
    for row in rows:
        key = row["key"]
        if key not in seen:
            seen.add(key)
            continue
        n = 1
        while (new := f"{key[: MAX_KEY_LENGTH - 8]}-dup{n}") in seen:
            n += 1
        seen.add(new)
        row["key"] = new
        row["source_error"] = (
            f"DuplicateKey: {row.get('origin') or row['uri']} maps to key {key}, already taken"
        )
    return rows


# --- image folders -------------------------------------------------------------------------


def read_caption(path: str) -> tuple[str | None, str | None]:
    """``(caption, None)``, ``(None, None)`` without a sidecar, or ``(None,
    reason)``: only a regular file of at most MAX_CAPTION_BYTES of UTF-8 is a
    caption, read as every input is (:func:`datagen.decode.read_bytes`: a FIFO
    would block the driver, a huge file fill its memory, a hung mount stall it)."""
    if not os.path.lexists(path):
        return None, None
    try:
        data = read_bytes(path, max_bytes=MAX_CAPTION_BYTES, timeout_s=CAPTION_TIMEOUT_S)
    except BadInput as exc:
        return None, f"BadCaption: {exc.message}"
    return _decode_caption(data, path)


def _decode_caption(data: bytes, where: str) -> tuple[str | None, str | None]:
    if len(data) > MAX_CAPTION_BYTES:
        return None, f"BadCaption: {where} has more than {MAX_CAPTION_BYTES} bytes"
    try:
        return data.decode("utf-8").strip(), None
    except UnicodeDecodeError as exc:
        return None, f"BadCaption: {where} is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def _folder_row(path: str, relative: str, uri: str, local: bool) -> dict[str, Any]:
    try:
        _utf8(uri).decode("utf-8")
    except UnicodeDecodeError:
        # Arrow strings are UTF-8: keep a readable, escaped name and quarantine the file.
        shown = _utf8(uri).decode("utf-8", "backslashreplace")
        return {
            "key": key_from_path(relative),
            "uri": shown,
            "source_error": f"BadFileName: {shown} is not a valid UTF-8 path",
        }
    caption, error = read_caption(str(Path(path).with_suffix(".txt"))) if local else (None, None)
    return {"key": key_from_path(relative), "uri": uri, "caption": caption, "source_error": error}


def image_folder(root: str) -> pa.Table:
    """Every image under ``root`` (recursive), in sorted order. Non-image
    extensions are skipped; broken images with image extensions are kept, so
    the decode stage quarantines them with a reason, and so are images whose
    sidecar caption cannot be read (with the sidecar named as the reason)."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    rows = []
    for path in sorted(fs.find(base)):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        relative = path[len(base.rstrip("/")) + 1 :]
        uri = path if local else f"{protocol}://{path}"
        rows.append(_folder_row(path, relative, uri, local))
    return _table(dedupe_keys(rows))


# --- parquet manifests ---------------------------------------------------------------------

# Column -> (accepted type test, what to say when it fails).
_COLUMN_TYPES = {
    "key": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "uri": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "caption": (
        lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
        "string",
    ),
    "byte_offset": (lambda t: pa.types.is_integer(t) or pa.types.is_null(t), "integer"),
    "byte_size": (lambda t: pa.types.is_integer(t) or pa.types.is_null(t), "integer"),
}


def _read_parquet(path: str) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=None)
    except FileNotFoundError as exc:
        raise SourceError(f"parquet manifest {path} does not exist") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(
            f"parquet manifest {path} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc


def _checked_column(table: pa.Table, name: str, path: str) -> list[Any] | None:
    """The column as Python values, None if absent; a wrong type (``key`` as
    int64, ``uri`` as binary) is a one-line SourceError, not a traceback later."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    accepts, expected = _COLUMN_TYPES[name]
    if not accepts(column.type):
        raise SourceError(
            f"{path}: manifest column {name!r} has type {column.type}, expected {expected}"
        )
    return column.to_pylist()


def parquet_manifest(path: str) -> pa.Table:
    """A user's manifest: ``key``, ``uri`` and optionally ``caption``,
    ``byte_offset``, ``byte_size``. Its keys are the user's: duplicates are a
    SourceError (renaming them would change what a key means)."""
    table = _read_parquet(path)
    missing = {"key", "uri"} - set(table.column_names)
    if missing:
        raise SourceError(f"{path}: manifest lacks columns {sorted(missing)}")
    columns = {name: _checked_column(table, name, path) for name in _COLUMN_TYPES}
    n = table.num_rows
    rows = [
        {name: values[i] if values is not None else None for name, values in columns.items()}
        for i in range(n)
    ]
    try:
        return _table(rows)
    except (pa.ArrowException, OverflowError) as exc:  # e.g. a uint64 offset beyond int64
        raise SourceError(
            f"{path}: manifest values do not fit: {type(exc).__name__}: {exc}"
        ) from exc


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
            sample.caption, error = _decode_caption(data, f"{scan.url}: member {member.name}")
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
    return _table(dedupe_keys(rows))


# --- the built-in demo source ------------------------------------------------------------

# Images that installed packages ship, with captions written for them.
_SKIMAGE_IMAGES = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of an American flag",
    "coffee": "a cup of coffee with latte art on a saucer, seen from above",
    "chelsea": "a tabby cat with green eyes looking to the side",
    "rocket": "a rocket standing on its launch pad under a clear sky",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "immunohistochemistry": "a microscope image of stained tissue cells",
    "hubble_deep_field": "a deep field image of many distant galaxies in space",
    "coins": "a grayscale photo of old coins arranged in rows",
    "page": "a scanned page of printed text",
    "moon": "a grayscale photo of the surface of the moon",
    "retina": "a photo of the retina of a human eye",
    "logo": "the scikit-image logo, a snake on a white background",
}
_ULTRALYTICS_IMAGES = {
    "bus.jpg": "people walking past a blue city bus on a street",
    "zidane.jpg": "two men in suits standing in front of a dark wall",
}
_AUGMENTATIONS = (
    ("original", ""),
    ("flip", ", mirrored"),
    ("crop", ", cropped close"),
    ("warm", ", in warm light"),
)


def base_demo_images() -> list[tuple[str, Image.Image, str]]:
    import skimage.data

    out = []
    for name, caption in _SKIMAGE_IMAGES.items():
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # an image that would need a download: skip it, offline
            continue
        out.append((name, Image.fromarray(np.asarray(arr)).convert("RGB"), caption))
    # Locate ultralytics' assets without importing it: its import patches
    # PIL.Image.open to pip-install plugins and does network look-ups.
    spec = importlib.util.find_spec("ultralytics")
    if spec is not None and spec.submodule_search_locations:
        assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
        for name, caption in _ULTRALYTICS_IMAGES.items():
            if (assets / name).exists():
                out.append((Path(name).stem, Image.open(assets / name).convert("RGB"), caption))
    if not out:
        raise SourceError("no demo images found: scikit-image or ultralytics must be installed")
    return out


def _augment(img: Image.Image, kind: str) -> Image.Image:
    if kind == "flip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "crop":
        w, h = img.size
        return img.crop((w // 8, h // 8, w - w // 8, h - h // 8))
    if kind == "warm":
        r, g, b = ImageEnhance.Color(img).enhance(1.3).split()
        r = r.point(lambda v: min(255, int(v * 1.1)))
        b = b.point(lambda v: int(v * 0.9))
        return Image.merge("RGB", (r, g, b))
    return img


def demo(cache_dir: str, n: int = 48, max_side: int = 512) -> pa.Table:
    """A few dozen real photos from installed packages, augmented, on disk.

    Written once to ``cache_dir`` (JPEG files + ``manifest.parquet``) so the
    pipeline reads them like any other input. Keys are zero-padded and stable.
    """
    root = Path(cache_dir)
    manifest = root / "manifest.parquet"
    if manifest.exists():
        table = pq.read_table(manifest)
        if table.num_rows == n and all(Path(u).exists() for u in table.column("uri").to_pylist()):
            return check_manifest(conform(table))
    root.mkdir(parents=True, exist_ok=True)
    bases = base_demo_images()
    rows = []
    for i in range(n):
        name, img, caption = bases[i % len(bases)]
        aug, suffix = _AUGMENTATIONS[(i // len(bases)) % len(_AUGMENTATIONS)]
        out = _augment(img, aug)
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        key = f"demo_{i:06d}"
        path = root / f"{key}.jpg"
        out.save(path, quality=92)
        rows.append({"key": key, "uri": str(path.resolve()), "caption": caption + suffix})
    table = _table(rows)
    pq.write_table(table, manifest)
    return table


GROUP_SOURCE_KINDS: dict[str, str] = {
    "scenes": "multiview",
    "procedural_scenes": "multiview",
    "identities": "faceid",
    "demo_identities": "faceid",
}


def resolve(spec: dict[str, Any] | str, work_dir: str = ".", seed: int = 0) -> pa.Table:
    """A source spec from a DAG (``{kind, ...}``) or the CLI's ``--input`` string. Group
    sources (scenes, identities) give one row per sample, its views chosen from ``seed``."""
    if isinstance(spec, str):
        spec = guess_spec(spec)
    kind = spec.get("kind")
    if kind in ("scenes", "procedural_scenes"):
        from datagen.scenes import scene_manifest

        return scene_manifest(spec, work_dir, seed)
    if kind in ("identities", "demo_identities"):
        from datagen.identities import identity_manifest

        return identity_manifest(spec, work_dir, seed)
    if kind == "folder":
        return image_folder(spec["path"])
    if kind == "parquet":
        return parquet_manifest(spec["path"])
    if kind == "webdataset":
        return webdataset_shards(spec["urls"])
    if kind == "demo":
        cache = spec.get("cache_dir") or str(Path(work_dir) / "demo_inputs")
        return demo(cache, n=int(spec.get("n", 48)), max_side=int(spec.get("max_side", 512)))
    raise SourceError(
        f"unknown source kind {kind!r}: use folder, parquet, webdataset, demo, "
        + ", ".join(GROUP_SOURCE_KINDS)
    )


def guess_spec(text: str) -> dict[str, Any]:
    if text == "demo":
        return {"kind": "demo"}
    if text.endswith(".parquet"):
        return {"kind": "parquet", "path": text}
    if ".tar" in text:
        return {"kind": "webdataset", "urls": text}
    return {"kind": "folder", "path": text}
