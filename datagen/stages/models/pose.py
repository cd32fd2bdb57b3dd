"""The pose labeler's models: an ultralytics YOLO person detector and a transformers
ViTPose keypoint model. Imported only in ``PoseStage.setup()`` (on the worker): it
pulls in torch, ultralytics and transformers.

Checkpoints are untrusted data. Ultralytics reads a ``.pt`` with full pickle (code
runs on load), so :func:`~datagen.stages.models.safe_pt.safe_torch_load` reads it
instead (scanned, then weights-only with a minimal allowlist: no pickle code runs), and
the model it returns is handed to ultralytics, which never opens the file.
``random-tiny`` models come from :mod:`datagen.stages.models.tiny.pose`.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datagen.stages.models.common import PERSON, RANDOM_TINY, TINY_SEED, chunks
from datagen.stages.models.safe_pt import UnsafeCheckpoint, safe_torch_load

# -- the person detector ------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """One image's persons: pixel ``xyxy`` boxes ``[N, 4]`` and scores ``[N]``, best first."""

    boxes: np.ndarray
    scores: np.ndarray


def _wrap_yolo(model: nn.Module, ckpt: dict[str, Any], source: str) -> Any:
    """A ``YOLO`` around an already loaded detection model: ultralytics' own ``.pt``
    loading (full pickle) is replaced, everything else (predictor, NMS, letterbox) is
    ultralytics' as usual."""
    from ultralytics import YOLO

    class _PreloadedYOLO(YOLO):
        def _load(self, weights: str, task: str | None = None) -> None:
            self.model, self.ckpt = model, ckpt
            self.task = model.task
            self.overrides = self.model.args = self._reset_ckpt_args(model.args)
            self.overrides.pop("data", None)  # a path the checkpoint names: never opened
            self.ckpt_path = None
            self.overrides["model"] = weights
            self.overrides["task"] = self.task
            self.model_name = weights

    return _PreloadedYOLO(source)


def load_yolo_checkpoint(path: str) -> Any:
    """A ``YOLO`` from an ultralytics ``.pt`` (as its trainer or ``YOLO.save`` writes
    it), read by :func:`safe_torch_load`; the model is prepared as ultralytics'
    ``load_checkpoint`` does (fp32, args, eval)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import DetectionModel, guess_model_task

    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise UnsafeCheckpoint(f"{path}: not an ultralytics checkpoint (no checkpoint dict)")
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, DetectionModel):
        raise UnsafeCheckpoint(
            f"{path}: holds {type(model).__name__}, not an ultralytics detection model"
        )
    train_args = ckpt.get("train_args") or {}
    model = model.float().eval()
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else {})}
    model.pt_path = str(path)
    model.task = getattr(model, "task", None) or guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
    return _wrap_yolo(model, ckpt, str(path))


class PersonDetector:
    """Batched YOLO person detection over RGB images."""

    def __init__(self, yolo: Any, device: torch.device, half: bool, imgsz: int, iou: float):
        self.yolo, self.device, self.half, self.imgsz, self.iou = yolo, device, half, imgsz, iou

    def _precision(self) -> dict[str, Any]:
        """fp16 on a GPU when asked: ``quantize`` in ultralytics 8.4 (``half`` before)."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        if "quantize" in DEFAULT_CFG_DICT:
            return {"quantize": 16 if self.half else 32}
        return {"half": self.half}

    def __call__(self, images: Sequence[np.ndarray], conf: float, batch: int) -> list[Detections]:
        """Persons scored above ``conf`` in each image (pixel boxes, clipped to it)."""
        out: list[Detections] = []
        device = "cpu" if self.device.type == "cpu" else str(self.device.index or 0)
        for part in chunks(list(images), batch):
            results = self.yolo.predict(
                # ultralytics reads numpy as BGR: flip the RGB channels
                [np.ascontiguousarray(im[..., ::-1]) for im in part],
                conf=min(max(float(conf), 0.0), 1.0),  # it refuses values outside [0, 1]
                iou=self.iou,
                classes=[PERSON],
                rect=False,  # always the square letterbox: an image's boxes never depend on its batch
                imgsz=self.imgsz,
                device=device,
                **self._precision(),
                batch=len(part),
                verbose=False,
            )
            for r in results:
                boxes = r.boxes.xyxy.float().cpu().numpy().reshape(-1, 4).astype(np.float64)
                scores = r.boxes.conf.float().cpu().numpy().reshape(-1).astype(np.float64)
                keep = scores > conf
                order = np.argsort(-scores[keep], kind="stable")
                out.append(Detections(boxes[keep][order], scores[keep][order]))
        return out


def load_detector(
    weights: str,
    device: torch.device,
    half: bool,
    imgsz: int,
    iou: float,
    seed: int = TINY_SEED,
    build: Callable[[int], Any] | None = None,
    load: Callable[[str], Any] = load_yolo_checkpoint,
) -> PersonDetector:
    """From a local ``.pt`` (safely, ``load``) or ``random-tiny`` (``build``, by default
    the random YOLO11n of :mod:`datagen.stages.models.tiny.pose`); the face check passes
    its own one-class pair."""
    if weights == RANDOM_TINY:
        if build is None:
            from datagen.stages.models.tiny.pose import build_random_yolo

            build = build_random_yolo
        yolo = build(seed)
    else:
        yolo = load(weights)
    yolo.model.to(device)
    return PersonDetector(yolo, device, half, imgsz, iou)


# -- ViTPose ----------------------------------------------------------------------------


def processor_for(config: Any) -> Any:
    """The image processor matching a config's crop size (built in code, offline)."""
    from transformers import VitPoseImageProcessor

    height, width = config.backbone_config.image_size
    return VitPoseImageProcessor(size={"height": int(height), "width": int(width)})


def load_vitpose(folder: str) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder, offline; a folder without a
    preprocessor config gets the default processor at the model's crop size."""
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

    model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True)
    if (Path(folder) / "preprocessor_config.json").exists():
        processor = VitPoseImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        processor = processor_for(model.config)
    return model.eval(), processor


class PoseEstimator:
    """Top-down ViTPose over every person of every image, in sub-batches of
    ``micro_batch`` persons (crops are made per sub-batch, so memory stays bounded)."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.device, self.dtype = processor, device, dtype
        self.moe = int(getattr(model.config.backbone_config, "num_experts", 1) or 1) > 1

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], micro_batch: int
    ) -> list[np.ndarray]:
        """COCO-17 keypoints ``[N_i, 17, 3]`` (x, y, score in image pixels) of each
        image's ``[N_i, 4]`` xyxy boxes."""
        from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

        persons = [(i, j) for i, b in enumerate(boxes) for j in range(len(b))]
        out = [np.zeros((len(b), 17, 3), dtype=np.float64) for b in boxes]
        for part in chunks(persons, micro_batch):
            by_image: dict[int, list[int]] = {}
            for i, j in part:
                by_image.setdefault(i, []).append(j)
            order = sorted(by_image)
            xywh = [
                [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes[i][by_image[i]].tolist()]
                for i in order
            ]
            inputs = self.processor(
                images=[images[i] for i in order], boxes=xywh, return_tensors="pt"
            )
            pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
            kwargs: dict[str, Any] = {}
            if self.moe:  # ViTPose+ experts: index 0 is COCO
                kwargs["dataset_index"] = torch.zeros(
                    len(pixels), dtype=torch.long, device=self.device
                )
            heatmaps = self.model(pixel_values=pixels, **kwargs).heatmaps.float().cpu()
            results = self.processor.post_process_pose_estimation(
                VitPoseEstimatorOutput(heatmaps=heatmaps), boxes=xywh
            )
            for i, per_image in zip(order, results, strict=True):
                for j, person in zip(by_image[i], per_image, strict=True):
                    out[i][j, :, :2] = person["keypoints"].numpy()
                    out[i][j, :, 2] = person["scores"].numpy().reshape(-1)
        return out


def load_pose_estimator(
    weights: str, device: torch.device, dtype: torch.dtype, seed: int = TINY_SEED
) -> PoseEstimator:
    """From a local ViTPose folder or ``random-tiny``."""
    if weights == RANDOM_TINY:
        from datagen.stages.models.tiny.pose import build_random_vitpose, tiny_vitpose_config

        model = build_random_vitpose(tiny_vitpose_config(), seed)
        processor = processor_for(model.config)
    else:
        model, processor = load_vitpose(weights)
    return PoseEstimator(model, processor, device, dtype)
