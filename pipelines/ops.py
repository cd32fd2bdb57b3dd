"""The stage operations a DAG can name, one per-row function each.

An op is built once per worker (per actor for model stages) from the DAG's
params, then called on one row at a time. It returns the columns it adds; a
``meta`` dict in its result is merged into the sample's metadata. It raises
to reject the row: the stage runner turns that into a quarantine record.
Model labelers (captions, SAM, depth, pose) register here too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from datagen.decode import BadInput, DecodeParams, check_min_side, decode_image, read_bytes
from datagen.degrade import degrade_all

# One OpenCV thread per process: parallelism comes from running one op per
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


class Op:
    """Base of every stage op. ``outputs`` maps each added column to the value
    a rejected row gets, so every batch has the same columns."""

    version: ClassVar[str] = "1"
    outputs: ClassVar[dict[str, Any]] = {}

    def __init__(self, seed: int = 0, **params: Any):
        self.seed = seed
        self.params = params

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


def _keep_original_jpeg(data: bytes, image: np.ndarray) -> bool:
    """True when the input file already is the upright RGB JPEG we would write."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
        return im.mode == "RGB" and orientation == 1 and im.size == (image.shape[1], image.shape[0])


def source_failure(row: dict[str, Any]) -> BadInput | None:
    """The manifest's reason this row cannot be used (``"Class: message"``,
    e.g. a sidecar caption that is not UTF-8), as the error decode raises."""
    text = row.get("source_error")
    if not isinstance(text, str) or not text:
        return None
    error, sep, message = text.partition(": ")
    if not sep or not error.isidentifier():
        return BadInput("SourceError", text)
    return BadInput(error, message)


def _fit_max_side(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, bool]:
    """Downscale so the long side is at most ``max_side``; True if it did."""
    if not max_side or max(image.shape[:2]) <= max_side:
        return image, False
    scale = max_side / max(image.shape[:2])
    size_wh = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size_wh, interpolation=cv2.INTER_AREA), True


class DecodeOp(Op):
    """Read the input, reject what cannot be a sample, emit upright RGB.

    Geometry is judged on what is written: the aspect ratio (which a resize
    keeps) before any pixels are decoded, the short side again after the
    ``max_side`` resize, so a 64x100000 strip cannot become a 1x1024 sample.
    """

    # 2: source errors, regular files only, read timeout, aspect ratio and post-resize min_side.
    version: ClassVar[str] = "2"
    outputs: ClassVar[dict[str, Any]] = {
        "image": np.zeros((1, 1, 3), np.uint8),
        "jpg": b"",
        "txt": b"",
    }

    def __init__(
        self,
        seed: int = 0,
        min_side: int = DecodeParams.min_side,
        max_pixels: int = DecodeParams.max_pixels,
        max_bytes: int = DecodeParams.max_bytes,
        max_side: int | None = None,
        jpeg_quality: int = 95,
        max_aspect_ratio: float | None = DecodeParams.max_aspect_ratio,
        read_timeout_s: float | None = DecodeParams.read_timeout_s,
    ):
        super().__init__(seed)
        self.decode_params = DecodeParams(
            min_side=min_side,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
            max_aspect_ratio=max_aspect_ratio,
            read_timeout_s=read_timeout_s,
        )
        self.max_side = max_side
        self.jpeg_quality = jpeg_quality

    def _read(self, row: dict[str, Any]) -> bytes:
        failure = source_failure(row)
        if failure is not None:
            raise failure
        offset = row.get("byte_offset")
        size = row.get("byte_size")
        has_range = offset is not None and not (isinstance(offset, float) and np.isnan(offset))
        has_size = (
            has_range and size is not None and not (isinstance(size, float) and np.isnan(size))
        )
        p = self.decode_params
        return read_bytes(
            row["uri"],
            int(offset) if has_range else None,
            int(size) if has_size else None,
            max_bytes=p.max_bytes,
            timeout_s=p.read_timeout_s,
        )

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = self._read(row)
        image, resized = _fit_max_side(decode_image(data, self.decode_params), self.max_side)
        if resized:
            check_min_side(
                image.shape[1], image.shape[0], self.decode_params, " after resizing to max_side"
            )
        jpg = (
            data
            if not resized and _keep_original_jpeg(data, image)
            else encode_jpeg(image, self.jpeg_quality)
        )
        caption = row.get("caption") or ""
        return {
            "image": image,
            "jpg": jpg,
            "txt": caption.encode("utf-8"),
            "meta": {
                "caption": caption,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
            },
        }


class DegradeOp(Op):
    """Canny, soft edges, blur, downscale and inpainting pairs for i2i."""

    outputs: ClassVar[dict[str, Any]] = {
        "canny_png": b"",
        "hed_png": b"",
        "blur_jpg": b"",
        "lowres_jpg": b"",
        "masked_jpg": b"",
        "mask_png": b"",
    }

    def __init__(
        self,
        seed: int = 0,
        canny_low: int = 100,
        canny_high: int = 200,
        downscale_factors: tuple[int, ...] = (2, 3, 4),
        jpeg_quality: int = 95,
    ):
        super().__init__(seed)
        self.canny_low, self.canny_high = canny_low, canny_high
        self.factors = tuple(int(f) for f in downscale_factors)
        self.jpeg_quality = jpeg_quality

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        image = row["image"]
        if image.ndim != 3 or image.shape[0] < 2:
            raise BadInput("NoImage", "degrade needs the decoded image of the decode stage")
        maps, params = degrade_all(
            image, row["key"], self.seed, self.canny_low, self.canny_high, self.factors
        )
        q = self.jpeg_quality
        return {
            "canny_png": encode_png(maps["canny"]),
            "hed_png": encode_png(maps["hed"]),
            "blur_jpg": encode_jpeg(maps["blur"], q),
            "lowres_jpg": encode_jpeg(maps["lowres"], q),
            "masked_jpg": encode_jpeg(maps["masked"], q),
            "mask_png": encode_png(maps["mask"]),
            "meta": {"degradations": params},
        }


OPS: dict[str, Callable[..., Op]] = {
    "decode": DecodeOp,
    "degrade": DegradeOp,
}


def build_op(name: str, seed: int, params: dict[str, Any]) -> Op:
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known ops: {sorted(OPS)}")
    return OPS[name](seed=seed, **params)
