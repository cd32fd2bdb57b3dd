"""ArcFace's IResNet (Deng et al. 2019; insightface ``recognition/arcface_torch``) in plain
PyTorch, shaped by the state dict it loads: ``backbone.pth`` of an arcface_torch model
(``iresnet50`` / ``iresnet100`` ...: blocks per stage and widths read from its keys), so
any depth of the published family loads, and a tiny one saved in the same keys tests it.

Input: 112 x 112 RGB face crops scaled to [-1, 1] (arcface_torch's ``(x / 255 - 0.5) / 0.5``);
output: the ``num_features`` embedding (512 for the published models).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from common.safe_pt import first_line
from training.config import ConfigError

INPUT = 112
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...], widths: tuple[int, ...], stem: int, features: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = _bn(stem)
        self.prelu = nn.PReLU(stem)
        cin = stem
        for k, (n, width) in enumerate(zip(blocks, widths, strict=True), 1):
            layers = [
                IBasicBlock(cin if i == 0 else width, width, 2 if i == 0 else 1) for i in range(n)
            ]
            setattr(self, f"layer{k}", nn.Sequential(*layers))
            cin = width
        self.bn2 = _bn(cin)
        self.fc = nn.Linear(cin * (INPUT // 16) ** 2, features)
        self.features = nn.BatchNorm1d(features, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def shape_of(state: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(blocks per stage, stage widths, stem width, embedding size) of a state dict."""
    counts = [0, 0, 0, 0]
    widths = [0, 0, 0, 0]
    for key, value in state.items():
        if m := _BLOCK.match(key):
            k = int(m.group(1)) - 1
            counts[k] = max(counts[k], int(m.group(2)) + 1)
            widths[k] = int(value.shape[0])
    if not all(counts) or "conv1.weight" not in state or "fc.weight" not in state:
        raise KeyError("no IResNet layer1..layer4 / conv1 / fc keys")
    return (
        tuple(counts),
        tuple(widths),
        int(state["conv1.weight"].shape[0]),
        int(state["fc.weight"].shape[0]),
    )


def load_arcface(path: str | Path, device: str = "cpu", flag: str = "--face") -> IResNet:
    """An arcface_torch ``backbone.pth`` (read weights-only), in eval mode; one ConfigError
    line when it is not one."""
    from common.safe_pt import weights_only_load
    from common.weights_check import READ_ERRORS

    try:
        state = weights_only_load(str(path))
        if not isinstance(state, dict):
            raise KeyError("not a state dict")
        net = IResNet(*shape_of(state))
        net.load_state_dict(state)
    except (*READ_ERRORS, RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise ConfigError(
            f"{flag} {path}: not an arcface_torch IResNet backbone ({first_line(exc)})"
        ) from None
    return net.eval().to(device)
