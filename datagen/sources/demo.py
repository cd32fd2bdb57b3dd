"""The built-in demo source: photos that installed packages ship, augmented, cached on disk."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from datagen.sources.base import Source, SourceError, check_manifest, conform, manifest_table

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
    table = manifest_table(rows)
    pq.write_table(table, manifest)
    return table


@dataclass(frozen=True)
class DemoParams:
    kind: Literal["demo"]
    n: int = 48
    max_side: int = 512
    cache_dir: str | None = None  # None: <work_dir>/demo_inputs


class DemoSource(Source):
    """``source: {kind: demo}``: :func:`demo`, cached under ``cache_dir``."""

    kind: ClassVar[str] = "demo"
    Params: ClassVar[type] = DemoParams

    @classmethod
    def rows(cls, params: DemoParams, work_dir: str, seed: int) -> pa.Table:
        cache = params.cache_dir or str(Path(work_dir) / "demo_inputs")
        return demo(cache, n=params.n, max_side=params.max_side)
