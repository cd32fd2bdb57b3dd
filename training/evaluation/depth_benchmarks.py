"""Depth estimation benchmarks (the paper's Table 4) in the layouts Marigold evaluates:

* ``nyuv2``: NYUv2's 654 Eigen test images, ``nyu_labeled_extracted`` (Marigold's
  evaluation data): ``test/<scene>/rgb_XXXX.png`` (480 x 640 RGB) and ``depth_XXXX.png``
  (uint16 millimetres; ``filled_XXXX.png`` beside them is not scored), listed in
  ``filename_list_test.txt`` (``rgb depth filled`` per line). Scored on 1e-3 < d < 10 m
  inside the Eigen crop.
* ``diode``: DIODE's val split, ``indoors/`` and ``outdoor/`` scenes with
  ``<name>.png`` (768 x 1024 RGB), ``<name>_depth.npy`` (float metres, [768, 1024, 1]) and
  ``<name>_depth_mask.npy`` (1 = valid), listed in ``diode_val_all_filename_list.txt``
  (``rgb depth mask`` per line). Scored where the mask is set; predictions clipped to
  0.6 .. 350 m.

The model predicts relative inverse depth (``image2depth``, prompt ``[[depth2image]]``):
its map is resized to the ground truth's frame and scored by the affine-invariant protocol
for disparity-space models (``metrics.depth_from_disparity``). Every problem with the folder
(no split file, a listed file missing, a depth file of the wrong unit, dtype or size) is one
``BenchmarkError`` line naming the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.pil_open import pil_open
from training.evaluation import metrics as M
from training.evaluation.errors import BenchmarkError


@dataclass(frozen=True)
class DepthSpec:
    name: str
    split_file: str
    frame: tuple[int, int]  # (H, W) of every image and depth map
    min_depth: float
    max_depth: float
    paper: dict[str, float]  # OneDiffusion's Table 4, in the units we report


NYUV2 = DepthSpec(
    "nyuv2", "filename_list_test.txt", (480, 640), 1e-3, 10.0, {"abs_rel": 0.068, "delta1": 0.952}
)
DIODE = DepthSpec(
    "diode", "diode_val_all_filename_list.txt", (768, 1024), 0.6, 350.0,
    {"abs_rel": 0.294, "delta1": 0.752},
)  # fmt: skip


@dataclass(frozen=True)
class DepthSample:
    id: str  # the rgb path, relative to the benchmark folder
    rgb: Path
    depth: Path
    mask: Path | None  # DIODE's valid-pixel mask


def read_split(root: Path, spec: DepthSpec, split: str | None = None) -> list[DepthSample]:
    """The listed samples, every listed file present; a one-line error otherwise."""
    if not root.is_dir():
        raise BenchmarkError(f"--path {root}: not a folder")
    listing = Path(split) if split else root / spec.split_file
    if not listing.is_file():
        raise BenchmarkError(
            f"{listing}: missing split file; {spec.name} expects {spec.split_file} (Marigold's "
            f"data_split list) in --path or given with --split"
        )
    samples = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise BenchmarkError(
                f"{listing}:{n}: expected 3 paths (rgb depth {'mask' if spec is DIODE else 'filled'}), "
                f"got {len(parts)}"
            )
        rgb, depth = root / parts[0], root / parts[1]
        mask = root / parts[2] if spec is DIODE else None
        for p in (rgb, depth, *([mask] if mask else [])):
            if not p.is_file():
                raise BenchmarkError(f"{p}: listed in {listing.name}:{n} but missing")
        samples.append(DepthSample(parts[0], rgb, depth, mask))
    if not samples:
        raise BenchmarkError(f"{listing}: lists no sample")
    return samples


def read_rgb(path: Path, frame: tuple[int, int]) -> np.ndarray:
    try:
        with pil_open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{path}: not a readable image ({exc})") from None
    if arr.shape[:2] != frame:
        raise BenchmarkError(
            f"{path}: {arr.shape[0]} x {arr.shape[1]}, expected {frame[0]} x {frame[1]}"
        )
    return arr


def read_nyu_depth(path: Path) -> np.ndarray:
    """Metres from a uint16 millimetre PNG (480 x 640)."""
    try:
        with pil_open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{path}: not a readable PNG ({exc})") from None
    if mode not in ("I;16", "I;16B", "I;16L", "I") or arr.dtype.kind not in "iu":
        raise BenchmarkError(
            f"{path}: depth PNG of mode {mode}, expected 16-bit millimetres (uint16, as NYUv2's "
            "depth_XXXX.png)"
        )
    if arr.shape != NYUV2.frame:
        raise BenchmarkError(f"{path}: depth of shape {arr.shape}, expected {NYUV2.frame}")
    return arr.astype(np.float64) / 1000.0


def read_npy(path: Path, frame: tuple[int, int], what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{path}: not a readable .npy ({exc})") from None
    arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    if arr.shape != frame:
        raise BenchmarkError(f"{path}: {what} of shape {arr.shape}, expected {frame} (or [.., 1])")
    if what == "depth" and arr.dtype.kind != "f":
        raise BenchmarkError(f"{path}: depth of dtype {arr.dtype}, expected float metres")
    return arr.astype(np.float64)


def ground_truth(spec: DepthSpec, s: DepthSample) -> tuple[np.ndarray, np.ndarray]:
    """(depth in metres, valid mask) as the benchmark scores them."""
    if spec is NYUV2:
        depth = read_nyu_depth(s.depth)
        return depth, M.depth_valid_mask(depth, spec.min_depth, spec.max_depth, M.eigen_crop_mask())
    depth = read_npy(s.depth, spec.frame, "depth")
    if np.nanmax(depth) > 1e4:
        raise BenchmarkError(f"{s.depth}: depth up to {np.nanmax(depth):g}, expected metres")
    mask = read_npy(s.mask, spec.frame, "mask") > 0  # type: ignore[arg-type]
    return depth, mask & np.isfinite(depth) & (depth > 0)


def model_frame(frame: tuple[int, int], side: int, multiple: int) -> tuple[int, int]:
    """(H, W) to generate at: the long side ``side``, the aspect kept, both multiples of the
    patch grid in pixels."""
    h, w = frame
    scale = side / max(h, w)
    return (
        max(multiple, int(round(h * scale / multiple)) * multiple),
        max(multiple, int(round(w * scale / multiple)) * multiple),
    )


def score_depth(spec: DepthSpec, disparity: np.ndarray, s: DepthSample) -> dict[str, float]:
    """A generated relative inverse depth map (any size) against the sample's ground truth."""
    depth, valid = ground_truth(spec, s)
    h, w = spec.frame
    pred = cv2.resize(np.asarray(disparity, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if not valid.any():
        return {}
    metric = M.depth_from_disparity(pred, depth, valid, spec.min_depth, spec.max_depth)
    return M.depth_metrics(metric, depth, valid)


def check_first(spec: DepthSpec, samples: list[DepthSample]) -> None:
    """Read the first sample whole (image, depth, mask) so a folder in the wrong layout or unit
    fails before any model is loaded."""
    read_rgb(samples[0].rgb, spec.frame)
    ground_truth(spec, samples[0])
