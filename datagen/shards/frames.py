"""Which world a subset's stored cameras are in, recorded in its manifest.

Normalised cameras (and the rays training computes from them) depend on the world chosen
for camera 0 (``datagen.cameras.CAMERA_FRAME``). Outputs made before the released loader's
frame was adopted hold cameras turned 180° about camera 0's axis; a fit over both, or a
resume that appends one to the other, would train on two sign conventions at once without
a word. The manifest says the frame; datagen and training refuse a subset that says another
(or nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datagen.cameras import CAMERA_FRAME
from datagen.schema import SUBSETS

FRAME_KEY = "camera_frame"


def has_cameras(subset: str) -> bool:
    spec = SUBSETS.get(subset)
    return spec is not None and spec.kind == "multiview"


def frame_fields(subset: str) -> dict[str, str]:
    """What a manifest of ``subset`` records about its cameras' world."""
    return {FRAME_KEY: CAMERA_FRAME} if has_cameras(subset) else {}


def frame_problem(manifest: Mapping[str, Any], subset: str) -> str | None:
    """Why the cameras of a subset's manifest are not in today's frame, or None."""
    if not has_cameras(subset):
        return None
    frame = manifest.get(FRAME_KEY)
    if frame == CAMERA_FRAME:
        return None
    made = (
        f"frame {frame!r}"
        if frame
        else "OpenCV camera-0 frame (made before the scene stage's version 2)"
    )
    return (
        f"its cameras are in the {made}, not {CAMERA_FRAME!r}, the released model's; "
        "rebuild the subset into a new --output"
    )
