"""LPIPS weights in the published files, from the ``lpips`` package itself: its own v0.1
linear layers and a random backbone (``pnet_rand``: nothing downloaded) written as
torchvision's checkpoint. Returns the package's model on those weights, the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.evaluation.scorer_folders import LPIPS_FILES


def save_lpips_folder(folder: Path, net: str, seed: int = 0):
    """A weights folder in the layout ``load_lpips`` reads, and the package's model on it."""
    import lpips

    torch.manual_seed(seed)
    reference = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    folder.mkdir(parents=True, exist_ok=True)
    backbone = {}
    for key, value in reference.net.state_dict().items():  # slice<k>.<index>.weight
        _, index, name = key.split(".")
        backbone[f"features.{index}.{name}"] = value
    torch.save(backbone, folder / LPIPS_FILES[net][1])
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", folder)
    return reference
