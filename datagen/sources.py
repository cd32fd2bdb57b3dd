"""Input manifests: every source becomes one Arrow table with a row per input.

Columns: ``key`` (stable, dot-free), ``uri`` (local path or fsspec URL),
``caption`` (nullable), ``byte_offset`` / ``byte_size`` (nullable; a byte range
inside ``uri``, how members of existing tars are addressed without unpacking).
Only names and offsets travel through the driver, never pixels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from datagen.schema import KEY_PATTERN

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
    ]
)


class SourceError(ValueError):
    """A manifest that cannot be used as given; the message says how to fix it."""


def key_from_path(relative: str) -> str:
    """A stable, dot-free key from a relative path, unique even after sanitising.

    ``cats/tom.v2.jpg`` -> ``cats_tom_v2_jpg-<8 hex of the path>``: readable,
    and the hash keeps ``a/b.jpg`` and ``a_b.jpg`` apart.
    """
    readable = re.sub(r"[^A-Za-z0-9]+", "_", relative).strip("_")[:120] or "x"
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


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


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return check_manifest(pa.table(cols, schema=MANIFEST_SCHEMA))


def image_folder(root: str) -> pa.Table:
    """Every image under ``root`` (recursive), in sorted order. Non-image
    extensions are skipped; broken images with image extensions are kept, so
    the decode stage quarantines them with a reason."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    rows = []
    for path in sorted(fs.find(base)):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        relative = path[len(base.rstrip("/")) + 1 :]
        uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
        sidecar = Path(path).with_suffix(".txt")
        local = protocol in ("file", "local")
        caption = sidecar.read_text(encoding="utf-8").strip() if local and sidecar.exists() else None
        rows.append({"key": key_from_path(relative), "uri": uri, "caption": caption})
    return _table(rows)


def parquet_manifest(path: str) -> pa.Table:
    """A user's manifest: ``key``, ``uri`` and optionally ``caption``."""
    table = pq.read_table(path, filesystem=None)
    missing = {"key", "uri"} - set(table.column_names)
    if missing:
        raise SourceError(f"{path}: manifest lacks columns {sorted(missing)}")
    rows = []
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else None
    offsets = table.column("byte_offset").to_pylist() if "byte_offset" in table.column_names else None
    sizes = table.column("byte_size").to_pylist() if "byte_size" in table.column_names else None
    for i, (key, uri) in enumerate(zip(table.column("key").to_pylist(), table.column("uri").to_pylist(), strict=True)):
        rows.append(
            {
                "key": key,
                "uri": uri,
                "caption": captions[i] if captions else None,
                "byte_offset": offsets[i] if offsets else None,
                "byte_size": sizes[i] if sizes else None,
            }
        )
    return _table(rows)


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


def webdataset_shards(urls: str | Iterable[str], image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")) -> pa.Table:
    """Samples of existing WebDataset tars, addressed by byte range.

    Captions come from a ``txt`` member or the ``caption`` of a ``json`` member.
    Keys are prefixed with the shard name and a digest of its URL, so two
    shards cannot collide.
    """
    rows: list[dict[str, Any]] = []
    for url in _expand(urls):
        # Name plus a digest of the full URL: train/000.tar and val/000.tar differ.
        readable = re.sub(r"[^A-Za-z0-9]+", "_", Path(url).name.removesuffix(".tar"))
        shard = f"{readable}_{hashlib.sha1(url.encode()).hexdigest()[:6]}"
        with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            groups: dict[str, dict[str, Any]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                prefix = member.name[: len(member.name) - len(base)]
                group = groups.setdefault(prefix + stem, {})
                ext = ext.lower()
                if ext in image_exts and "image" not in group:
                    group["image"] = (member.offset_data, member.size)
                elif ext == "txt":
                    group["caption"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                elif ext == "json" and "caption" not in group:
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                            group["caption"] = meta["caption"]
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass
            for stem, group in groups.items():
                key = f"{shard}-{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)}"
                offset, size = group.get("image", (None, None))
                # A group without an image keeps a row: decode quarantines it.
                rows.append({"key": key, "uri": url, "caption": group.get("caption"), "byte_offset": offset if offset is not None else 0, "byte_size": size if size is not None else 0})
    return _table(rows)


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


def _base_demo_images() -> list[tuple[str, Image.Image, str]]:
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
            return check_manifest(table.cast(MANIFEST_SCHEMA))
    root.mkdir(parents=True, exist_ok=True)
    bases = _base_demo_images()
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


def resolve(spec: dict[str, Any] | str, work_dir: str = ".") -> pa.Table:
    """A source spec from a DAG (``{kind, ...}``) or the CLI's ``--input`` string."""
    if isinstance(spec, str):
        spec = guess_spec(spec)
    kind = spec.get("kind")
    if kind == "folder":
        return image_folder(spec["path"])
    if kind == "parquet":
        return parquet_manifest(spec["path"])
    if kind == "webdataset":
        return webdataset_shards(spec["urls"])
    if kind == "demo":
        cache = spec.get("cache_dir") or str(Path(work_dir) / "demo_inputs")
        return demo(cache, n=int(spec.get("n", 48)), max_side=int(spec.get("max_side", 512)))
    raise SourceError(f"unknown source kind {kind!r}: use folder, parquet, webdataset or demo")


def guess_spec(text: str) -> dict[str, Any]:
    if text == "demo":
        return {"kind": "demo"}
    if text.endswith(".parquet"):
        return {"kind": "parquet", "path": text}
    if ".tar" in text:
        return {"kind": "webdataset", "urls": text}
    return {"kind": "folder", "path": text}
