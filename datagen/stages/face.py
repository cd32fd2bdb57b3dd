"""The face check of the faceid subset: each photo of an identity must show exactly one
face (as the paper keeps them), found by a YOLO face detector.

Per view: on an identity's group row the stage runs on every photo, and the runner fails
the whole sample when one photo fails (a sample with a faceless or crowded reference is no
faceid sample). A photo without a face is ``filtered`` ``NoFace``, one with two or more
``ManyFaces``: expected outcomes, counted apart from errors. A kept photo gets metadata
only: ``face_box`` ``[x0, y0, x1, y1]`` (pixels of the stored jpg), ``face_score``, and
``face_crop``: the square around the face grown by ``margin`` times the face's long side
on each side (0.5: the face fills half the crop's side, hair, ears and chin included),
moved to stay inside the image, never larger than its short side. The identity stage
crops to it.

Faces with a side below ``min_face_side`` pixels are ignored, neither kept nor counted:
a crowd far behind the subject does not reject a portrait. The detector loads in
``setup()`` from a local ultralytics ``.pt`` (read without pickle code execution), or
``random-tiny`` for the mechanics: its random model scores every box about 0.88, so the
default ``conf`` finds many faces everywhere (``ManyFaces``), ``conf >= 0.9`` none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from datagen.params import ParamError
from datagen.stages.models.common import ModelStage, check_weights_path, decode_stored, pick_device
from datagen.stages.protocol import Batch, Filtered, batch_len, failure_from


@dataclass(frozen=True)
class FaceParams:
    """``conf``: a box counts as a face when its score is above it; ``iou``: the
    detector's NMS overlap; ``imgsz``: YOLO's letterboxed input size; ``micro_batch``:
    images per YOLO forward; ``dtype``: ``auto`` runs fp16 on a GPU."""

    weights: str = "models/yolov8n-face.pt"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16"] = "auto"
    conf: float = 0.5
    iou: float = 0.5
    imgsz: int = 640
    micro_batch: int = 16
    min_face_side: float = 16.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.conf <= 1:
            raise ParamError(f"conf: must be within [0, 1], got {self.conf}")
        if not 0 < self.iou <= 1:
            raise ParamError(f"iou: must be within (0, 1], got {self.iou}")
        if self.imgsz < 32:
            raise ParamError(f"imgsz: must be >= 32, got {self.imgsz}")
        if self.micro_batch < 1:
            raise ParamError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if self.min_face_side < 0:
            raise ParamError(f"min_face_side: must be >= 0, got {self.min_face_side}")
        if self.margin < 0:
            raise ParamError(f"margin: must be >= 0, got {self.margin}")


def face_crop(box: np.ndarray, width: int, height: int, margin: float) -> list[int]:
    """The square ``[x0, y0, x1, y1]`` (integer pixels) centred on ``box``, its side the
    box's long side times ``1 + 2 * margin``, shifted to lie inside the image (at most its
    short side)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    s = int(max(1, min(round(side), width, height)))
    left = int(np.clip(round((x0 + x1 - s) / 2), 0, width - s))
    top = int(np.clip(round((y0 + y1 - s) / 2), 0, height - s))
    return [left, top, left + s, top + s]


def face_label(
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    *,
    conf: float,
    min_face_side: float,
    margin: float,
) -> dict[str, Any]:
    """One photo's detections -> its face metadata, or :class:`Filtered` (``NoFace``,
    ``ManyFaces``). Boxes are pixel ``xyxy``; those scored at or below ``conf`` or with a
    side below ``min_face_side`` do not count."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = np.flatnonzero((scores > conf) & (side >= min_face_side))
    counted = f"with score > conf={conf:g} and side >= min_face_side={min_face_side:g}"
    if len(keep) == 0:
        raise Filtered("NoFace", f"no face {counted}")
    if len(keep) > 1:
        raise Filtered(
            "ManyFaces", f"{len(keep)} faces {counted}; a faceid photo shows exactly one"
        )
    box = np.clip(boxes[keep[0]], 0, [width, height, width, height])
    return {
        "face_box": np.round(box, 2).tolist(),
        "face_score": round(float(scores[keep[0]]), 4),
        "face_crop": face_crop(box, width, height, margin),
    }


class FaceStage(ModelStage):
    name: ClassVar[str] = "face"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("jpg",)
    produces: ClassVar[tuple[str, ...]] = ("face_box", "face_score", "face_crop")
    Params: ClassVar[type] = FaceParams

    def __init__(self, params: FaceParams | None = None, seed: int = 0):
        super().__init__(params, seed)
        self.detector: Any = None  # loaded in setup(), on the worker

    def setup(self) -> None:
        from datagen.stages.models.face import load_face_detector

        p = self.params
        check_weights_path(p.weights, "face")
        device = pick_device(p.device)
        half = device.type == "cuda" and p.dtype != "float32"
        self.detector = load_face_detector(p.weights, device, half, p.imgsz, p.iou, self.seed)

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        if self.detector is None:
            raise RuntimeError("FaceStage.setup() must load the detector before it labels")
        p = self.params
        n = batch_len(batch)
        out: dict[str, list[Any]] = {"meta": [None] * n, "failure": [None] * n}
        images, failures = decode_stored(batch["jpg"], self.name)
        for i, failure in failures.items():
            out["failure"][i] = failure
        rows = sorted(images)
        found = self.detector([images[i] for i in rows], p.conf, p.micro_batch) if rows else []
        for i, detections in zip(rows, found, strict=True):
            height, width = images[i].shape[:2]
            try:
                out["meta"][i] = face_label(
                    detections.boxes,
                    detections.scores,
                    width,
                    height,
                    conf=p.conf,
                    min_face_side=p.min_face_side,
                    margin=p.margin,
                )
            except Filtered as exc:
                out["failure"][i] = failure_from(exc)
        return out
