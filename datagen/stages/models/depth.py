"""DepthAnything-v2 through transformers: loading (offline) and batched inference.

Model code lives here, apart from the stage (``depth.py``), and is imported only in
``DepthStage.setup()`` on a worker: the driver validates a DAG without importing torch
or transformers.

Two ways to get a model:

- a local folder in the ``save_pretrained`` format (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``), loaded offline
  (``local_files_only``, safetensors only: no pickle from a weights folder);
- ``random-tiny``: a tiny DepthAnything with seeded random weights and MEANINGLESS
  depth maps, from :mod:`datagen.stages.models.tiny.depth` (which also holds the real
  DA-v2 architectures, randomly initialised, for throughput benches).

Images of different sizes: the processor keeps each image's aspect ratio and makes
both sides multiples of the patch size (14), as DA-v2 is run at release, so images
of different shapes get different input sizes. They are grouped by input size and
each group runs in sub-batches of ``micro_batch``. Resizing every image to one fixed
square instead would batch everything but squash the geometry the model sees
(relative depth from a stretched photo is a different, worse label), and padding to
a common size changes the prediction itself (the ViT attends over the padding), so
a row's label would depend on its batch neighbours. Grouping keeps each label
exactly what the image alone would get; photos come in a few common aspect ratios,
and the multiple-of-14 rounding merges nearby ones, so groups stay large.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    TINY_SEED,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
)


class DepthModel:
    """A DepthAnything model and its processor on one device: RGB images in, relative
    inverse depth (larger = nearer, unknown scale and shift) out, at each image's size."""

    def __init__(self, model: Any, processor: Any, device: Any, dtype: Any):
        if getattr(model.config, "depth_estimation_type", "relative") != "relative":
            raise ValueError(
                "depth model is a metric-depth model (larger = farther); the depth subset "
                "stores relative inverse depth: use a relative DepthAnything checkpoint"
            )
        if getattr(model.head, "max_depth", 1) is None:  # relative head multiplies by it
            model.head.max_depth = 1
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype

    @classmethod
    def load(
        cls, weights: str, device: str = "auto", dtype: str = "auto", seed: int = TINY_SEED
    ) -> DepthModel:
        """``weights``: a local ``save_pretrained`` folder (offline, safetensors only) or
        ``random-tiny`` (meaningless labels; ``seed`` picks its random weights)."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if weights == RANDOM_TINY:
            from datagen.stages.models.tiny.depth import (
                TINY_INPUT_SIZE,
                da_v2_processor,
                random_model,
                tiny_config,
            )

            return cls(random_model(tiny_config(), seed), da_v2_processor(TINY_INPUT_SIZE), dev, dt)
        path = Path(weights)
        check_pretrained_folder(path, "depth", PROCESSOR_FILES)
        model = DepthAnythingForDepthEstimation.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dt
        )
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, dev, dt)

    def _preprocess(self, images: Sequence[np.ndarray], input_size: int | None) -> list[Any]:
        kwargs: dict[str, Any] = {}
        if input_size is not None:
            kwargs["size"] = {"height": input_size, "width": input_size}
        out = self.processor(
            images=list(images),
            return_tensors=None,
            input_data_format="channels_last",
            device=self.device,
            **kwargs,
        )
        return list(out["pixel_values"])

    @torch.inference_mode()
    def predict(
        self, images: Sequence[np.ndarray], micro_batch: int = 8, input_size: int | None = None
    ) -> list[np.ndarray]:
        """float32 ``[H, W]`` relative inverse depth for each RGB uint8 ``[H, W, 3]`` image.

        Images with the same input size run together, ``micro_batch`` per forward pass;
        each prediction is upsampled (bilinear, antialiased when shrinking: no overshoot,
        so the map keeps the model's range) to its own image's size in float32.
        ``input_size`` overrides the processor's target size (518 for the released models).
        """
        if not images:
            return []
        pixels = self._preprocess(images, input_size)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape[-2:]), []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            for part in chunks(members, micro_batch):
                x = torch.stack([pixels[i] for i in part]).to(self.device, self.dtype)
                pred = self.model(pixel_values=x).predicted_depth.float()
                for j, i in enumerate(part):
                    h, w = images[i].shape[:2]
                    up = torch.nn.functional.interpolate(
                        pred[j][None, None],
                        size=(h, w),
                        mode="bilinear",
                        align_corners=False,
                        antialias=h < pred.shape[-2] or w < pred.shape[-1],
                    )
                    out[i] = up[0, 0].cpu().numpy().astype(np.float32, copy=False)
        return out  # type: ignore[return-value]
