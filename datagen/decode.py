"""Read and decode one input image into clean 8-bit RGB, or say exactly why not.

Everything a real crawl throws at a pipeline ends here: zero-byte and truncated
files, non-images, decompression bombs, CMYK, 16-bit, palette and alpha images,
EXIF rotations, thumbnails. Failures raise :class:`BadInput` with a stable
``error`` class so quarantine records can be grouped and counted.
"""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError


class BadInput(Exception):
    """An input that cannot become a sample. ``error`` is a stable class name."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message


@dataclass(frozen=True)
class DecodeParams:
    min_side: int = 64
    max_pixels: int = 64_000_000
    max_bytes: int = 200_000_000


def read_bytes(uri: str, offset: int | None = None, size: int | None = None) -> bytes:
    """Bytes of a local path or fsspec URL, or of a byte range in it (tar members)."""
    try:
        with fsspec.open(uri, "rb") as fh:
            if offset is not None:
                fh.seek(int(offset))
                return fh.read(int(size) if size is not None else -1)
            return fh.read()
    except FileNotFoundError as exc:
        raise BadInput("MissingFile", f"{uri} does not exist") from exc
    except IsADirectoryError as exc:
        raise BadInput("NotAFile", f"{uri} is a directory") from exc
    except PermissionError as exc:
        raise BadInput("Unreadable", f"{uri}: {exc}") from exc


def _pil_open(fp: io.BytesIO) -> Image.Image:
    """PIL's own ``Image.open``. Importing ultralytics replaces it with a
    version that tries to pip-install a HEIF plugin whenever a file is not an
    image; a corrupt input must become a quarantine record, not an install."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return (original or Image.open)(fp)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite on white: transparent pixels hold arbitrary colours underneath."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        mode == "P" and "transparency" in img.info
    ):
        return _flatten_alpha(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit gray: scale the full range down instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    # CMYK, YCbCr, L, 1, P without transparency, LAB, HSV: PIL converts correctly.
    return img.convert("RGB")


def decode_image(data: bytes, params: DecodeParams = DecodeParams()) -> np.ndarray:
    """Decode bytes to an ``[H, W, 3] uint8`` array, upright per EXIF."""
    if len(data) == 0:
        raise BadInput("EmptyFile", "zero bytes")
    if len(data) > params.max_bytes:
        raise BadInput("TooLarge", f"{len(data)} bytes > max_bytes={params.max_bytes}")
    # Never let PIL complete a truncated file with gray: that is a silent bad sample.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _pil_open(io.BytesIO(data))
            width, height = img.size
            if width * height > params.max_pixels:
                raise BadInput(
                    "DecompressionBomb",
                    f"{width}x{height} = {width * height} pixels > max_pixels={params.max_pixels}",
                )
            img.load()
    except BadInput:
        raise
    except UnidentifiedImageError as exc:
        raise BadInput("NotAnImage", str(exc)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput("DecompressionBomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput("CorruptImage", f"{type(exc).__name__}: {exc}") from exc

    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF must not kill the sample's pixels
        warnings.warn(f"ignoring unreadable EXIF: {exc}", stacklevel=2)
    rgb = _to_rgb(img)
    if min(rgb.size) < params.min_side:
        raise BadInput("TooSmall", f"{rgb.size[0]}x{rgb.size[1]} has a side below min_side={params.min_side}")
    return np.asarray(rgb, dtype=np.uint8).copy()
