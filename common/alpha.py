"""Transparent images on white, for both halves: datagen's decoder and the benchmark readers
(GSO renders are RGBA, scored on white as EscherNet and Zero123 load them)."""

from __future__ import annotations

from PIL import Image


def flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite on white: transparent pixels hold arbitrary colours underneath."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
