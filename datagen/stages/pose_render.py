"""COCO-17 keypoints -> the OpenPose-18 skeleton image ControlNet-style pose models
were trained on (coloured limbs on black), with OpenCV only.

The drawing follows controlnet_aux's ``draw_bodypose`` (the ControlNet 1.1 OpenPose
annotator) step for step: the 17 limbs as filled ellipses ``stickwidth`` 4 wide at full
colour, the whole canvas then dimmed to 0.6, the 18 keypoints as filled circles of radius
4 at full colour on top; limb-major, then person, order. Same inputs, same pixels: the
image is a pure function of the keypoints, so it can be re-rendered from the metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
OPENPOSE_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
NECK = 1
# OpenPose index -> COCO index (the neck, None, is the mid-shoulder point).
OPENPOSE_FROM_COCO: tuple[int | None, ...] = tuple(
    None if name == "neck" else COCO_KEYPOINTS.index(name) for name in OPENPOSE_KEYPOINTS
)
LEFT_SHOULDER = COCO_KEYPOINTS.index("left_shoulder")
RIGHT_SHOULDER = COCO_KEYPOINTS.index("right_shoulder")

# controlnet_aux's limbSeq (1-based OpenPose indices), of which draw_bodypose draws the
# first 17 (the two ear-shoulder links are never drawn).
LIMBS: tuple[tuple[int, int], ...] = tuple(
    (a - 1, b - 1)
    for a, b in (
        (2, 3),
        (2, 6),
        (3, 4),
        (4, 5),
        (6, 7),
        (7, 8),
        (2, 9),
        (9, 10),
        (10, 11),
        (2, 12),
        (12, 13),
        (13, 14),
        (2, 1),
        (1, 15),
        (15, 17),
        (1, 16),
        (16, 18),
    )
)
# RGB, one per OpenPose keypoint; limb i uses colour i.
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
STICKWIDTH = 4
RADIUS = 4
LIMB_DIM = 0.6


def coco_to_openpose(keypoints: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenPose-18 points of one person from COCO-17 ``[17, 3]`` (x, y, score):
    ``(xy [18, 2] float64, present [18] bool)``. A keypoint is present when its score
    reaches ``threshold``; the neck is the mid-shoulder point, present only when both
    shoulders are."""
    kp = np.asarray(keypoints, dtype=np.float64).reshape(17, 3)
    xy = np.zeros((18, 2), dtype=np.float64)
    present = np.zeros(18, dtype=bool)
    confident = kp[:, 2] >= threshold
    for op_index, coco_index in enumerate(OPENPOSE_FROM_COCO):
        if coco_index is None:
            continue
        xy[op_index] = kp[coco_index, :2]
        present[op_index] = bool(confident[coco_index])
    if confident[LEFT_SHOULDER] and confident[RIGHT_SHOULDER]:
        xy[NECK] = (kp[LEFT_SHOULDER, :2] + kp[RIGHT_SHOULDER, :2]) / 2.0
        present[NECK] = True
    return xy, present


def render_openpose(
    people: Sequence[np.ndarray], width: int, height: int, threshold: float
) -> np.ndarray:
    """RGB uint8 ``[height, width, 3]``: every person's skeleton (COCO-17 ``[17, 3]``
    keypoints in pixels) drawn OpenPose-style on black; keypoints scored below
    ``threshold`` are not drawn, nor any limb missing an end."""
    canvas = np.zeros((int(height), int(width), 3), dtype=np.uint8)
    skeletons = [coco_to_openpose(p, threshold) for p in people]
    for limb, (a, b) in enumerate(LIMBS):
        for xy, present in skeletons:
            if not (present[a] and present[b]):
                continue
            # controlnet_aux's arithmetic: X along rows, Y along columns.
            ys = np.array([xy[a, 0], xy[b, 0]])
            xs = np.array([xy[a, 1], xy[b, 1]])
            length = float(((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5)
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            polygon = cv2.ellipse2Poly(
                (int(np.mean(ys)), int(np.mean(xs))),
                (int(length / 2), STICKWIDTH),
                int(angle),
                0,
                360,
                1,
            )
            cv2.fillConvexPoly(canvas, polygon, COLORS[limb])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for point in range(18):
        for xy, present in skeletons:
            if present[point]:
                center = (int(xy[point, 0]), int(xy[point, 1]))
                cv2.circle(canvas, center, RADIUS, COLORS[point], thickness=-1)
    return canvas
