"""A random one-class face YOLO (``random-tiny``, tests): ultralytics' YOLO11n layout with
one class, random weights, MEANINGLESS "faces"."""

from __future__ import annotations

# Sets the offline variables before ultralytics is imported (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

import tempfile
from pathlib import Path
from typing import Any

import yaml

from datagen.stages.models.common import PERSON
from datagen.stages.models.tiny.pose import build_random_yolo

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
    (``tiny.pose.RANDOM_PERSON_LOGIT``): a face check at ``conf`` below that finds many
    faces in every image (``ManyFaces``), at 0.9 or above none (``NoFace``)."""
    with tempfile.TemporaryDirectory(prefix="onegen-face-yaml-") as folder:
        yolo = build_random_yolo(seed, str(face_yolo_yaml(folder)))
    yolo.model.names = {PERSON: "face"}  # the one class, which the detector keeps
    return yolo
