"""LPIPS (Zhang et al. 2018, v0.1) in plain PyTorch, from local weights: the backbone's
torchvision checkpoint and the ``lpips`` package's linear layers, never a download.

A weights folder holds, for the VGG variant, ``vgg.pth`` (the package's
``lpips/weights/v0.1/vgg.pth``: ``lin0.model.1.weight`` ... ``lin4``) and torchvision's
``vgg16-397923af.pth``; for AlexNet (the package's default) ``alex.pth`` and
``alexnet-owt-7be5be79.pth``. VGG is used when both are there (the NVS papers' choice). The
features are the backbone's ReLU taps, unit-normalised over channels, their squared
difference weighted per channel by the linear layers and averaged over space, summed over
taps: the package's ``LPIPS(net=..., version="0.1")`` forward, module for module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from common.safe_pt import first_line
from training.config import ConfigError
from training.evaluation.scorer_folders import LPIPS_FILES, lpips_folder_problem, lpips_net

# torchvision's feature layers: ints are 3x3 convs (padding 1) + ReLU, "M" a 2x2 max pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (3, 8, 15, 22, 29)
_ALEX_TAPS = (1, 4, 7, 9, 11)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU()]
            channels = int(v)
    return nn.Sequential(*layers)


def _alex_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class LPIPS(nn.Module):
    """``forward(a, b)``: [N] distances of [N, 3, H, W] images in [-1, 1]."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        if net not in LPIPS_FILES:
            raise ValueError(f"net: one of {', '.join(LPIPS_FILES)}, got {net!r}")
        self.net = net
        self.features = _vgg_features() if net == "vgg" else _alex_features()
        self.taps = _VGG_TAPS if net == "vgg" else _ALEX_TAPS
        widths = [self.features[t - 1].out_channels for t in self.taps]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        total = torch.zeros(a.shape[0], device=a.device)
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b), strict=True):
            total = total + lin((fa - fb) ** 2).mean((1, 2, 3))
        return total

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """One pair of float [H, W, 3] images in [0, 1]."""
        device = self.shift.device
        x, y = (torch.from_numpy(np.asarray(v, np.float32)).permute(2, 0, 1)[None] for v in (a, b))
        return float(self(x.to(device) * 2 - 1, y.to(device) * 2 - 1)[0])


def _load(path: Path) -> dict[str, Tensor]:
    from common.safe_pt import weights_only_load
    from common.weights_check import READ_ERRORS

    try:
        state = weights_only_load(str(path))
    except (*READ_ERRORS, RuntimeError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: not a PyTorch state dict ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict")
    return state


def load_lpips(folder: str | Path, device: str = "cpu", flag: str = "--lpips") -> LPIPS:
    """LPIPS from a weights folder (see the module docstring); one ConfigError line naming
    what is missing or does not fit."""
    root = Path(folder)
    problem = lpips_folder_problem(root, flag)
    if problem:
        raise ConfigError(problem)
    net = lpips_net(root) or "vgg"
    lin_file, backbone_file = LPIPS_FILES[net]
    model = LPIPS(net)
    backbone = _load(root / backbone_file)
    lins = _load(root / lin_file)
    state = {
        f"features.{k[len('features.') :]}": v
        for k, v in backbone.items()
        if k.startswith("features.") and int(k.split(".")[1]) <= model.taps[-1]
    }
    missing = [f"lin{i}.model.1.weight" for i in range(5) if f"lin{i}.model.1.weight" not in lins]
    if missing:
        raise ConfigError(f"{flag} {root / lin_file}: no {missing[0]} (the lpips package's layers)")
    state |= {f"lins.{i}.weight": lins[f"lin{i}.model.1.weight"] for i in range(5)}
    state |= {"shift": model.shift, "scale": model.scale}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"{flag} {folder}: the weights do not fit LPIPS-{net} ({first_line(exc)})"
        ) from None
    return model.eval().to(device)
