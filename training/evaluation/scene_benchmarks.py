"""Camera benchmarks: novel views (the paper's Table 2) and camera poses (Table 5) on Google
Scanned Objects, camera poses on CO3D v2, each in the layout the published protocol reads.

* ``gso-nvs`` / ``gso-pose``: GSO30 as EscherNet renders and evaluates it:
  ``<object>/render_mvs_25/model/`` holding 25 views ``000.png`` .. ``024.png`` (512 x 512
  RGBA) and ``000.npy`` .. ``024.npy`` (Blender world-to-camera 3 x 4; lens 35 mm on a 32 mm
  sensor). These are Zero123-style renders: the datagen scene reader of that format reads
  them (:func:`datagen.sources.scenes.formats.objaverse_scenes`: OpenCV c2w, pixel K), and the
  images are composited on white as EscherNet's loader does.

  - NVS: views ``0 .. n-1`` given (n = 1, 2, 3), views 10 .. 24 generated and scored by PSNR /
    SSIM at 256 px. *Known poses*: every camera's rays given; *unknown*: only camera 0's and the
    targets', the other condition views' rays generated with the images (the paper's two
    columns). A call adds ``data.multiview_max_views - n`` targets (at least one) to the
    condition views, so calls are no longer than the fit's longest multiview sample where
    that allows one target: the 15 targets go in chunks, each with the same conditions.
  - pose: ``POSE_VIEWS`` renders evenly spaced over the 25, camera 0's rays given (its true
    intrinsics), the others generated and turned back into cameras; RayDiffusion's
    relative-rotation @15 deg and camera-centre @0.1 / @0.3 accuracies.
* ``co3d-pose``: CO3D v2 test sequences in RayDiffusion's preprocessed annotations:
  ``<co3d>/co3d_v2_annotations/<category>_test.jgz`` (gzip JSON ``{sequence: [{filepath,
  R, T, focal_length, principal_point, bbox}, ...]}``, PyTorch3D cameras with NDC
  intrinsics) and the images at ``<co3d>/<filepath>``. ``POSE_VIEWS`` frames evenly spaced
  over each sequence, scored as gso-pose. Images are centre-cropped as the trainer crops
  them (RayDiffusion crops around ``bbox``; the metrics read extrinsics only).

Every rig is normalised as the trainer saw it (:func:`datagen.cameras.normalize_cameras`:
camera 0 at the identity in PyTorch3D's view frame, the scale fixed by the optical axes).
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from datagen.cameras import cameras_to_plucker, normalize_cameras, pytorch3d_to_opencv
from training.data.tasks import task_token
from training.data.views import bucket_intrinsics, plan_crop, to_unit
from training.evaluation import task_metrics as TM
from training.evaluation.cases import Case
from training.evaluation.errors import BenchmarkError
from training.evaluation.image_files import read_image

GSO_RENDERS = "render_mvs_25/model"
GSO_VIEWS = 25
NVS_TARGETS = tuple(range(10, 25))
NVS_SIZE = 256  # EscherNet's and the paper's evaluation resolution
# (row, condition views, known poses): Table 2's columns
NVS_ROWS = (
    ("nvs_1view", 1, True),
    ("nvs_2view_unknown", 2, False),
    ("nvs_2view_known", 2, True),
    ("nvs_3view_unknown", 3, False),
    ("nvs_3view_known", 3, True),
)
GSO_NVS_PAPER = {
    "nvs_1view/psnr": 19.01,
    "nvs_2view_unknown/psnr": 19.83,
    "nvs_2view_known/psnr": 20.22,
    "nvs_3view_unknown/psnr": 20.64,
    "nvs_3view_known/psnr": 21.79,
}
POSE_VIEWS = 6  # renders per object in Table 5
GSO_POSE_PAPER = {"center_acc_0.3": 0.32}
CO3D_ANNOTATIONS = "co3d_v2_annotations"
CO3D_SUFFIX = "_test.jgz"
MAX_ANNOTATION_BYTES = 1 << 30


@dataclass(frozen=True)
class RayGeometry:
    """The latent grid the ray views live on: the VAE's downsampling and channels."""

    stride: int
    channels: int


@dataclass(frozen=True)
class View:
    path: str
    c2w: np.ndarray  # [4, 4] OpenCV
    K: np.ndarray | None  # [3, 3] of the image's own frame (None: read with the image)
    raw: dict | None = None  # CO3D's PyTorch3D camera, converted once the frame is known


@dataclass(frozen=True)
class SceneItem:
    """One object (GSO) or sequence (CO3D) and its views in order."""

    name: str
    views: tuple[View, ...]


# --------------------------------------------------------------------------- images, rigs


def square_view(rgb: np.ndarray, side: int) -> Tensor:
    """The centre crop the trainer makes (``plan_crop``), resized to ``side``: [3, s, s]."""
    x0, y0, cw, ch = plan_crop((rgb.shape[1], rgb.shape[0]), (side, side)).box
    crop = np.ascontiguousarray(rgb[y0 : y0 + ch, x0 : x0 + cw])
    return torch.from_numpy(to_unit(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)))


def load_views(views: Sequence[View], side: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """(pixels [V, 3, s, s], normalised c2w [V, 4, 4], K [V, 3, 3] of the square crops)."""
    pixels, c2w, K = [], [], []
    for v in views:
        rgb, frame = read_image(v.path)
        pixels.append(square_view(rgb, side))
        cam, k = v.c2w, v.K
        if v.raw is not None:  # CO3D: NDC intrinsics need the frame
            cam, k = pytorch3d_to_opencv(**v.raw, image_size=(frame[1], frame[0]))
        c2w.append(cam)
        K.append(bucket_intrinsics(k, frame, (side, side)))
    rig, _ = normalize_cameras(np.stack(c2w))
    return torch.stack(pixels), rig, np.stack(K)


def ray_views(c2w: np.ndarray, K: np.ndarray, side: int, geo: RayGeometry) -> Tensor:
    grid = side // geo.stride
    rays = cameras_to_plucker(c2w, K, (side, side), (grid, grid), geo.channels)
    return torch.from_numpy(np.asarray(rays, np.float32))


def interleaved_mask(images: Sequence[bool], rays: Sequence[bool]) -> Tensor:
    """[1, 2V] over img0, ray0, img1, ray1, ... (the released multiview layout)."""
    return torch.tensor([[c for pair in zip(images, rays, strict=True) for c in pair]])


def spaced(count: int, n: int) -> list[int]:
    """``n`` indices evenly spaced over ``range(count)``, the first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, min(n, count))})


# --------------------------------------------------------------------------- readers


def gso_objects(root: Path) -> list[SceneItem]:
    """Every object folder of a GSO30 render set, its 25 views checked."""
    from datagen.sources.base import SourceError
    from datagen.sources.scenes.formats import objaverse_scenes

    if not root.is_dir():
        raise BenchmarkError(f"--path {root}: not a folder")
    try:
        scenes = objaverse_scenes(str(root))
    except SourceError as exc:
        raise BenchmarkError(f"--path {root}: {exc}") from None
    items = []
    want = [f"{i:03d}" for i in range(GSO_VIEWS)]
    for scene in scenes:
        if scene.error:
            raise BenchmarkError(scene.error)
        stems = [Path(f.uri).stem for f in scene.frames]
        if stems != want:
            raise BenchmarkError(
                f"{scene.source}: expected the {GSO_VIEWS} views 000..024 of {GSO_RENDERS} "
                f"(NNN.png + NNN.npy), got {len(stems)}: {', '.join(stems[:4])}"
                f"{' ...' if len(stems) > 4 else ''}"
            )
        bad = next((f for f in scene.frames if f.error), None)
        if bad is not None:
            raise BenchmarkError(bad.error)
        name = scene.name.removesuffix(f"/{GSO_RENDERS}")
        views = tuple(View(f.uri, f.c2w, f.K) for f in scene.frames)
        items.append(SceneItem(name, views))
    if not items:
        raise BenchmarkError(
            f"--path {root}: no <object>/{GSO_RENDERS}/NNN.png + NNN.npy renders "
            "(EscherNet's GSO30 layout)"
        )
    return items


def _matrix(value: Any, shape: tuple[int, ...], key: str, where: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != shape or not np.isfinite(a).all():
        raise BenchmarkError(f"{where}: {key} is not a finite {'x'.join(map(str, shape))} array")
    return a


def _co3d_view(root: Path, frame: Any, where: str) -> View:
    if not isinstance(frame, dict) or not isinstance(frame.get("filepath"), str):
        raise BenchmarkError(f"{where}: expected an object with a filepath")
    path = (root / frame["filepath"]).resolve()
    if root.resolve() not in path.parents:
        raise BenchmarkError(f"{where}: filepath {frame['filepath']!r} leaves {root}")
    if not path.is_file():
        raise BenchmarkError(f"{where}: {path} does not exist (images go under --path)")
    raw = {
        "R": _matrix(frame.get("R"), (3, 3), "R", where),
        "T": _matrix(frame.get("T"), (3,), "T", where),
        "focal_length": _matrix(frame.get("focal_length"), (2,), "focal_length", where),
        "principal_point": _matrix(frame.get("principal_point"), (2,), "principal_point", where),
    }
    try:  # the extrinsics do not depend on the frame: checked now, K once it is read
        c2w, _ = pytorch3d_to_opencv(**raw, image_size=(2, 2))
    except ValueError as exc:
        raise BenchmarkError(f"{where}: {exc}") from None
    return View(str(path), c2w, None, raw)


def co3d_sequences(root: Path) -> list[SceneItem]:
    """``POSE_VIEWS`` frames of every test sequence of every category's annotation file."""
    folder = root / CO3D_ANNOTATIONS
    files = sorted(folder.glob(f"*{CO3D_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise BenchmarkError(
            f"{folder}: no <category>{CO3D_SUFFIX} (RayDiffusion's co3d_v2_annotations; put "
            "the folder inside the CO3D root given as --path)"
        )
    items = []
    for file in files:
        category = file.name.removesuffix(CO3D_SUFFIX)
        try:
            with gzip.open(file) as fh:
                data = fh.read(MAX_ANNOTATION_BYTES + 1)
            doc = json.loads(data[:MAX_ANNOTATION_BYTES])
        except (OSError, EOFError, ValueError) as exc:
            raise BenchmarkError(f"{file}: not gzip JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise BenchmarkError(
                f"{file}: expected {{sequence: [frames]}}, got {type(doc).__name__}"
            )
        for seq in sorted(doc):
            frames = doc[seq]
            if not isinstance(frames, list) or len(frames) < 2:
                raise BenchmarkError(f"{file}: sequence {seq!r} needs a list of at least 2 frames")
            views = tuple(
                _co3d_view(root, frames[i], f"{file}: {seq} frame {i}")
                for i in spaced(len(frames), POSE_VIEWS)
            )
            items.append(SceneItem(f"{category}/{seq}", views))
    return items


# --------------------------------------------------------------------------- cases


def nvs_cases(
    objects: Sequence[SceneItem], side: int, max_images: int, geo: RayGeometry, lpips: Any = None
) -> list[Case]:
    """Every Table 2 row of every object, the targets in chunks of the fit's longest sample;
    LPIPS beside PSNR / SSIM with ``lpips`` (``training.evaluation.lpips.LPIPS``)."""
    cases = []
    for obj in objects:
        for row, n, known in NVS_ROWS:
            per = max(1, max_images - n)
            for start in range(0, len(NVS_TARGETS), per):
                targets = NVS_TARGETS[start : start + per]
                case_id = f"{row}/{obj.name}/{targets[0]:03d}-{targets[-1]:03d}"
                inputs = _nvs_inputs(obj, n, known, targets, side, geo)
                score = functools.partial(_score_nvs, lpips=lpips)
                cases.append(Case(case_id, "multiview", task_token("multiview"), inputs,
                                  score, row=row))  # fmt: skip
    return cases


def _nvs_inputs(obj: SceneItem, n: int, known: bool, targets: Sequence[int], side: int,
                geo: RayGeometry) -> Any:  # fmt: skip
    def inputs() -> dict[str, Any]:
        pixels, c2w, K = load_views([obj.views[i] for i in (*range(n), *targets)], side)
        rays = ray_views(c2w, K, side, geo)
        given = [i == 0 or i >= n or known for i in range(len(pixels))]
        rays[[not g for g in given]] = 0.0  # unknown poses: generated with the images
        images = [i < n for i in range(len(pixels))]
        return {"cond_pixels": pixels[None], "cond_rays": rays[None],
                "cond_mask": interleaved_mask(images, given)}  # fmt: skip

    return inputs


def _score_nvs(out: Any, kw: dict[str, Any], lpips: Any = None) -> dict[str, float]:
    from training.evaluation.heldout import views01

    images = kw["cond_mask"][0, 0::2].tolist()
    return TM.novel_views(views01(out.pixels[0]), views01(kw["cond_pixels"][0]), images, lpips)


def pose_cases(items: Sequence[SceneItem], side: int, geo: RayGeometry, pick: bool) -> list[Case]:
    """One camera_pose case per object / sequence: ``POSE_VIEWS`` evenly spaced views when
    ``pick`` (GSO), else the item's own (CO3D: picked when read)."""
    cases = []
    for item in items:
        chosen = (
            [item.views[i] for i in spaced(len(item.views), POSE_VIEWS)] if pick else item.views
        )
        cases.append(_pose_case(item.name, list(chosen), side, geo))
    return cases


def _pose_case(name: str, views: list[View], side: int, geo: RayGeometry) -> Case:
    truth: dict[str, Tensor] = {}

    def inputs() -> dict[str, Any]:
        pixels, c2w, K = load_views(views, side)
        truth["rays"] = ray_views(c2w, K, side, geo)
        rays = truth["rays"].clone()
        rays[1:] = 0.0  # generated: camera 0 anchors the rig
        n = len(views)
        return {"cond_pixels": pixels[None], "cond_rays": rays[None],
                "cond_mask": interleaved_mask([True] * n, [i == 0 for i in range(n)])}  # fmt: skip

    def score(out: Any, kw: dict[str, Any]) -> dict[str, float]:
        rays = out.rays[0].float().cpu().numpy()
        return TM.camera_accuracy(rays, truth["rays"].numpy(), (side, side))

    return Case(name, "camera_pose", task_token("camera_pose"), inputs, score, has_target=False)
