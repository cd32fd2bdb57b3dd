"""What the segment stage draws and records, apart from any model: entity colours, the
semantic map, the box map, masks as COCO RLE, and the prompt tags.

Pure numpy/OpenCV, so hand-made masks and boxes give exactly known pixels in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from datagen.schema import PALETTE, color_tag, palette_rgb
from datagen.seeded import seeded_rng


def entity_colours(key: str, seed: int, count: int) -> list[int]:
    """``count`` distinct palette indices drawn at random, a function of (key, seed) only:
    the paper gives entities random colours (always starting at red would teach "red =
    the first-listed entity"), and a rerun must give the same colours."""
    if count > len(PALETTE):
        raise ValueError(f"{count} entities but the palette has {len(PALETTE)} colours")
    rng = seeded_rng(f"{seed}:{key}")
    return [int(i) for i in rng.permutation(len(PALETTE))[:count]]


def box_thickness(width: int, height: int) -> int:
    """Box outline width: ~0.5% of the long side (2 px at 384, 5 at 1024), so outlines
    survive the resize to the training resolution."""
    return max(2, round(0.005 * max(width, height)))


@dataclass(frozen=True)
class Entity:
    """One found entity: its label, its palette index, its boxes (xyxy pixels) with
    scores, and its mask (the union of its boxes' SAM masks), bool ``[H, W]``."""

    label: str
    colour: int
    boxes: np.ndarray
    scores: np.ndarray
    mask: np.ndarray


def render_semantic(entities: Sequence[Entity], width: int, height: int) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: black, each entity's mask in its colour. Larger masks are
    painted first, so a small entity on top of a large one stays visible."""
    out = np.zeros((height, width, 3), np.uint8)
    for e in sorted(entities, key=lambda e: -int(e.mask.sum())):
        out[e.mask] = palette_rgb(e.colour)
    return out


def render_boxes(entities: Sequence[Entity], width: int, height: int) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: black, each box outlined in its entity's colour (integer
    pixel corners, rounded), larger boxes drawn first."""
    out = np.zeros((height, width, 3), np.uint8)
    thickness = box_thickness(width, height)
    drawn = [(e.colour, box) for e in entities for box in e.boxes]
    drawn.sort(key=lambda cb: -float((cb[1][2] - cb[1][0]) * (cb[1][3] - cb[1][1])))
    for colour, box in drawn:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), palette_rgb(colour), thickness)
    return out


def mask_to_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of 0s):
    ``{"size": [h, w], "counts": [...]}``, readable by pycocotools' ``frPyObjects``."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict[str, object]) -> np.ndarray:
    """The bool ``[h, w]`` mask of :func:`mask_to_rle`'s output."""
    h, w = (int(v) for v in rle["size"])  # type: ignore[union-attr]
    counts = [int(c) for c in rle["counts"]]  # type: ignore[union-attr]
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, not {h}x{w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


def entity_record(e: Entity) -> dict[str, object]:
    """An entity as the json stores it, its two prompt tags included."""
    name = PALETTE[e.colour][1]
    return {
        "label": e.label,
        "color": name,
        "hex": PALETTE[e.colour][0],
        "mask_tag": color_tag(name, "mask", e.label),
        "box_tag": color_tag(name, "boundingbox", e.label),
        "boxes": np.round(np.asarray(e.boxes, np.float64), 1).tolist(),
        "scores": np.round(np.asarray(e.scores, np.float64), 4).tolist(),
        "mask": mask_to_rle(e.mask),
    }
