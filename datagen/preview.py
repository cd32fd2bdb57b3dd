"""A contact sheet of an output folder: does the data look right?

One row per sample: the image, then every condition map side by side, the
field names above and the caption below. Read from the committed shards,
exactly what training will read.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datagen.shards import filesystem, read_manifest, read_tar_samples, subsets_in

IMAGE_CODECS = ("jpg", "jpeg", "png", "webp")


def _to_thumb(data: bytes, size: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / top * 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    img.thumbnail((size, size))
    return img


def load_samples(out: str, subset: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    fs, root = filesystem(out)
    manifest = read_manifest(out, subset)
    names = [s["name"] for s in manifest["shards"]] if manifest else sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{subset}", detail=False) if p.endswith(".tar"))
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name in names:
        with fs.open(f"{root}/{subset}/{name}", "rb") as fh:
            samples.extend(read_tar_samples(fh.read()))
        if len(samples) >= 4 * n:
            break
    return sorted(samples, key=lambda s: s[0])[:n]


def contact_sheet(out: str, path: str | Path, samples_per_subset: int = 4, thumb: int = 160) -> Path:
    font = ImageFont.load_default()
    rows: list[tuple[str, str, list[tuple[str, Image.Image]], str]] = []
    for subset in subsets_in(out):
        for key, files in load_samples(out, subset, samples_per_subset):
            tiles = [(name, _to_thumb(data, thumb)) for name, data in sorted(
                files.items(), key=lambda kv: (kv[0] not in ("jpg",), kv[0]))
                if name.rsplit(".", 1)[-1] in IMAGE_CODECS]
            meta = json.loads(files.get("json", b"{}"))
            caption = meta.get("caption") or " | ".join(meta.get("captions", [])) or ""
            rows.append((subset, key, tiles, caption))
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
            draw.text((x, y), f"{subset}: {key}" if c == 0 else name, fill=(230, 230, 120) if c == 0 else (200, 200, 200), font=font)
            sheet.paste(img, (x, y + label_h))
        tallest = max(img.size[1] for _, img in tiles) if tiles else thumb
        wrapped = textwrap.wrap(caption, width=max(20, width // 7))[:2]
        draw.text((pad, y + label_h + tallest + 2), "\n".join(wrapped), fill=(255, 255, 255), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
