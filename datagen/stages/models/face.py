"""The face check's detector: an ultralytics YOLO face model (one class: face), e.g. a
YOLOv8/11 face checkpoint. Imported only in ``FaceStage.setup()`` (on the worker).

Everything but the class check is the pose detector's (:mod:`datagen.stages.models.pose`):
the ``.pt`` is read by its restricted loader (no pickle code runs), and
:class:`~datagen.stages.models.pose.PersonDetector` runs batched inference keeping class 0,
which in a one-class face model is the face.
"""

from __future__ import annotations

# Sets the offline variables before ultralytics is imported (it reads them at import).

# isort: split

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from datagen.stages.models.common import CheckpointError
from datagen.stages.models.pose import (
    PERSON,
    PersonDetector,
    build_random_yolo,
    load_detector,
    load_yolo_checkpoint,
)

FACE = PERSON  # the class PersonDetector keeps (0) is the face class of a one-class model
FACE_YOLO_BASE = "cfg/models/11/yolo11.yaml"  # inside the ultralytics package
FACE_YOLO_NAME = "yolo11n-face.yaml"  # the "n" picks the nano scale


def face_yolo_yaml(folder: str | Path) -> Path:
    """ultralytics' YOLO11 layout with one class (``face``), written into ``folder``: the
    packaged YAMLs all have 80 classes, and ultralytics builds a model from a file only."""
    import ultralytics

    layout = yaml.safe_load((Path(ultralytics.__file__).parent / FACE_YOLO_BASE).read_text())
    layout["nc"] = 1
    path = Path(folder) / FACE_YOLO_NAME
    path.write_text(yaml.safe_dump(layout))
    return path


def build_random_face_yolo(seed: int = 0) -> Any:
    """A random-init one-class YOLO11n (mechanics only: its "faces" are meaningless). As the
    pose detector's random build, it scores every box about 0.88
    (``pose_model.RANDOM_PERSON_LOGIT``): a face check at ``conf`` below that finds many
    faces in every image (``ManyFaces``), at 0.9 or above none (``NoFace``)."""
    with tempfile.TemporaryDirectory(prefix="onegen-face-yaml-") as folder:
        yolo = build_random_yolo(seed, str(face_yolo_yaml(folder)))
    yolo.model.names = {FACE: "face"}
    return yolo


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
    """A face ``YOLO`` from an ultralytics ``.pt``, read by pose_model's safe loader."""
    yolo = load_yolo_checkpoint(path)
    check_face_classes(yolo, path)
    return yolo


def load_face_detector(
    weights: str, device: torch.device, half: bool, imgsz: int, iou: float, seed: int = 0
) -> PersonDetector:
    """From a local ``.pt`` (safely) or ``random-tiny``: the person detector's loading with
    the one-class builders."""
    return load_detector(
        weights, device, half, imgsz, iou, seed, build_random_face_yolo, load_face_checkpoint
    )
