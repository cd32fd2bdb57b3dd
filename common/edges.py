"""The canny edge map both halves share: datagen draws the i2i subset's ``canny`` condition
with it, and the evaluation scores canny2image with it (the generation's edges against the
condition's), so the two never drift apart."""

from __future__ import annotations

import cv2
import numpy as np


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """White edges on black, ``[H, W] uint8``, ControlNet's usual thresholds."""
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (3, 3), 0)
    return cv2.Canny(gray, low, high, L2gradient=True)
