"""Packs an identity's photos into a faceid sample: ``img{i}.jpg`` (img0 the target, the
others its references), one caption per photo, the identity id.

It sees the whole group row (``per_view = False``) after decode, and after the face check
and the caption stage when the DAG has them (``optional_needs``). With a face check, each
photo is cropped to the square around its face (``face_crop``) and ``face_boxes`` gives
the face in the stored crop's pixels; without one the photos are stored whole. Either
way a photo's long side is brought down to ``max_side`` (never up), and a crop whose
short side is below ``min_side`` fails the sample as ``filtered`` ``SmallFace`` (too few
pixels to learn a face from). A photo's caption is the VLM's when the caption stage
gave one, else the manifest's, else empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from datagen.images import encode_jpeg
from datagen.io import BadInput
from datagen.params import ParamError
from datagen.stages.caption import require_group_views
from datagen.stages.entities import plain_captions
from datagen.stages.protocol import Filtered, RowStage, is_view_list, view_values


@dataclass(frozen=True)
class IdentityParams:
    max_side: int = 512
    min_side: int = 64
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_side:
            raise ParamError(
                f"min_side, max_side: need 1 <= min_side <= max_side, got {self.min_side}, "
                f"{self.max_side}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ParamError(f"jpeg_quality: must be within [1, 100], got {self.jpeg_quality}")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def view_captions(vlm: Any, manifest: Any, n: int) -> list[str]:
    """Per view: the VLM caption if non-empty, else the manifest's, else ``""``."""
    return [
        _text(a) or _text(b)
        for a, b in zip(view_values(vlm, n), view_values(manifest, n), strict=True)
    ]


def _crop_box(crop: Any, width: int, height: int, view: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in crop)
    except (TypeError, ValueError) as exc:
        raise BadInput("BadFaceCrop", f"view {view}: face_crop {crop!r} is not 4 ints") from exc
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise BadInput(
            "BadFaceCrop", f"view {view}: face_crop {crop!r} is not inside {width}x{height}"
        )
    return x0, y0, x1, y1


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class IdentityStage(RowStage):
    name: ClassVar[str] = "identity"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    optional_needs: ClassVar[tuple[str, ...]] = ("face", "caption")
    reads: ClassVar[tuple[str, ...]] = (
        "image",
        "group",
        "view_caption",
        "caption",
        "caption_model",
        "face_crop",
        "face_box",
    )
    produces: ClassVar[tuple[str, ...]] = (
        "img{i}.jpg",
        "identity",
        "captions",
        "num_views",
        "face_boxes",
        "caption_model",
    )
    per_view: ClassVar[bool] = False
    Params: ClassVar[type] = IdentityParams

    @classmethod
    def check_needs(cls, params: Any, needs: dict[str, Any]) -> None:
        require_group_views(needs, "all", "a faceid sample has a caption per photo")

    def _view(self, image: Any, crop: Any, box: Any, view: int) -> tuple[bytes, list[float] | None]:
        """One photo's jpg, and its face box in the stored pixels (None without one)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3:
            raise BadInput("NoImage", f"view {view}: no decoded image")
        height, width = image.shape[:2]
        x0, y0, x1, y1 = (
            (0, 0, width, height) if crop is None else _crop_box(crop, width, height, view)
        )
        cropped = image[y0:y1, x0:x1]
        if min(cropped.shape[:2]) < self.params.min_side:
            raise Filtered(
                "SmallFace",
                f"view {view}: the crop is {cropped.shape[1]}x{cropped.shape[0]}, a side below "
                f"min_side={self.params.min_side}",
            )
        stored = _downscale(cropped, self.params.max_side)
        jpg = encode_jpeg(stored, self.params.jpeg_quality)
        if box is None:
            return jpg, None
        sx, sy = stored.shape[1] / (x1 - x0), stored.shape[0] / (y1 - y0)
        bx0, by0, bx1, by1 = (float(v) for v in box)
        face = np.array([(bx0 - x0) * sx, (by0 - y0) * sy, (bx1 - x0) * sx, (by1 - y0) * sy])
        limit = [stored.shape[1], stored.shape[0]] * 2
        return jpg, np.round(np.clip(face, 0, limit), 2).tolist()

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        images = row.get("image")
        if not is_view_list(images):
            raise BadInput(
                "NotAGroup", "the identity stage packs group rows (an identity's photos)"
            )
        images = list(images)
        n = len(images)
        crops, boxes = view_values(row.get("face_crop"), n), view_values(row.get("face_box"), n)
        jpgs: list[bytes] = []
        faces: list[Any] = []
        for v, (image, crop, box) in enumerate(zip(images, crops, boxes, strict=True)):
            jpg, face = self._view(image, crop, box, v)
            jpgs.append(jpg)
            faces.append(face)
        meta: dict[str, Any] = {
            "identity": str(row.get("group") or ""),
            "captions": view_captions(row.get("caption"), row.get("view_caption"), n),
            "num_views": n,
        }
        if any(face is not None for face in faces):
            meta["face_boxes"] = faces
        models = _caption_models(row.get("caption_model"))
        if models:
            meta["caption_model"] = models
        return {"img_jpg": jpgs, "meta": plain_captions(meta, "captions")}


def _caption_models(value: Any) -> str:
    """The caption stage's model id (one per view on a group: the same one)."""
    values: Sequence[Any] = list(value) if is_view_list(value) else [value]
    return next((v for v in values if isinstance(v, str) and v), "")
