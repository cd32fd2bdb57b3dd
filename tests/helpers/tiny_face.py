"""Face weights in the published files, random: a tiny ArcFace IResNet saved in
arcface_torch's keys (``backbone.pth``) and a random one-class face YOLO saved as ultralytics
saves it (``detector.pt``; mechanics only: its faces are meaningless, scored about 0.88)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.evaluation.arcface import IResNet
from training.evaluation.scorer_folders import FACE_BACKBONE, FACE_DETECTOR


def tiny_arcface(seed: int = 0) -> IResNet:
    torch.manual_seed(seed)
    net = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 8, 16)
    for m in net.modules():  # non-trivial running statistics, as a trained net has
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def save_face_folder(folder: Path) -> Path:
    from datagen.stages.models.tiny.face import build_random_face_yolo
    from datagen.stages.models.tiny.pose import save_yolo_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_arcface().state_dict(), folder / FACE_BACKBONE)
    save_yolo_checkpoint(build_random_face_yolo(0), folder / FACE_DETECTOR)
    return folder
