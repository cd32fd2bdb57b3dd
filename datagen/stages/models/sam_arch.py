"""SAM v1's architecture (``segment_anything``): the numbers that fix a model, the released
sizes, one builder for every size, and the architecture read off a state dict, so the
loader (:mod:`datagen.stages.models.sam`) and the random builds
(:mod:`datagen.stages.models.tiny.sam`) share them.
"""

from __future__ import annotations

# Sets the offline variables before segment-anything is imported (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from datagen.stages.models.common import CheckpointError


@dataclass(frozen=True)
class SamArch:
    """A SAM v1 architecture: what ``segment_anything.build_sam._build_sam`` fixes, plus the
    numbers it hard-codes, so tiny and real models share one builder. ``decoder_heads`` is
    the one number a state dict does not record (every released SAM uses 8)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    out_chans: int = 256  # also the prompt embedding / mask decoder width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


SAM_ARCHS: dict[str, SamArch] = {  # segment_anything.build_sam's registry
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
}
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam(arch: SamArch) -> Any:
    """A ``segment_anything`` Sam of ``arch`` (weights as its modules initialise them)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = arch.img_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=arch.img_size,
            mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=arch.patch_size,
            qkv_bias=arch.qkv_bias,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.out_chans,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_heads,
            ),
            transformer_dim=arch.out_chans,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def _count(state: dict[str, Any], prefix: str) -> int:
    """How many ``prefix{i}.`` indices the keys hold (0, 1, ... contiguous)."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    n = 0
    while n in found:
        n += 1
    return n


def infer_sam_arch(state: dict[str, Any]) -> SamArch:
    """The architecture a SAM v1 state dict was saved from, read off its shapes:
    patch embedding -> width and patch size; ``pos_embed`` [1, img/p, img/p, C] -> input
    size; block count -> depth; ``rel_pos_h`` [2 * n - 1, head_dim] -> heads, and per block
    global attention (n = img/p) or windowed (n = window); the neck -> output channels;
    the prompt encoder and mask decoder -> their sizes."""
    need = (
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.blocks.0.mlp.lin1.weight",
        "image_encoder.neck.0.weight",
        "prompt_encoder.mask_downscaling.3.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.transformer.layers.0.mlp.lin1.weight",
        "mask_decoder.iou_prediction_head.layers.0.weight",
    )
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(
            f"not a SAM (segment_anything v1) state dict: lacks {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}"
        )
    shape = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    embed_dim, _, patch, _ = shape["image_encoder.patch_embed.proj.weight"]
    grid = shape["image_encoder.pos_embed"][1]
    depth = _count(state, "image_encoder.blocks.")
    head_dim = shape["image_encoder.blocks.0.attn.rel_pos_h"][1]
    global_idx: list[int] = []
    windows: set[int] = set()
    for i in range(depth):
        n = (shape.get(f"image_encoder.blocks.{i}.attn.rel_pos_h", (0,))[0] + 1) // 2
        if n == grid:
            global_idx.append(i)
        else:
            windows.add(n)
    if len(windows) > 1:
        raise CheckpointError(f"SAM state dict: blocks use different window sizes {windows}")
    mlp_dim = shape["image_encoder.blocks.0.mlp.lin1.weight"][0]
    return SamArch(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(global_idx),
        img_size=grid * patch,
        patch_size=patch,
        window_size=windows.pop() if windows else 0,
        mlp_ratio=mlp_dim / embed_dim,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        out_chans=shape["image_encoder.neck.0.weight"][0],
        mask_in_chans=shape["prompt_encoder.mask_downscaling.3.weight"][0],
        decoder_depth=_count(state, "mask_decoder.transformer.layers."),
        decoder_mlp_dim=shape["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0],
        num_multimask_outputs=shape["mask_decoder.mask_tokens.weight"][0] - 1,
        iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=shape["mask_decoder.iou_prediction_head.layers.0.weight"][0],
    )
