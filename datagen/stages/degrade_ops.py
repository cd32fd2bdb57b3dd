"""Cheap, model-free condition maps and degradations for the i2i subset.

Every random choice comes from :func:`rng_for`, seeded by (seed, key, purpose),
so a rerun, a resumed job or another worker produces byte-identical pairs
and the parameters recorded in the metadata are enough to recompute them.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from common.edges import canny
from datagen.seeded import seeded_rng

FILL_VALUES = {"black": 0, "gray": 128}


def rng_for(key: str, seed: int, purpose: str) -> np.random.Generator:
    return seeded_rng(f"{seed}/{key}/{purpose}")


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's float-image kernel length (4 sigma each side), normalised to sum 1."""
    radius = max(1, int(round(4.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def correlate_exact(a: np.ndarray, kernel: np.ndarray, border: str) -> np.ndarray:
    """``a`` (float64, H x W [x C]) correlated with a 2-D ``kernel`` of odd sides, as a sum of
    shifted copies over its nonzero taps in row-major order: elementwise IEEE arithmetic in a
    fixed order, bit-identical on every CPU (OpenCV's float filters pick SIMD code by CPU,
    and a shard must not depend on the machine that wrote it). ``border``: ``np.pad``'s mode
    (``reflect`` is OpenCV's BORDER_REFLECT_101, ``symmetric`` its BORDER_REFLECT)."""
    kh, kw = kernel.shape
    h, w = a.shape[:2]
    pad = [(kh // 2, kh // 2), (kw // 2, kw // 2)] + [(0, 0)] * (a.ndim - 2)
    padded = np.pad(a, pad, mode=border)
    out = np.zeros(a.shape, np.float64)
    for dy, dx in zip(*np.nonzero(kernel), strict=True):
        out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


def _separable(a: np.ndarray, down: np.ndarray, across: np.ndarray) -> np.ndarray:
    """``down`` along the rows' axis, then ``across`` along the columns' (OpenCV's default
    border, BORDER_REFLECT_101)."""
    return correlate_exact(correlate_exact(a, down[:, None], "reflect"), across[None, :], "reflect")


_SOBEL_SMOOTH = np.array([1.0, 2.0, 1.0])
_SOBEL_DIFF = np.array([-1.0, 0.0, 1.0])


def soft_edges(image: np.ndarray, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)) -> np.ndarray:
    """A HED-like soft edge map from multi-scale gradients, no network needed.

    HED fuses side outputs at several scales into thick, graded boundaries;
    the max over scales of normalised gradient magnitudes, then a gamma, gives
    the same look: strong object boundaries bright, texture faint. Float64 numpy
    throughout, so a shard's bytes do not depend on the CPU that wrote it.
    """
    gray = _gray(image).astype(np.float64) / 255.0
    fused = np.zeros_like(gray)
    for sigma in sigmas:
        taps = _gaussian_taps(sigma)
        smooth = _separable(gray, taps, taps)
        gx = _separable(smooth, _SOBEL_SMOOTH, _SOBEL_DIFF)
        gy = _separable(smooth, _SOBEL_DIFF, _SOBEL_SMOOTH)
        mag = np.sqrt(gx * gx + gy * gy) * sigma  # scale-normalised
        top = float(np.percentile(mag, 99.5))
        if top <= 1e-6:  # edges cover < 0.5% of pixels (small object, flat background)
            top = float(mag.max())
        if top > 1e-6:
            fused = np.maximum(fused, np.clip(mag / top, 0.0, 1.0))
    return np.round(np.power(fused, 0.6) * 255.0).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A ``length`` px line through the centre, turned by ``angle_deg`` (bilinear), summing
    to 1. Numpy float64 only: OpenCV's float paths (warpAffine, and filter2D's DFT for large
    kernels) pick SIMD code by CPU, and a shard must not depend on the machine that wrote it."""
    centre = (length - 1) / 2.0
    ys, xs = np.mgrid[0:length, 0:length].astype(np.float64)
    a = np.deg2rad(angle_deg)
    # Where each kernel cell comes from in the unturned kernel (one horizontal line).
    src_x = np.cos(a) * (xs - centre) - np.sin(a) * (ys - centre) + centre
    src_y = np.sin(a) * (xs - centre) + np.cos(a) * (ys - centre) + centre
    # Bilinear sampling of a one-pixel row of ones (row length // 2, columns 0..length-1).
    along = np.clip(np.minimum(src_x + 1.0, length - src_x), 0.0, 1.0)
    across = np.clip(1.0 - np.abs(src_y - length // 2), 0.0, 1.0)
    kernel = along * across
    return kernel / max(float(kernel.sum()), 1e-6)


def motion_blur(image: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    """The image correlated with :func:`motion_kernel` (reflected border), bit-identical on
    any CPU (:func:`correlate_exact`; OpenCV's filter2D is not, across SIMD levels)."""
    kernel = motion_kernel(length, angle_deg)
    out = correlate_exact(image.astype(np.float64), kernel, "symmetric")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_blur(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A deblurring pair's input: gaussian or motion blur, parameters returned."""
    if rng.random() < 0.5:
        sigma = float(rng.uniform(1.5, 4.0))
        return gaussian_blur(image, sigma), {"kind": "gaussian", "sigma": round(sigma, 4)}
    length = int(rng.integers(7, 22)) | 1
    angle = float(rng.uniform(0.0, 180.0))
    return motion_blur(image, length, angle), {
        "kind": "motion",
        "length": length,
        "angle": round(angle, 2),
    }


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """An upscaling pair's input, kept at its small size (area filter)."""
    h, w = image.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def box_mask(h: int, w: int, rng: np.random.Generator, max_boxes: int = 3) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        bh = int(rng.uniform(0.15, 0.5) * h)
        bw = int(rng.uniform(0.15, 0.5) * w)
        y0 = int(rng.integers(0, max(1, h - bh)))
        x0 = int(rng.integers(0, max(1, w - bw)))
        mask[y0 : y0 + bh, x0 : x0 + bw] = 255
    return mask


def brush_mask(h: int, w: int, rng: np.random.Generator, max_strokes: int = 4) -> np.ndarray:
    """Free-form strokes as in LaMa / DeepFill: random walks of thick lines."""
    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        width = int(max(3, rng.uniform(0.03, 0.08) * side))
        for _ in range(int(rng.integers(4, 12))):
            angle = rng.uniform(0, 2 * np.pi)
            step = rng.uniform(0.05, 0.2) * side
            nx = int(np.clip(x + step * np.cos(angle), 0, w - 1))
            ny = int(np.clip(y + step * np.sin(angle), 0, h - 1))
            cv2.line(mask, (x, y), (nx, ny), 255, width)
            cv2.circle(mask, (nx, ny), width // 2, 255, -1)
            x, y = nx, ny
    return mask


def inpainting_pair(
    image: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(masked image, mask, params): boxes or brush strokes, filled black or gray."""
    h, w = image.shape[:2]
    kind = "boxes" if rng.random() < 0.5 else "brush"
    mask = box_mask(h, w, rng) if kind == "boxes" else brush_mask(h, w, rng)
    fill = "black" if rng.random() < 0.5 else "gray"
    masked = image.copy()
    masked[mask > 0] = FILL_VALUES[fill]
    coverage = float((mask > 0).mean())
    return masked, mask, {"kind": kind, "fill": fill, "coverage": round(coverage, 4)}


def degrade_all(
    image: np.ndarray,
    key: str,
    seed: int,
    canny_low: int = 100,
    canny_high: int = 200,
    downscale_factors: tuple[int, ...] = (2, 3, 4),
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All i2i conditions of one image and the parameters that made them."""
    blurred, blur_params = random_blur(image, rng_for(key, seed, "blur"))
    factor = int(rng_for(key, seed, "downscale").choice(downscale_factors))
    masked, mask, mask_params = inpainting_pair(image, rng_for(key, seed, "inpaint"))
    maps = {
        "canny": canny(image, canny_low, canny_high),
        "hed": soft_edges(image),
        "blur": blurred,
        "lowres": downscale(image, factor),
        "masked": masked,
        "mask": mask,
    }
    params = {
        "canny": {"low": canny_low, "high": canny_high},
        "blur": blur_params,
        "downscale": {"factor": factor},
        "inpaint": mask_params,
        "seed": seed,
    }
    return maps, params
