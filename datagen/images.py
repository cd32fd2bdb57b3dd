"""Read and decode one input image into clean 8-bit RGB, or say exactly why not.

Everything a real crawl throws at a pipeline ends here: zero-byte and truncated
files, non-images, decompression bombs, CMYK, 16-bit, palette and alpha images,
EXIF rotations, thumbnails, and inputs that are not files at all (FIFOs,
devices, huge sparse files, reads that never return). Failures raise
:class:`BadInput` with a stable ``error`` class so quarantine records can be
grouped and counted.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from common.alpha import flatten_alpha
from common.pil_open import pil_open
from datagen.io import BadInput, DecodeParams

# --- decoding ----------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return flatten_alpha(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit gray: scale the full range down instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = (
            np.zeros(arr.shape, np.uint8)
            if hi <= lo
            else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        )
        return Image.fromarray(arr8, "L").convert("RGB")
    # CMYK, YCbCr, L, 1, P without transparency, LAB, HSV: PIL converts correctly.
    return img.convert("RGB")


def check_aspect_ratio(width: int, height: int, params: DecodeParams) -> None:
    """Reject strips and slivers: no aspect-ratio bucket fits them, and a resize
    to ``max_side`` would squeeze their short side to a few pixels."""
    limit = params.max_aspect_ratio
    if limit is None or limit <= 0:
        return
    short, long = min(width, height), max(width, height)
    if short <= 0 or long / short > limit:
        raise BadInput(
            "BadAspectRatio",
            f"{width}x{height} has aspect ratio {long / max(short, 1):.2f} > max_aspect_ratio={limit:g}",
        )


def check_min_side(width: int, height: int, params: DecodeParams, when: str = "") -> None:
    """The short side must reach ``min_side``; checked again after any resize,
    because the size that matters is the one written."""
    if min(width, height) < params.min_side:
        raise BadInput(
            "TooSmall", f"{width}x{height}{when} has a side below min_side={params.min_side}"
        )


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
            img = pil_open(io.BytesIO(data))
            width, height = img.size
            if width * height > params.max_pixels:
                raise BadInput(
                    "DecompressionBomb",
                    f"{width}x{height} = {width * height} pixels > max_pixels={params.max_pixels}",
                )
            check_aspect_ratio(width, height, params)  # from the header: no pixels decoded yet
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
    check_min_side(rgb.size[0], rgb.size[1], params)
    return np.asarray(rgb, dtype=np.uint8).copy()


# One OpenCV thread per process: parallelism comes from running one stage per
# logical CPU (Ray tasks, actors), and OpenCV's own pool would add up to
# ``cores`` threads in every worker (a local Ray has twice as many logical CPUs
# as cores, a cluster node dozens of workers). It also gives the single-process
# path (``builder.run_in_process``) the per-process work of one Ray worker.
# Measured with bench/datagen_throughput.py on 2 cores: OpenCV's pool made the
# single process 0-10% faster (1.2 cores busy) and Ray no faster (0-7% slower
# with 4 workers). ONEGEN_CV2_THREADS=0 restores OpenCV's default.
CV2_THREADS = int(os.environ.get("ONEGEN_CV2_THREADS", "1"))
if CV2_THREADS > 0:
    cv2.setNumThreads(CV2_THREADS)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """PNG of a gray ``[H, W]`` (8 or 16 bit) or RGB ``[H, W, 3]`` array."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of an image the decode stage wrote (its ``jpg``)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
