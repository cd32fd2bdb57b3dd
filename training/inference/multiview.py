"""Multiview sampling: novel views from given cameras, and cameras from given images.

Both tasks run the released ``[[multiview]]`` layout, image and Plücker ray views alternating
(img0, ray0, img1, ray1, ...; ``training.data.tasks.multiview_layout``):

* ``multiview``: the given images and every camera are held clean, the other images are
  generated. Cameras come from an orbit (``--azimuths``/``--elevations``/``--distance``,
  the released demo's defaults) or a nerfstudio ``transforms.json`` (``--cameras``).
* ``camera_pose``: every image and ray 0 (camera 0, ``CAMERA0``) are held clean, rays 1.. are
  generated and turned back into cameras (``datagen.cameras.plucker_to_cameras``, focal
  recovered too); ``--cameras`` then names the ground truth to score them against.

Rigs are normalised as the trainer saw them (``normalize_cameras``: the released loader's world,
camera 0 the identity in PyTorch3D's view frame, ``datagen.cameras.CAMERA0``),
images centre-cropped to a square exactly as the training reader crops them
(``training.data.views.decode_view``), and each ray view computed for that crop.

    onegen sample --checkpoint run.ckpt --task multiview --image front.jpg \\
        --azimuths 0,30,60,90 --elevations 0,0,0,0 --out views/
    onegen sample --checkpoint run.ckpt --task camera_pose --image a.jpg --image b.jpg \\
        --cameras gt/transforms.json --out poses/
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datagen.cameras import (
    CAMERA0,
    DEFAULT_DISTANCE,
    cameras_to_plucker,
    crop_intrinsics,
    intrinsics_from_focal,
    nerfstudio_camera,
    nerfstudio_transforms,
    normalize_cameras,
    orbit_cameras,
    plucker_to_cameras,
    pose_metrics,
    relative_to_camera0,
    resize_intrinsics,
    rotation_angle_deg,
)
from training.config import ConfigError
from training.data.tasks import MULTIVIEW_TASKS, MultiviewLayout, multiview_layout
from training.data.views import (
    DecodeError,
    bucket_intrinsics,
    decode_view,
    image_size,
    plan_crop,
)
from training.errors import FitError
from training.inference.generate import SamplerSettings, generate_views
from training.inference.grid import camera_pose_row, conditional_row, render_grid, save_grid_image
from training.inference.images import to_uint8
from training.inference.sample import (
    SampleUsageError,
    Source,
    check_options,
    check_size,
    load_model,
    normalise_task,
    read_config,
    resolve_device,
)

# The released demo's camera: focal 1.3887 x the image side, principal point at the centre.
DEFAULT_FOCAL = 1.3887
MAX_VIEWS = 16  # image views per request (the model sees twice as many)
MAX_TRANSFORMS_BYTES = 4 << 20
MAX_IMAGE_BYTES = 64 << 20
TRANSFORMS = "transforms.json"


# --------------------------------------------------------------------------- generation


# --------------------------------------------------------------------------- transforms.json


@dataclass(frozen=True)
class Transforms:
    """A nerfstudio ``transforms.json`` as read: OpenCV c2w (converted from its OpenGL),
    pixel intrinsics and the (W, H) frame each describes, the frames' file paths."""

    c2w: np.ndarray  # [N, 4, 4]
    K: np.ndarray  # [N, 3, 3]
    frames: list[tuple[int, int]]
    file_paths: list[str]


def read_transforms(path: str | Path, flag: str = "--cameras") -> Transforms:
    """A nerfstudio ``transforms.json`` (each frame read by
    :func:`datagen.cameras.nerfstudio_camera`; frames in file order), read safely: a regular
    file under ``MAX_TRANSFORMS_BYTES``, JSON only, at most ``MAX_VIEWS`` frames. Anything
    wrong is a one-line :class:`SampleUsageError`."""
    p = Path(path)
    if not p.is_file():
        raise SampleUsageError(f"{flag} {path} is not a readable file")
    if p.stat().st_size > MAX_TRANSFORMS_BYTES:
        raise SampleUsageError(f"{flag} {path} is over {MAX_TRANSFORMS_BYTES >> 20} MiB")
    try:
        meta = json.loads(p.read_bytes()[:MAX_TRANSFORMS_BYTES])
    except (OSError, ValueError) as exc:
        raise SampleUsageError(f"{flag} {path} is not JSON ({exc})") from None
    try:
        return _parse_transforms(meta)
    except ValueError as exc:
        raise SampleUsageError(f"{flag} {path}: {' '.join(str(exc).split())}") from None


def _parse_transforms(meta: Any) -> Transforms:
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise ValueError("expected an object with a 'frames' list (nerfstudio format)")
    frames = meta["frames"]
    if not frames or len(frames) > MAX_VIEWS:
        raise ValueError(f"expected 1 to {MAX_VIEWS} frames, got {len(frames)}")
    cams = [nerfstudio_camera(frame, meta, f"frame {i}") for i, frame in enumerate(frames)]
    names = [str(frame.get("file_path", "")) for frame in frames]
    return Transforms(
        np.stack([c[0] for c in cams]), np.stack([c[1] for c in cams]), [c[2] for c in cams], names
    )


def write_transforms(
    path: Path,
    c2w: np.ndarray,
    K: np.ndarray,
    frames: Sequence[tuple[int, int]],
    file_paths: Sequence[str],
) -> Path:
    """OpenCV cameras as a nerfstudio ``transforms.json``
    (:func:`datagen.cameras.nerfstudio_transforms`: intrinsics per frame, or once at the top
    when every frame shares them)."""
    doc = nerfstudio_transforms(c2w, K, frames, file_paths)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- requests


def parse_degrees(text: str | None, flag: str) -> list[float] | None:
    """``"0,30,60"`` -> [0.0, 30.0, 60.0], or a one-line SampleUsageError."""
    if text is None:
        return None
    try:
        values = [float(x) for x in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(x) for x in values):
        raise SampleUsageError(f"{flag} {text!r} is not a comma-separated list of degrees")
    return values


@dataclass(frozen=True)
class CameraRequest:
    """Where a request's cameras come from (no image read yet, no size known)."""

    azimuths: list[float] | None = None
    elevations: list[float] | None = None
    distance: float = DEFAULT_DISTANCE
    transforms: Transforms | None = None

    @property
    def count(self) -> int:
        if self.transforms is not None:
            return len(self.transforms.frames)
        return len(self.azimuths or [])


def check_multiview_request(
    task: str,
    *,
    images: Sequence[str | Path],
    azimuths: str | None = None,
    elevations: str | None = None,
    distance: float | None = None,
    cameras: str | Path | None = None,
    size: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    out_dir: str | Path | None = None,
) -> tuple[str, CameraRequest]:
    """The checks of a multiview / camera_pose request that need no checkpoint (the cameras
    file is read and checked here); ``(task, cameras)`` or a one-line SampleUsageError."""
    task = normalise_task(task)
    if task not in MULTIVIEW_TASKS:
        raise SampleUsageError(f"--task {task} is not a multiview task")
    check_options(size=size, steps=steps, device=device, out_dir=out_dir)
    n = len(images)
    if n > MAX_VIEWS:
        raise SampleUsageError(f"--task {task} takes at most {MAX_VIEWS} --image, got {n}")
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        raise SampleUsageError(f"--distance must be a positive number, got {distance}")
    if task == "camera_pose":
        if n < 2:
            raise SampleUsageError(
                f"--task camera_pose needs at least 2 --image (the cameras of images 1.. are "
                f"estimated relative to image 0), got {n}"
            )
        for flag, value in (("--azimuths", azimuths), ("--elevations", elevations)):
            if value is not None:
                raise SampleUsageError(
                    f"--task camera_pose estimates the cameras: drop {flag} (--cameras names "
                    "the ground truth to score them against)"
                )
        if distance is not None:
            raise SampleUsageError("--task camera_pose estimates the cameras: drop --distance")
        if cameras is None:
            return task, CameraRequest()
        gt = read_transforms(cameras)
        if len(gt.frames) != n:
            raise SampleUsageError(
                f"--cameras {cameras} has {len(gt.frames)} frames for {n} --image: the ground "
                "truth needs one frame per image, in order"
            )
        return task, CameraRequest(transforms=gt)
    if n < 1:
        raise SampleUsageError("--task multiview needs at least one --image (view 0)")
    if cameras is not None and (azimuths is not None or elevations is not None):
        raise SampleUsageError("give the cameras once: --cameras or --azimuths/--elevations")
    dist = float(distance if distance is not None else DEFAULT_DISTANCE)
    if cameras is not None:
        req = CameraRequest(distance=dist, transforms=read_transforms(cameras))
    elif azimuths is None:
        raise SampleUsageError(
            "--task multiview needs the cameras: --azimuths 0,30,60,90 [--elevations ...] "
            "[--distance 1.7], or --cameras transforms.json"
        )
    else:
        az = parse_degrees(azimuths, "--azimuths") or []
        el = parse_degrees(elevations, "--elevations") or [0.0] * len(az)
        if len(el) != len(az):
            raise SampleUsageError(
                f"--elevations has {len(el)} values for {len(az)} --azimuths: one per camera"
            )
        req = CameraRequest(az, el, dist)
    if req.count > MAX_VIEWS:
        raise SampleUsageError(f"at most {MAX_VIEWS} cameras, got {req.count}")
    if req.count <= n:
        raise SampleUsageError(
            f"--task multiview got {n} --image for {req.count} cameras: the images take the "
            "first cameras, so give at least one camera more than images"
        )
    return task, req


# --------------------------------------------------------------------------- rigs


def square_intrinsics(K: np.ndarray, frame: tuple[int, int], side: int) -> np.ndarray:
    """K of a (W, H) ``frame`` -> K of its centre crop resized to ``side`` (as
    :func:`decode_view` crops it)."""
    return bucket_intrinsics(K, frame, (side, side))


def frame_intrinsics(K: np.ndarray, frame: tuple[int, int], side: int) -> np.ndarray:
    """The inverse of :func:`square_intrinsics`: K of the square crop -> K of the frame."""
    x0, y0, cw, ch = plan_crop(frame, (side, side)).box
    return crop_intrinsics(resize_intrinsics(K, cw / side, ch / side), -x0, -y0)


def default_intrinsics(side: int) -> np.ndarray:
    return intrinsics_from_focal(DEFAULT_FOCAL * side, (side, side))


def request_rig(req: CameraRequest, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(c2w [V, 4, 4] normalised as the trainer saw them, K [V, 3, 3] of the square
    ``side`` crop) of a multiview request."""
    if req.transforms is not None:
        t = req.transforms
        c2w, _ = normalize_cameras(t.c2w, req.distance)
        K = np.stack([square_intrinsics(k, f, side) for k, f in zip(t.K, t.frames, strict=True)])
        return c2w, K
    c2w, _ = normalize_cameras(
        orbit_cameras(req.azimuths or [], req.elevations or [], req.distance), req.distance
    )
    return c2w, np.stack([default_intrinsics(side)] * len(c2w))


def recover_cameras(rays: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cameras (c2w re-anchored so camera 0 is exactly ``CAMERA0``, K of the frame: a square
    ``side`` or ``(H, W)``) of sampled ray views [V, C, h, w]; a FitError when they describe
    no camera."""
    frame = (size, size) if isinstance(size, int) else tuple(size)
    try:
        c2w, K = plucker_to_cameras(np.asarray(rays, np.float64), frame)
        rel = relative_to_camera0(c2w)
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise FitError(f"the generated ray views give no cameras ({exc})") from None
    if not (np.isfinite(rel).all() and np.isfinite(K).all()):
        raise FitError("the generated ray views give non-finite cameras")
    return rel, K


def camera_lines(c2w: np.ndarray, K: np.ndarray, side: int) -> list[str]:
    """One line per camera (OpenCV, camera 0's frame): centre, rotation angle from camera 0,
    focal lengths of the square ``side`` crop in pixels and as a fraction of the side."""
    angles = rotation_angle_deg(
        np.broadcast_to(c2w[0, :3, :3], c2w[:, :3, :3].shape), c2w[:, :3, :3]
    )
    lines = []
    for v in range(len(c2w)):
        x, y, z = c2w[v, :3, 3]
        fx, fy = K[v, 0, 0], K[v, 1, 1]
        lines.append(
            f"camera {v}: centre ({x:+.3f}, {y:+.3f}, {z:+.3f}), turned {float(angles[v]):.1f} "
            f"deg from camera 0, focal {fx:.1f}, {fy:.1f} px ({fx / side:.4f}, "
            f"{fy / side:.4f} x the {side} px side)"
        )
    return lines


# --------------------------------------------------------------------------- images


def load_square(path: str | Path, side: int) -> tuple[Tensor, tuple[int, int]]:
    """An image centre-cropped and resized to ``side`` as the training reader does it:
    ([3, side, side] in [-1, 1], its (W, H)); a ConfigError when it is not a readable image
    (not a regular file, over ``MAX_IMAGE_BYTES`` or PIL's pixel cap, undecodable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--image {path} is not a readable image file")
    try:
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"over {MAX_IMAGE_BYTES >> 20} MiB")
        data = p.read_bytes()
        frame = image_size(data)
        if frame[0] * frame[1] > (Image.MAX_IMAGE_PIXELS or 1 << 30):
            raise ValueError(f"{frame[0]}x{frame[1]} pixels is over the cap")
        name = "view.jpg" if data[:3] == b"\xff\xd8\xff" else "view.png"
        pixels = decode_view(data, name, (side, side), frame)
    except (OSError, ValueError, DecodeError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"--image {path} is not a readable image ({exc})") from None
    return torch.from_numpy(pixels), frame


# --------------------------------------------------------------------------- the command


@dataclass
class MultiviewResult:
    """What a multiview / camera_pose run wrote and found (``lines``: the report to print)."""

    paths: list[Path]
    c2w: np.ndarray  # [V, 4, 4] OpenCV: the cameras used (multiview) or estimated (pose)
    K: np.ndarray  # [V, 3, 3] of the square sampled views
    metrics: dict[str, float | None] | None = None
    lines: list[str] = field(default_factory=list)


def sample_multiview_from_checkpoint(
    checkpoint: Source,
    task: str,
    out_dir: str | Path,
    *,
    images: Sequence[str | Path],
    azimuths: str | None = None,
    elevations: str | None = None,
    distance: float | None = None,
    cameras: str | Path | None = None,
    prompt: str = "a photo",
    steps: int | None = None,
    guidance: float | None = None,
    size: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    device: str = "cpu",
) -> MultiviewResult:
    """``onegen sample --task multiview | camera_pose``, from a checkpoint or a
    :class:`~training.inference.sample.ModelSource` (a released or exported folder).

    Checked before any weights are read, in this order: the request and its cameras file
    (:func:`check_multiview_request`), the checkpoint's config (the task was trained, the
    size fits the patch grid), the images. Writes into ``out_dir`` (created only then):
    multiview, each view as ``multiview_view<v>_<condition|generated>.png`` (a condition
    view is the given image as cropped) and the cameras used as ``transforms.json``
    pointing at them; camera_pose, the estimated cameras as ``transforms.json`` pointing at
    the given images (intrinsics in their own frames) and, with ground truth,
    ``metrics.json``; both, a labelled ``<task>_grid.png``."""
    task, req = check_multiview_request(
        task,
        images=images,
        azimuths=azimuths,
        elevations=elevations,
        distance=distance,
        cameras=cameras,
        size=size,
        steps=steps,
        device=device,
        out_dir=out_dir,
    )
    device = resolve_device(device)
    cfg, mcfg, stride = read_config(checkpoint, task)
    side = int(size or cfg.samples.resolution)
    check_size(side, stride, given=size is not None)
    loaded = [load_square(p, side) for p in images]
    given = torch.stack([x for x, _ in loaded])
    if task == "multiview":
        try:
            c2w, K = request_rig(req, side)
        except ValueError as exc:  # e.g. an orbit camera on its target
            raise SampleUsageError(f"the cameras asked for: {exc}") from None
        layout = MultiviewLayout("multiview", len(c2w), len(images))
    else:
        c2w = np.tile(CAMERA0, (len(images), 1, 1))  # only camera 0's rays are given
        K = np.stack([default_intrinsics(side)] * len(images))
        layout = multiview_layout("camera_pose", len(images))
    views = layout.num_images
    pixels = torch.zeros(views, 3, side, side)
    pixels[: len(images)] = given
    net, frozen = load_model(checkpoint, cfg, mcfg, weights, device)
    down, channels = frozen.vae.downsample, frozen.vae.latent_channels
    rays = cameras_to_plucker(c2w, K, (side, side), (side // down, side // down), channels)
    cond_mask = torch.tensor([layout.cond_mask])
    rays_t = torch.from_numpy(rays)
    if task == "camera_pose":
        rays_t[1:] = 0.0  # generated: only camera 0 (CAMERA0) is given
    out = generate_views(
        lambda x, t, txt, m: net(x, t, txt, m),
        frozen,
        [f"[[multiview]] {prompt}".strip()],
        SamplerSettings.from_config(cfg, steps=steps, guidance=guidance, seed=seed),
        cond_pixels=pixels[None],
        cond_rays=rays_t[None],
        cond_mask=cond_mask,
        device=torch.device(device),
    )
    gen_pixels, gen_rays = out.pixels[0].cpu(), out.rays[0].float().cpu()
    folder = Path(out_dir)
    if task == "multiview":
        return _write_multiview(folder, prompt, pixels, gen_pixels, layout, c2w, K, side, cfg)
    return _write_pose(folder, prompt, images, loaded, given, gen_rays, req, side, cfg)


def _write_multiview(
    folder: Path,
    prompt: str,
    given: Tensor,
    generated: Tensor,
    layout: MultiviewLayout,
    c2w: np.ndarray,
    K: np.ndarray,
    side: int,
    cfg: Any,
) -> MultiviewResult:
    folder.mkdir(parents=True, exist_ok=True)
    image_mask = torch.tensor(layout.cond_mask[0::2])
    paths, names = [], []
    for v in range(layout.num_images):
        role = "condition" if bool(image_mask[v]) else "generated"
        name = f"multiview_view{v}_{role}.png"
        view = given[v] if bool(image_mask[v]) else generated[v]
        Image.fromarray(to_uint8(view)).save(folder / name)
        paths.append(folder / name)
        names.append(name)
    row = conditional_row("multiview", prompt, given, image_mask, generated, targets=False)
    paths.append(
        save_grid_image(render_grid([row], int(cfg.samples.cell)), folder / "multiview_grid.png")
    )
    frames = [(side, side)] * layout.num_images
    paths.append(write_transforms(folder / TRANSFORMS, c2w, K, frames, names))
    return MultiviewResult(paths, c2w, K, lines=camera_lines(c2w, K, side))


def _write_pose(
    folder: Path,
    prompt: str,
    images: Sequence[str | Path],
    loaded: list[tuple[Tensor, tuple[int, int]]],
    given: Tensor,
    rays: Tensor,
    req: CameraRequest,
    side: int,
    cfg: Any,
) -> MultiviewResult:
    c2w, K = recover_cameras(rays.numpy(), side)
    metrics = None
    if req.transforms is not None:
        gt, _ = normalize_cameras(req.transforms.c2w)
        raw = pose_metrics(c2w, gt)
        metrics = {k: (None if math.isnan(v) else v) for k, v in raw.items()}
    folder.mkdir(parents=True, exist_ok=True)
    frames = [frame for _, frame in loaded]
    K_frames = np.stack([frame_intrinsics(K[v], frames[v], side) for v in range(len(frames))])
    names = [str(Path(p).resolve()) for p in images]
    paths = [write_transforms(folder / TRANSFORMS, c2w, K_frames, frames, names)]
    row = camera_pose_row("camera_pose", prompt, given, rays)
    paths.append(
        save_grid_image(render_grid([row], int(cfg.samples.cell)), folder / "camera_pose_grid.png")
    )
    lines = camera_lines(c2w, K, side)
    if metrics is not None:
        path = folder / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        paths.append(path)
        lines += [f"{k}: {'n/a' if v is None else f'{v:.3f}'}" for k, v in metrics.items()]
    return MultiviewResult(paths, c2w, K, metrics, lines)
