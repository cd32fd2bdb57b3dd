"""Random DepthAnything-v2 builds (``random-tiny``, tests, benches): a tiny DepthAnything
built from a config with seeded random weights and the DA-v2 preprocessing built in code.
Its depth maps are MEANINGLESS: it exists so the mechanics (batching, shapes, rendering,
the pipeline) run anywhere without weights. :func:`small_config` and :func:`large_config`
give the real DA-v2-Small / -Large architectures, randomly initialised, for throughput
benches; :func:`save_tiny` / :func:`save_random` write the real ``save_pretrained`` format.
"""

from __future__ import annotations

# Sets the offline variables before transformers is imported below (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from pathlib import Path

import torch
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
)

from datagen.stages.models.common import TINY_SEED

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
