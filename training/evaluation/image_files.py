"""Benchmark image files read as untrusted input: a regular file under a size cap, decoded
by PIL, transparency composited on white (GSO's RGBA renders are scored on white, as
EscherNet and Zero123 load them); anything else is a one-line BenchmarkError naming it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.alpha import flatten_alpha
from common.pil_open import pil_open
from training.evaluation.errors import BenchmarkError

MAX_IMAGE_BYTES = 64 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 [H, W, 3] and its (W, H)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise OSError("not a regular file")
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise OSError(f"over {MAX_IMAGE_BYTES >> 20} MiB")
        with pil_open(io.BytesIO(p.read_bytes())) as img:
            rgb = flatten_alpha(img) if "A" in img.getbands() else img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise BenchmarkError(f"{path}: not a readable image ({exc})") from None
    return np.array(rgb), rgb.size


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), in path order."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
