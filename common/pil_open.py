"""PIL's own ``Image.open``, for both halves: importing ultralytics (the pose labeler, or a
test that loaded it earlier in the process) replaces ``PIL.Image.open`` with a version that
tries to pip-install a HEIF plugin whenever a file is not an image. A corrupt input must be
a quarantine record or a one-line error, never an install attempt."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

from PIL import Image


def pil_open(fp: str | Path | IO[bytes]) -> Image.Image:
    """``PIL.Image.open`` as PIL ships it, even after ultralytics patched it."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return (original or Image.open)(fp)
