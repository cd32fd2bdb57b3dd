"""Every labeler a DAG can name, one module each, imported on first use.

A labeler module imports only light things at its top (its ``Params`` are read on
the driver to validate a DAG); model code lives in a ``*_model.py`` beside it,
imported in ``setup()`` on the worker.
"""

from __future__ import annotations

import importlib

from datagen.stage import Stage

LABELERS: dict[str, str] = {
    "decode": "datagen.labelers.decode:DecodeStage",
    "caption": "datagen.labelers.caption:CaptionStage",
    "segment": "datagen.labelers.segment:SegmentStage",
    "degrade": "datagen.labelers.degrade:DegradeStage",
    "depth": "datagen.labelers.depth:DepthStage",
    "pose": "datagen.labelers.pose:PoseStage",
    "scene": "datagen.labelers.scene:SceneStage",
    "face": "datagen.labelers.face:FaceStage",
    "identity": "datagen.labelers.identity:IdentityStage",
}


def labeler(name: str) -> type[Stage]:
    """The Stage class registered as ``name``."""
    if name not in LABELERS:
        raise KeyError(f"unknown labeler {name!r}; known: {sorted(LABELERS)}")
    module, cls = LABELERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
