"""The face check's detector: an ultralytics YOLO face model (one class: face), e.g. a
YOLOv8/11 face checkpoint. Imported only in ``FaceStage.setup()`` (on the worker).

Everything but the class check is the pose detector's (:mod:`datagen.stages.models.pose`):
the ``.pt`` is read by its restricted loader (no pickle code runs), and
:class:`~datagen.stages.models.pose.PersonDetector` runs batched inference keeping class 0,
which in a one-class face model is the face.
"""

from __future__ import annotations

# Sets the offline variables before ultralytics is imported (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from collections.abc import Callable
from typing import Any

import torch

from datagen.stages.models.common import PERSON, RANDOM_TINY, TINY_SEED, CheckpointError
from datagen.stages.models.pose import PersonDetector, load_detector, load_yolo_checkpoint

FACE = PERSON  # the class PersonDetector keeps (0) is the face class of a one-class model


def check_face_classes(yolo: Any, path: str) -> None:
    """A face detector has one class, or names class 0 a face: a COCO detector (class 0 =
    person) would pass whole people off as faces."""
    names = getattr(yolo.model, "names", None) or {}
    first = str(names.get(FACE, "")) if isinstance(names, dict) else ""
    if len(names) != 1 and "face" not in first.lower():
        raise CheckpointError(
            f"{path}: a face detector is needed (one class, or class 0 a face); this one has "
            f"{len(names)} classes, class 0 {first!r}"
        )


def load_face_checkpoint(path: str) -> Any:
    """A face ``YOLO`` from an ultralytics ``.pt``, read by the pose detector's safe loader."""
    yolo = load_yolo_checkpoint(path)
    check_face_classes(yolo, path)
    return yolo


def load_face_detector(
    weights: str, device: torch.device, half: bool, imgsz: int, iou: float, seed: int = TINY_SEED
) -> PersonDetector:
    """From a local ``.pt`` (safely) or ``random-tiny``: the person detector's loading with
    the one-class builders (the random one from :mod:`datagen.stages.models.tiny.face`)."""
    build: Callable[[int], Any] | None = None
    if weights == RANDOM_TINY:
        from datagen.stages.models.tiny.face import build_random_face_yolo

        build = build_random_face_yolo
    return load_detector(weights, device, half, imgsz, iou, seed, build, load_face_checkpoint)
