"""Random builds of the pose labeler's models (``random-tiny``, tests, benches): an
ultralytics YOLO from its packaged YAML and ViTPose from configs (a tiny one and the real
sizes), with seeded random weights and MEANINGLESS outputs, and writers of both in the
formats the loaders read (an ultralytics ``.pt`` as its trainer writes it, a ViTPose
``save_pretrained`` folder).
"""

from __future__ import annotations

# Sets the offline variables before transformers or ultralytics is imported (they read
# them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from pathlib import Path
from typing import Any

import numpy as np
import torch

from datagen.stages.models.common import PERSON

RANDOM_TINY_YOLO_YAML = "yolo11n.yaml"
RANDOM_PERSON_LOGIT = 2.0  # random-tiny person score: sigmoid(2) = 0.88 for every box


def build_random_yolo(seed: int = 0, yaml: str = RANDOM_TINY_YOLO_YAML) -> Any:
    """A random-init ``YOLO`` from ultralytics' packaged YAML (no download).

    Its features barely move the class logits, so every box scores what the head's
    bias says: ultralytics' init (1.6e-4) would find nobody at any real ``person_conf``;
    the person bias is set to :data:`RANDOM_PERSON_LOGIT` instead, so every box scores
    about 0.88 as a person: DAG thresholds up to ~0.85 see people (the mechanics run
    unchanged), ``person_conf >= 0.9`` none. Weights are rounded to fp16, as
    ultralytics saves them, so a saved copy reproduces the model exactly."""
    from ultralytics import YOLO

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yolo = YOLO(yaml)
    head = yolo.model.model[-1]
    for name in ("cv3", "one2one_cv3"):
        for branch in getattr(head, name, None) or ():
            branch[-1].bias.data[PERSON] = RANDOM_PERSON_LOGIT
    yolo.model.half().float()
    yolo.model.eval()
    return yolo


def save_yolo_checkpoint(yolo: Any, path: str | Path) -> None:
    """Write ``yolo`` as ultralytics does (``Model.save``: the model in fp16 in a
    checkpoint dict with date, version, license), plus the ``train_args`` and
    ``train_metrics`` trainer-written checkpoints carry: the real format, for tests and
    benchmarks."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    yolo.ckpt = {
        **(yolo.ckpt or {}),
        "epoch": -1,
        "train_args": dict(DEFAULT_CFG_DICT),
        "train_metrics": {"fitness": np.float64(0.0)},  # numpy scalars, as trainers write
    }
    yolo.save(str(path))


def tiny_vitpose_config() -> Any:
    """A tiny random ViTPose (2 layers, 32 wide, 64x48 crops) with 17 COCO heatmaps."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(
        image_size=[64, 48],
        patch_size=[8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
        layer_norm_eps=1e-6,
    )
    return VitPoseConfig(backbone_config=backbone, num_labels=17)


def _vit_config(hidden: int, heads: int) -> Any:
    """A real-size ViTPose (ViT/16, 12 layers, 256x192 crops, simple decoder, 17
    heatmaps, as the usyd-community checkpoints): random init, nothing downloaded."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(
        image_size=[256, 192],
        patch_size=[16, 16],
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        out_indices=[12],
        layer_norm_eps=1e-6,
    )
    return VitPoseConfig(backbone_config=backbone, num_labels=17, use_simple_decoder=True)


def vitpose_base_config() -> Any:
    """ViTPose-B at real size (768 wide, 12 heads; 86M parameters) for GPU benchmarks."""
    return _vit_config(768, 12)


def vitpose_small_config() -> Any:
    """ViTPose-S at real size (384 wide, 6 heads; 22M parameters) for CPU benchmarks."""
    return _vit_config(384, 6)


def build_random_vitpose(config: Any, seed: int = 0) -> Any:
    """A ViTPose of ``config`` with seeded random weights (the global RNG is left as it
    was); its processor is ``pose.processor_for(config)``."""
    from transformers import VitPoseForPoseEstimation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitPoseForPoseEstimation(config)
    return model.eval()


def save_vitpose(model: Any, processor: Any, folder: str | Path) -> None:
    """A ViTPose folder as the hub has it (config, safetensors, preprocessor config)."""
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
