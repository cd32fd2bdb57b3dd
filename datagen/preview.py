"""A contact sheet of an output folder: does the data look right?

One row per sample: the image, then every condition map side by side, the
field names above and the caption below. Read from the committed shards,
exactly what training will read.
"""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datagen.decode import pil_open
from datagen.shards import (
    ShardFileError,
    filesystem,
    list_entries,
    read_manifest,
    read_tar_samples,
    subsets_in,
)

IMAGE_CODECS = ("jpg", "jpeg", "png", "webp")


def _to_thumb(data: bytes, size: int) -> Image.Image:
    img = pil_open(io.BytesIO(data))  # PIL's own open, even after ultralytics patched it
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / top * 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    img.thumbnail((size, size))
    return img


def _read_shard(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, dict[str, bytes]]]:
    """One tar's samples; damage is a :class:`ShardFileError` naming the tar."""
    try:
        with fs.open(path, "rb") as fh:
            return read_tar_samples(fh.read())
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
        raise ShardFileError(f"{path}: unreadable tar: {exc}") from exc


def load_samples(out: str, subset: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    fs, root = filesystem(out)
    manifest = read_manifest(out, subset)
    names = (
        [s["name"] for s in manifest["shards"]]
        if manifest
        else [
            p.rsplit("/", 1)[-1]
            for p, kind in list_entries(fs, f"{root}/{subset}", ".tar")
            if kind == "file"
        ]
    )
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name in names:
        samples.extend(_read_shard(fs, f"{root}/{subset}/{name}"))
        if len(samples) >= 4 * n:
            break
    return sorted(samples, key=lambda s: s[0])[:n]


def _caption(files: dict[str, bytes]) -> str:
    """The sample's caption from its metadata; '' when that does not parse (preview
    shows damaged data rather than failing on it; verify reports it)."""
    try:
        meta = json.loads(files.get("json", b"{}"))
    except ValueError:
        return ""
    if not isinstance(meta, dict):
        return ""
    captions = meta.get("captions")
    joined = " | ".join(map(str, captions)) if isinstance(captions, list) else ""
    return str(meta.get("caption") or joined or "")


def _tiles(files: dict[str, bytes], thumb: int) -> list[tuple[str, Image.Image]]:
    tiles = []
    for name, data in sorted(files.items(), key=lambda kv: (kv[0] not in ("jpg",), kv[0])):
        if name.rsplit(".", 1)[-1] not in IMAGE_CODECS:
            continue
        try:
            tiles.append((name, _to_thumb(data, thumb)))
        except (OSError, ValueError, Image.DecompressionBombError):
            tiles.append((f"{name} (unreadable)", Image.new("RGB", (thumb, thumb), (90, 0, 0))))
    return tiles


def contact_sheet(
    out: str, path: str | Path, samples_per_subset: int = 4, thumb: int = 160
) -> Path:
    font = ImageFont.load_default()
    rows: list[tuple[str, str, list[tuple[str, Image.Image]], str]] = []
    for subset in subsets_in(out):
        for key, files in load_samples(out, subset, samples_per_subset):
            rows.append((subset, key, _tiles(files, thumb), _caption(files)))
    if not rows:
        raise FileNotFoundError(f"{out} holds no samples to preview")
    pad, label_h, caption_h = 6, 14, 30
    width = pad + max(len(tiles) for _, _, tiles, _ in rows) * (thumb + pad)
    row_h = label_h + thumb + caption_h + pad  # captions sit under the tallest tile of their row
    sheet = Image.new("RGB", (max(width, 400), pad + len(rows) * row_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (subset, key, tiles, caption) in enumerate(rows):
        y = pad + r * row_h
        for c, (name, img) in enumerate(tiles):
            x = pad + c * (thumb + pad)
            draw.text(
                (x, y),
                f"{subset}: {key}" if c == 0 else name,
                fill=(230, 230, 120) if c == 0 else (200, 200, 200),
                font=font,
            )
            sheet.paste(img, (x, y + label_h))
        tallest = max(img.size[1] for _, img in tiles) if tiles else thumb
        wrapped = textwrap.wrap(caption, width=max(20, width // 7))[:2]
        draw.text(
            (pad, y + label_h + tallest + 2), "\n".join(wrapped), fill=(255, 255, 255), font=font
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
