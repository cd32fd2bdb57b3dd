"""A contact sheet of an output folder: does the data look right?

One row per sample: the image, then every condition map side by side, the
field names above and the caption below. Read from the committed shards,
exactly what training will read.

16-bit maps (``depth.png``) are shown as training sees them, linear over the
full 0..65535 range (``v / 257``, near = bright), not stretched per image. A
label made by a model running on random weights (metadata ``<name>_model``
holding ``random-tiny``, e.g. ``depth_model``, ``pose_model``) means nothing:
its tile carries a red "random weights" banner, drawn with OpenCV's built-in
Hershey font (no font file is read or fetched).
"""

from __future__ import annotations

import io
import json
import re
import textwrap
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.pil_open import pil_open
from datagen.shards.layout import subsets_in
from datagen.shards.reader import ShardReader
from datagen.stages.models.common import RANDOM_TINY

IMAGE_CODECS = ("jpg", "jpeg", "png", "webp")
BANNER_TEXT = "random weights"
BANNER_RGB = (220, 20, 20)  # not a palette or OpenPose colour: a banner pixel is unambiguous
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_thumb(data: bytes, size: int) -> Image.Image:
    img = pil_open(io.BytesIO(data))  # PIL's own open, even after ultralytics patched it
    if img.mode in _WIDE_MODES:
        # 16-bit gray to 8 bits over the full range, as the trainer scales it: a depth map
        # (already min-max scaled per image) shows its stored values, not a re-stretch.
        arr = np.asarray(img, dtype=np.float64).clip(0, 65535)
        img = Image.fromarray(np.rint(arr / 257.0).astype(np.uint8))
    img = img.convert("RGB")
    img.thumbnail((size, size))
    return img


def random_weight_fields(meta: dict, fields: list[str]) -> set[str]:
    """The image fields a random-weight model made, from the sample's metadata.

    ``<name>_model`` holding ``random-tiny`` marks the fields named ``<name>.*``
    (``depth_model`` -> ``depth.png``, ``pose_model`` -> ``pose.png``); a model key with no
    field of its own name marks the sample's derived images (every field but ``jpg``), or,
    when it has none, its first image."""
    marked: set[str] = set()
    for key, value in meta.items():
        if not (isinstance(key, str) and key.endswith("_model")):
            continue
        if RANDOM_TINY not in str(value):  # the model id of a labeler on random weights
            continue
        name = key[: -len("_model")]
        own = [f for f in fields if f.split(".", 1)[0] == name]
        derived = [f for f in fields if f != "jpg"]
        marked.update(own or derived or fields[:1])
    return marked


def mark_random(img: Image.Image) -> Image.Image:
    """A red banner with "random weights" in white across the top of a tile."""
    arr = np.array(img.convert("RGB"))
    h, w = arr.shape[:2]
    band = max(6, min(h // 2, max(12, h // 8)))
    arr[:band] = BANNER_RGB
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(BANNER_TEXT, font, 1.0, 1)
    scale = max(0.2, min(0.45, (w - 4) / tw, (band - 3) / th))
    (tw, th), _ = cv2.getTextSize(BANNER_TEXT, font, scale, 1)
    org = (max(1, (w - tw) // 2), max(th, (band + th) // 2))
    cv2.putText(arr, BANNER_TEXT, org, font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return Image.fromarray(arr)


def load_samples(out: str, subset: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """The first ``n`` samples by key among the first shards (the manifest's tars, or the
    tars present without one), read with :class:`datagen.shards.ShardReader`; damage is a
    ``ShardFileError`` naming the file."""
    reader = ShardReader(out)
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name in reader.shards(subset):
        samples.extend(reader.samples(subset, name))
        if len(samples) >= 4 * n:
            break
    return sorted(samples, key=lambda s: s[0])[:n]


def _meta(files: dict[str, bytes]) -> dict:
    """The sample's metadata; {} when it does not parse (preview shows damaged data
    rather than failing on it; verify reports it)."""
    try:
        meta = json.loads(files.get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _caption(files: dict[str, bytes]) -> str:
    """The sample's caption from its metadata; '' when there is none."""
    meta = _meta(files)
    captions = meta.get("captions")
    joined = " | ".join(map(str, captions)) if isinstance(captions, list) else ""
    return str(meta.get("caption") or joined or "")


def _tiles(files: dict[str, bytes], thumb: int) -> list[tuple[str, Image.Image]]:
    """(label, thumbnail) per image field, the image first; tiles a random-weight model
    made carry the banner (:func:`mark_random`)."""
    names = sorted(
        (n for n in files if n.rsplit(".", 1)[-1] in IMAGE_CODECS),
        key=lambda n: (n != "jpg", [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]),
    )
    marked = random_weight_fields(_meta(files), names)
    tiles = []
    for name in names:
        try:
            img = _to_thumb(files[name], thumb)
        except (OSError, ValueError, Image.DecompressionBombError):
            tiles.append((f"{name} (unreadable)", Image.new("RGB", (thumb, thumb), (90, 0, 0))))
            continue
        tiles.append((name, mark_random(img) if name in marked else img))
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
