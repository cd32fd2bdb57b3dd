"""Every stage a DAG can name (the one registry), imported on first use.

A stage module imports only light things at its top (its ``Params`` are read on the driver
to validate a DAG); its model wrapper lives in ``datagen.stages.models``, imported in
``setup()`` on the worker; helpers a stage alone uses sit beside it (``degrade_ops``,
``entities``, ``segment_render``, ``pose_render``). The protocol every stage follows is
``protocol.py``; ``runner.py`` runs one over a batch.
"""

from __future__ import annotations

import importlib

from datagen.stages.protocol import Stage

LABELERS: dict[str, str] = {
    "decode": "datagen.stages.decode:DecodeStage",
    "caption": "datagen.stages.caption:CaptionStage",
    "segment": "datagen.stages.segment:SegmentStage",
    "degrade": "datagen.stages.degrade:DegradeStage",
    "depth": "datagen.stages.depth:DepthStage",
    "pose": "datagen.stages.pose:PoseStage",
    "scene": "datagen.stages.scene:SceneStage",
    "face": "datagen.stages.face:FaceStage",
    "identity": "datagen.stages.identity:IdentityStage",
}


def labeler(name: str) -> type[Stage]:
    """The Stage class registered as ``name``."""
    if name not in LABELERS:
        raise KeyError(f"unknown labeler {name!r}; known: {sorted(LABELERS)}")
    module, cls = LABELERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
