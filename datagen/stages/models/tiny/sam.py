"""Random SAMs (``random-tiny``, tests, benches): a tiny SAM with seeded random weights
whose masks are MEANINGLESS; :func:`save_tiny_sam` writes it as a real ``.pth``,
:func:`save_random_sam` real architectures with random weights for benches.
"""

from __future__ import annotations

# Sets the offline variables before segment-anything is imported (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from pathlib import Path
from typing import Any

import torch

from datagen.stages.models.common import TINY_SEED
from datagen.stages.models.sam_arch import SAM_ARCHS, SamArch, build_sam

TINY_SAM = SamArch(
    embed_dim=32,
    depth=2,
    num_heads=2,
    global_attn_indexes=(1,),
    img_size=128,
    window_size=4,
    out_chans=32,
    mask_in_chans=8,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def random_sam(arch: SamArch = TINY_SAM, seed: int = TINY_SEED) -> Any:
    """A Sam of ``arch`` with seeded random weights (global RNG untouched). MEANINGLESS
    masks: mechanics only. The relative position tables (zero-initialised) get small
    random values too, so every weight of the loading path is exercised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(arch)
        with torch.no_grad():
            for name, param in sam.named_parameters():
                if "rel_pos" in name:
                    param.normal_(0.0, 0.02)
    return sam


def save_random_sam(path: str | Path, arch: str | SamArch = "vit_b", seed: int = TINY_SEED) -> Path:
    """A random SAM written as the official format (``torch.save`` of the state dict), for
    benches: ``arch`` is ``vit_b`` / ``vit_l`` / ``vit_h`` or a :class:`SamArch`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SAM_ARCHS[arch] if isinstance(arch, str) else arch
    torch.save(random_sam(spec, seed).state_dict(), path)
    return path


def save_tiny_sam(path: str | Path) -> Path:
    """The ``random-tiny`` SAM as a ``.pth`` state dict (same weights as in memory)."""
    return save_random_sam(path, TINY_SAM)
