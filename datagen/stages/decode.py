"""The first stage of every DAG: read the input, reject what cannot be a sample,
emit the upright RGB image (``image``, in memory for the stages fused behind it)
and the ``jpg`` every subset stores."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from common.pil_open import pil_open
from datagen.images import check_min_side, decode_image, decode_rgb, encode_jpeg
from datagen.io import BadInput, DecodeParams, read_bytes
from datagen.stages.entities import plain_captions
from datagen.stages.protocol import RowStage, is_view_list, parse_failure

_D = DecodeParams()


@dataclass(frozen=True)
class DecodeStageParams:
    min_side: int = _D.min_side
    max_pixels: int = _D.max_pixels
    max_bytes: int = _D.max_bytes
    max_side: int | None = None
    jpeg_quality: int = 95
    max_aspect_ratio: float | None = _D.max_aspect_ratio
    read_timeout_s: float | None = _D.read_timeout_s


def _keep_original_jpeg(data: bytes, image: np.ndarray) -> bool:
    """True when the input file already is the upright RGB JPEG we would write."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    with pil_open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
        return im.mode == "RGB" and orientation == 1 and im.size == (image.shape[1], image.shape[0])


def source_failure(row: dict[str, Any]) -> BadInput | None:
    """The manifest's reason this row cannot be used (``"Class: message"``,
    e.g. a sidecar caption that is not UTF-8), as the error decode raises."""
    text = row.get("source_error")
    if not isinstance(text, str) or not text:
        return None
    return BadInput(*parse_failure(text))


def _fit_max_side(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, bool]:
    """Downscale so the long side is at most ``max_side``; True if it did."""
    if not max_side or max(image.shape[:2]) <= max_side:
        return image, False
    scale = max_side / max(image.shape[:2])
    size_wh = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size_wh, interpolation=cv2.INTER_AREA), True


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


class DecodeStage(RowStage):
    """Geometry is judged on what is written: the aspect ratio (which a resize
    keeps) before any pixels are decoded, the short side again after the
    ``max_side`` resize, so a 64x100000 strip cannot become a 1x1024 sample."""

    name: ClassVar[str] = "decode"
    # 2: source errors, regular files only, read timeout, aspect ratio and post-resize min_side.
    version: ClassVar[str] = "2"
    reads: ClassVar[tuple[str, ...]] = (
        "uri",
        "caption",
        "byte_offset",
        "byte_size",
        "source_error",
    )
    # source_width / source_height: the file's size before ``max_side`` (what a scene's
    # intrinsics refer to); in no item subset's json.
    produces: ClassVar[tuple[str, ...]] = (
        "jpg",
        "txt",
        "caption",
        "width",
        "height",
        "source_width",
        "source_height",
    )
    transient: ClassVar[tuple[str, ...]] = ("image",)
    Params: ClassVar[type] = DecodeStageParams

    def __init__(self, params: DecodeStageParams | None = None, seed: int = 0):
        super().__init__(params, seed)
        p = self.params
        self.decode_params = DecodeParams(
            min_side=p.min_side,
            max_pixels=p.max_pixels,
            max_bytes=p.max_bytes,
            max_aspect_ratio=p.max_aspect_ratio,
            read_timeout_s=p.read_timeout_s,
        )

    def _read(self, row: dict[str, Any]) -> bytes:
        failure = source_failure(row)
        if failure is not None:
            raise failure
        offset, size = row.get("byte_offset"), row.get("byte_size")
        has_range = _present(offset)
        p = self.decode_params
        return read_bytes(
            row["uri"],
            int(offset) if has_range else None,
            int(size) if has_range and _present(size) else None,
            max_bytes=p.max_bytes,
            timeout_s=p.read_timeout_s,
        )

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        data = self._read(row)
        full = decode_image(data, self.decode_params)
        image, resized = _fit_max_side(full, self.params.max_side)
        if resized:
            check_min_side(
                image.shape[1], image.shape[0], self.decode_params, " after resizing to max_side"
            )
        jpg = (
            data
            if not resized and _keep_original_jpeg(data, image)
            else encode_jpeg(image, self.params.jpeg_quality)
        )
        meta = plain_captions(
            {
                "caption": row.get("caption") or "",
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "source_width": int(full.shape[1]),
                "source_height": int(full.shape[0]),
            },
            "caption",
        )
        return {"image": image, "jpg": jpg, "txt": meta["caption"].encode("utf-8"), "meta": meta}


def _image_from_jpg(jpg: Any) -> np.ndarray | None:
    return decode_rgb(bytes(jpg)) if jpg is not None and len(jpg) else None


def images_from_jpg(jpgs: list[Any]) -> list[Any]:
    """The ``image`` column again, where it did not travel (a stage reading it that is
    not fused behind decode): each written ``jpg`` decoded; None where there is none; a
    group's list of per-view ``jpg`` becomes its list of images."""
    return [
        [_image_from_jpg(v) for v in j] if is_view_list(j) else _image_from_jpg(j) for j in jpgs
    ]
