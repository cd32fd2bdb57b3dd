"""Pixels <-> image files: [-1, 1] tensors as 8-bit RGB or 16-bit depth PNGs, grids."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from common.pil_open import pil_open
from training.config import ConfigError
from training.data.views import to_unit


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> HxWx3 uint8."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def load_image(path: str | Path, size: tuple[int, int] | None, multiple: int = 16) -> torch.Tensor:
    """An image -> [3, H, W] in [-1, 1], resized to ``size`` (or its own size rounded down to
    a multiple of ``multiple``, the VAE x patch stride).

    8-bit images map as training maps them, ``(v - 127.5) / 127.5``. 16-bit gray images (the
    depth subset's ``depth.png``) keep their precision: ``(v - 32767.5) / 32767.5`` over
    0..65535, the training reader's mapping, in all three channels, instead of PIL's RGB
    conversion, which clips everything above 255 to white."""
    if not Path(path).is_file():  # missing, a folder, a FIFO or a device: never opened
        raise ConfigError(f"--image {path} is not a readable image file")
    try:
        with pil_open(path) as opened:  # PIL's own, even after ultralytics patched it
            opened.load()
            wide = opened.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I")
            img = opened.copy() if wide else opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"--image {path} is not a readable image ({exc})") from None
    if size is None:
        w, h = img.size
        size = (max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple))
    # Native pixels (uint16 gray or uint8 RGB), resized in their own type, then the training
    # reader's own mapping to [-1, 1] (``training.data.views.to_unit``): one mapping, not two.
    arr = np.asarray(img).clip(0, 65535).astype(np.uint16) if wide else np.asarray(img)
    if arr.shape[:2] != size:
        arr = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(to_unit(arr))


def save_view(pixels: torch.Tensor, field: str, path: Path) -> Path:
    """One view [3, H, W] in [-1, 1] as a PNG in the format of the sample field it stands
    for: ``depth.png`` as a 16-bit gray PNG (the depth subset's format, channels averaged,
    near = bright), anything else 8-bit RGB."""
    if field == "depth.png":
        unit = (pixels.float().mean(0).clamp(-1, 1) + 1) / 2
        depth = (unit * 65535).round().to(torch.int32).cpu().numpy().astype(np.uint16)
        Image.fromarray(depth).save(path)  # uint16 -> mode I;16, written as 16-bit PNG
    else:
        Image.fromarray(to_uint8(pixels)).save(path)
    return path
