"""Pack a scene's decoded views into one multiview sample: square views, the intrinsics of
exactly those pixels, cameras normalised as the released OneDiffusion multiview loader does.

Each view is centre-cropped to a square and resized to ``size``: the released model is
trained on square views only. The intrinsics follow every step (the manifest's image size ->
the decoded file -> decode's ``max_side`` resize -> the crop -> the resize), because training
and sampling recompute the Plücker rays from the stored cameras at whatever resolution they
use: the stored K must describe the stored pixels exactly, or every ray is off by the error.
The cameras are expressed in the released loader's world (camera 0 the identity in PyTorch3D's
view frame, ``datagen.cameras.CAMERA0``; version 2: version 1 used OpenCV's, turned 180° about
camera 0's axis) and scaled so camera 0 is ``distance`` from the optical axes' intersection;
the scale goes into ``camera_scale``. The subset's manifest names the frame
(``datagen.shards.frames``).

The stage sees the whole group row (``per_view = False``): the decode stage's per-view lists
and, when the DAG has a caption stage run with ``group_views: first``, that stage's caption of
view 0 as one string (a list means decode's empty per-view captions: no VLM caption).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from datagen.cameras import (
    DEFAULT_DISTANCE,
    crop_intrinsics,
    json_pose,
    normalize_cameras,
    resize_intrinsics,
)
from datagen.images import encode_jpeg
from datagen.io import BadInput
from datagen.params import ParamError
from datagen.schema import SUBSETS
from datagen.stages.caption import require_group_views
from datagen.stages.entities import plain_captions
from datagen.stages.protocol import Filtered, RowStage, view_values

MIN_VIEWS = SUBSETS["multiview"].min_views


@dataclass(frozen=True)
class SceneParams:
    """``size``: side of the stored square views (null: the smallest view's crop side, so all
    views of a sample share one size); ``distance``: camera 0's distance to the optical axes'
    intersection after normalisation (1.7, the released loader's); ``source_caption``: use the
    source's scene caption when there is no VLM caption (false: an empty caption, a bare
    [[multiview]] prompt as for CO3D)."""

    size: int | None = 512
    distance: float = DEFAULT_DISTANCE
    jpeg_quality: int = 95
    source_caption: bool = True

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 16:
            raise ParamError(f"size: must be >= 16 or null, got {self.size}")
        if not (np.isfinite(self.distance) and self.distance > 0):
            raise ParamError(f"distance: must be > 0, got {self.distance}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ParamError(f"jpeg_quality: must be within [1, 100], got {self.jpeg_quality}")


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes that ``np.load(allow_pickle=False)`` reads back."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _floats(value: Any, per_view: int, views: int, what: str, error: str) -> np.ndarray:
    """A manifest's flat per-view numbers as finite float64 [views, per_view]."""
    if value is None:
        raise BadInput(error, f"the scene row has no {what}")
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise BadInput(error, f"{what} are not numbers") from None
    if a.size != per_view * views:
        raise BadInput(error, f"{what}: {a.size} values for {views} views ({per_view} a view)")
    if not np.all(np.isfinite(a)):
        raise BadInput(error, f"{what} contain NaN or inf")
    return a.reshape(views, per_view)


def checked_cameras(value: Any, views: int) -> np.ndarray:
    """The manifest's camera-to-world matrices [V, 4, 4], rigid, else ``BadCamera``."""
    c2w = _floats(value, 16, views, "cameras", "BadCamera").reshape(views, 4, 4)
    for v, m in enumerate(c2w):
        try:
            json_pose(m, f"view {v}: camera-to-world")
        except ValueError as exc:
            raise BadInput("BadCamera", str(exc)) from None
    return c2w


def checked_intrinsics(value: Any, views: int) -> np.ndarray:
    """The manifest's pixel intrinsics [V, 3, 3] with positive focals, else ``BadIntrinsics``."""
    k = _floats(value, 9, views, "intrinsics", "BadIntrinsics").reshape(views, 3, 3)
    for v, m in enumerate(k):
        if m[0, 0] <= 0 or m[1, 1] <= 0:
            raise BadInput("BadIntrinsics", f"view {v}: focal ({m[0, 0]}, {m[1, 1]}) not positive")
        if not np.allclose(m[2], [0.0, 0.0, 1.0], atol=1e-6) or m[1, 0] != 0:
            raise BadInput("BadIntrinsics", f"view {v}: not an upper-triangular pixel K")
    return k


def _sizes(value: Any, views: int) -> np.ndarray:
    """(W, H) per view the manifest's K refer to; 0 where unknown (the file's own size)."""
    if value is None:
        return np.zeros((views, 2))
    wh = _floats(value, 2, views, "sizes", "BadIntrinsics")
    if np.any(wh < 0):
        raise BadInput("BadIntrinsics", f"sizes must not be negative, got {wh.tolist()}")
    return wh


def decoded_intrinsics(
    k: np.ndarray, manifest_wh: np.ndarray, file_wh: tuple[int, int], image_wh: tuple[int, int]
) -> np.ndarray:
    """K of the manifest's image size -> K of the decoded file -> K of decode's output image."""
    sw, sh = file_wh
    mw, mh = (manifest_wh[0] or sw), (manifest_wh[1] or sh)
    k = resize_intrinsics(k, sw / mw, sh / mh)
    return resize_intrinsics(k, image_wh[0] / sw, image_wh[1] / sh)


def square_view(image: np.ndarray, k: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The image centre-cropped to a square and resized to ``side``, and its K."""
    h, w = image.shape[:2]
    crop = min(h, w)
    x0, y0 = (w - crop) // 2, (h - crop) // 2
    out = image[y0 : y0 + crop, x0 : x0 + crop]
    k = crop_intrinsics(k, x0, y0)
    if side != crop:
        shrink = side < crop
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        out = cv2.resize(out, (side, side), interpolation=interpolation)
        k = resize_intrinsics(k, side / crop, side / crop)
    return np.ascontiguousarray(out), k


class SceneStage(RowStage):
    name: ClassVar[str] = "scene"
    version: ClassVar[str] = "2"  # 2: cameras in the released loader's world (CAMERA0)
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    optional_needs: ClassVar[tuple[str, ...]] = ("caption",)
    per_view: ClassVar[bool] = False
    reads: ClassVar[tuple[str, ...]] = (
        "image",
        "cameras",
        "intrinsics",
        "sizes",
        "frames",
        "group",
        "group_caption",
        "view_caption",
        "caption",
        "source_width",
        "source_height",
    )
    produces: ClassVar[tuple[str, ...]] = (
        "img{i}.jpg",
        "cameras.npy",
        "intrinsics.npy",
        "scene",
        "caption",
        "captions",
        "num_views",
        "width",
        "height",
        "frames",
        "camera_scale",
        "source_caption",
    )
    Params: ClassVar[type] = SceneParams

    @classmethod
    def check_needs(cls, params: SceneParams, needs: dict[str, Any]) -> None:
        require_group_views(needs, "first", "a scene has one caption, of view 0")
        decode = needs.get("decode")
        max_side = getattr(decode, "max_side", None)
        if params.size is not None and max_side is not None and max_side < params.size:
            raise ParamError(
                f"decode.params.max_side {max_side} is below scene size {params.size}: every "
                "view would be upscaled (raise max_side or set it null)"
            )

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        images = row.get("image")
        if images is None or (isinstance(images, np.ndarray) and images.dtype != object):
            raise BadInput("NoImage", "scene needs the decoded views of the decode stage")
        images = list(images)
        views = len(images)
        if views < MIN_VIEWS:
            raise Filtered("TooFewViews", f"{views} views, a multiview sample needs {MIN_VIEWS}")
        for v, image in enumerate(images):
            if image is None or getattr(image, "ndim", 0) != 3:
                raise BadInput("NoImage", f"view {v} has no decoded image")
        c2w = checked_cameras(row.get("cameras"), views)
        k = checked_intrinsics(row.get("intrinsics"), views)
        manifest_wh = _sizes(row.get("sizes"), views)
        widths = view_values(row.get("source_width"), views)
        heights = view_values(row.get("source_height"), views)

        side = self.params.size or min(min(im.shape[:2]) for im in images)
        jpgs: list[bytes] = []
        ks: list[np.ndarray] = []
        for v, image in enumerate(images):
            h, w = image.shape[:2]
            file_wh = (int(widths[v] or w), int(heights[v] or h))
            kv = decoded_intrinsics(k[v], manifest_wh[v], file_wh, (w, h))
            square, kv = square_view(image, kv, side)
            jpgs.append(encode_jpeg(square, self.params.jpeg_quality))
            ks.append(kv)
        try:
            normalised, scale = normalize_cameras(c2w, self.params.distance)
        except ValueError as exc:
            raise BadInput("BadCamera", str(exc)) from None
        return {
            "img_jpg": jpgs,
            "cameras_npy": encode_npy(normalised.astype(np.float32)),
            "intrinsics_npy": encode_npy(np.stack(ks).astype(np.float32)),
            "meta": self._meta(row, views, side, scale),
        }

    def _meta(self, row: dict[str, Any], views: int, side: int, scale: float) -> dict[str, Any]:
        group_caption = row.get("group_caption")
        group_caption = group_caption if isinstance(group_caption, str) else ""
        vlm = row.get("caption")
        meta: dict[str, Any] = {}
        if isinstance(vlm, str):  # the caption stage's caption of view 0
            caption = vlm
            if group_caption:
                meta["source_caption"] = group_caption
        else:
            caption = group_caption if self.params.source_caption else ""
        frames = row.get("frames")
        return plain_captions(
            {
                **meta,
                "scene": str(row.get("group") or ""),
                "caption": caption,
                "captions": [
                    c if isinstance(c, str) else ""
                    for c in view_values(row.get("view_caption"), views)
                ],
                "num_views": views,
                "width": side,
                "height": side,
                "frames": [int(f) for f in frames] if frames is not None else list(range(views)),
                "camera_scale": float(scale),
            },
            "caption",
            "captions",
            "source_caption",
        )
