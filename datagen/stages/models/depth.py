"""DepthAnything-v2 through transformers: loading (offline), random builds, batched inference.

Model code lives here, apart from the stage (``depth.py``), and is imported only in
``DepthStage.setup()`` on a worker: the driver validates a DAG without importing torch
or transformers.

Two ways to get a model:

- a local folder in the ``save_pretrained`` format (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``), loaded offline
  (``local_files_only``, safetensors only: no pickle from a weights folder);
- ``random-tiny``: a tiny DepthAnything built from a config with seeded random
  weights and the DA-v2 preprocessing built in code. Its depth maps are
  MEANINGLESS: it exists so the mechanics (batching, shapes, rendering, the
  pipeline) run anywhere without weights. :func:`large_config` gives the real
  DA-v2-Large architecture, randomly initialised, for GPU throughput benches.

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

# isort: split

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
)

from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
)

TINY_SEED = 0  # one random-tiny model everywhere, whatever the DAG's seed
TINY_INPUT_SIZE = 126  # 9 patches: fast on CPU; the real models use 518
DA_V2_INPUT_SIZE = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _config(
    width: int,
    layers: int,
    heads: int,
    out_indices: list[int],
    neck: list[int],
    fusion: int,
    head: int = 32,
    mlp_ratio: int = 4,
    image_size: int = DA_V2_INPUT_SIZE,
) -> DepthAnythingConfig:
    """A DepthAnything-v2 layout: a DINOv2 ViT/14 backbone of ``width`` x ``layers`` read
    at ``out_indices``, a DPT neck, a relative-depth head (the transformers conversion
    script's settings; patch 14, reassemble factors 4, 2, 1, 0.5)."""
    backbone = Dinov2Config(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=mlp_ratio,
        patch_size=14,
        image_size=image_size,
        out_indices=out_indices,
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=width,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=neck,
        fusion_hidden_size=fusion,
        head_hidden_size=head,
        head_in_index=-1,
        depth_estimation_type="relative",
        max_depth=1,
    )


def tiny_config() -> DepthAnythingConfig:
    """A ~120k-parameter DepthAnything (4-layer Dinov2 backbone): mechanics only."""
    return _config(
        32, 4, 2, [1, 2, 3, 4], [8, 16, 32, 32], 16, head=8, mlp_ratio=2, image_size=TINY_INPUT_SIZE
    )


def small_config() -> DepthAnythingConfig:
    """Depth-Anything-V2-Small (24.8M parameters): ViT-S/14 read at layers 3, 6, 9, 12. For
    CPU benchmarks with random weights (``bench/labelers.py``): inference dominates as it
    does for real."""
    return _config(384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64)


def large_config() -> DepthAnythingConfig:
    """``depth-anything/Depth-Anything-V2-Large-hf`` (335.3M parameters): ViT-L/14 read at
    layers 5, 12, 18, 24, neck [256, 512, 1024, 1024], fusion 256; never downloaded."""
    return _config(1024, 24, 16, [5, 12, 18, 24], [256, 512, 1024, 1024], 256)


def da_v2_processor(size: int = DA_V2_INPUT_SIZE) -> DPTImageProcessor:
    """The DA-v2 preprocessing (the released ``preprocessor_config.json``), built in code:
    bicubic resize keeping the aspect ratio to multiples of 14, ImageNet normalisation."""
    return DPTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=False,
    )


def random_model(
    config: DepthAnythingConfig, seed: int = TINY_SEED
) -> DepthAnythingForDepthEstimation:
    """``config`` with seeded random weights (the global RNG is left as it was).

    transformers initialises convolutions with std 0.02, which shrinks the signal
    through the DPT neck to ~1e-7 at the output: flat after 16-bit scaling and zero
    in fp16. The neck and head convolutions get PyTorch's default init instead, so a
    random model gives O(0.1) maps that vary with the image, in every dtype.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
        for module in (*model.neck.modules(), *model.head.modules()):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.reset_parameters()
    return model.eval()


def save_random(
    folder: str | Path,
    config: DepthAnythingConfig | None = None,
    processor: DPTImageProcessor | None = None,
    seed: int = TINY_SEED,
) -> Path:
    """Write a random model + processor in the real ``save_pretrained`` format (safetensors),
    so tests and benches exercise the production loading path. Default: the tiny one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    random_model(config or tiny_config(), seed).save_pretrained(folder, safe_serialization=True)
    (processor or da_v2_processor(TINY_INPUT_SIZE)).save_pretrained(folder)
    return folder


def save_tiny(folder: str | Path) -> Path:
    """The ``random-tiny`` model + processor saved to ``folder`` (same weights as in memory)."""
    return save_random(folder)


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
