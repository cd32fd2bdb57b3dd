"""Pose labels (the ``pose`` subset): people found by a YOLO detector, their COCO-17
keypoints estimated by ViTPose (top-down), rendered OpenPose-18 style.

Batched twice: the detector sees every image of the batch, ViTPose every person of
every image (in sub-batches of ``micro_batch``). An image without a person is
``filtered`` (an expected non-sample), not an error. Models load in ``setup()`` from
local paths, or ``random-tiny`` for the mechanics: the random detector scores every
box about 0.88 as a person (``models.tiny.pose.RANDOM_PERSON_LOGIT``), so a DAG's real
``person_conf`` (up to ~0.85) runs unchanged on it, and ``person_conf >= 0.9`` finds
nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datagen.images import encode_png
from datagen.stages.models.common import (
    ModelStage,
    check_weights_path,
    decode_stored,
    pick_device,
    pick_dtype,
    weights_id,
)
from datagen.stages.pose_render import render_openpose
from datagen.stages.protocol import FILTERED, Batch, Failure, batch_len


@dataclass(frozen=True)
class PoseParams:
    """``person_conf``: a box counts as a person when its detector score is above it;
    ``keypoint_threshold``: keypoints scored below it are not drawn (all 17 are kept in
    the metadata with their scores); ``max_people``: the best-scored persons kept per
    image; ``min_box_side``: smaller boxes (pixels) are ignored, too small to pose;
    ``micro_batch``: persons per ViTPose forward; ``detector_batch``: images per YOLO
    forward; ``detector_imgsz``: YOLO's letterboxed input size."""

    detector_weights: str = "models/yolo11x.pt"
    weights: str = "models/vitpose-base-simple"
    device: str = "auto"
    dtype: str = "auto"
    person_conf: float = 0.5
    keypoint_threshold: float = 0.3
    max_people: int = 20
    min_box_side: float = 8.0
    detector_iou: float = 0.7
    detector_imgsz: int = 640
    detector_batch: int = 16
    micro_batch: int = 64


def _round(values: np.ndarray, decimals: int) -> list[Any]:
    return np.round(values.astype(np.float64), decimals).tolist()


class PoseStage(ModelStage):
    name: ClassVar[str] = "pose"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("jpg",)
    produces: ClassVar[tuple[str, ...]] = ("pose.png", "people", "pose_model")
    Params: ClassVar[type] = PoseParams

    def setup(self) -> None:
        from datagen.stages.models.pose import load_detector, load_pose_estimator

        p = self.params
        check_weights_path(p.detector_weights, "pose detector_weights")
        check_weights_path(p.weights, "pose weights")
        device = pick_device(p.device)
        dtype = pick_dtype(p.dtype, device)
        half = device.type == "cuda" and p.dtype != "float32"
        self.detector = load_detector(
            p.detector_weights, device, half, p.detector_imgsz, p.detector_iou, self.seed
        )
        self.estimator = load_pose_estimator(p.weights, device, dtype, self.seed)
        self.model_id = f"{weights_id(p.detector_weights)}+{weights_id(p.weights)}"

    def _persons(self, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kept persons: large enough, best ``max_people`` (already best first)."""
        side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = np.flatnonzero(side >= self.params.min_box_side)[: max(0, self.params.max_people)]
        return boxes[keep], scores[keep]

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        p = self.params
        n = batch_len(batch)
        out: dict[str, list[Any]] = {
            "pose_png": [None] * n,
            "meta": [None] * n,
            "failure": [None] * n,
        }
        images, failures = decode_stored(batch["jpg"], self.name)
        for i, failure in failures.items():
            out["failure"][i] = failure
        rows = sorted(images)
        detections = self.detector([images[i] for i in rows], p.person_conf, p.detector_batch)
        posed: list[int] = []
        boxes: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for i, found in zip(rows, detections, strict=True):
            kept_boxes, kept_scores = self._persons(found.boxes, found.scores)
            if len(kept_boxes) == 0:
                out["failure"][i] = Failure(
                    FILTERED,
                    "NoPerson",
                    f"no person with detector score > person_conf={p.person_conf:g} "
                    f"and box side >= min_box_side={p.min_box_side:g}",
                )
                continue
            posed.append(i)
            boxes.append(kept_boxes)
            scores.append(kept_scores)
        keypoints = self.estimator([images[i] for i in posed], boxes, p.micro_batch)
        for i, b, s, k in zip(posed, boxes, scores, keypoints, strict=True):
            height, width = images[i].shape[:2]
            out["pose_png"][i], out["meta"][i] = self._label(b, s, k, width, height)
        return out

    def _label(
        self, boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, width: int, height: int
    ) -> tuple[bytes, dict[str, Any]]:
        """The rendering and metadata of one image. Keypoints are clipped to the image
        (ViTPose may place an unseen joint past the border), scores (heatmap peaks) to
        [0, 1], both rounded, and the image is drawn from the rounded values:
        ``render_openpose`` of the metadata gives it back exactly."""
        kp = keypoints.astype(np.float64).copy()
        kp[:, :, 0] = np.round(np.clip(kp[:, :, 0], 0.0, width - 1.0), 2)
        kp[:, :, 1] = np.round(np.clip(kp[:, :, 1], 0.0, height - 1.0), 2)
        kp[:, :, 2] = np.round(np.clip(kp[:, :, 2], 0.0, 1.0), 4)
        people = [
            {
                "box": _round(box, 2),
                "score": round(float(score), 4),
                "keypoints": person.tolist(),
            }
            for box, score, person in zip(boxes, scores, kp, strict=True)
        ]
        image = render_openpose(list(kp), width, height, self.params.keypoint_threshold)
        return encode_png(image), {"people": people, "pose_model": self.model_id}
