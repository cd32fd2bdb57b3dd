"""Cameras <-> Plücker rays, rays -> cameras, pose metrics (numpy only, float64 inside).

The bridge between datagen (which stores cameras per view) and training / sampling (which
feeds rays to the model and recovers cameras from generated rays), so both halves share one
set of conventions:

* A camera is an OpenCV camera-to-world ``c2w`` 4x4 (columns of R: camera x right, y down,
  z forward, in world coordinates; last column: the camera centre) plus pixel intrinsics
  ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` for an image of (H, W) pixels.
* A grid of (h, w) cells over an (H, W) image puts cell (i, j) at the half-pixel centre
  ``u = (j + 0.5) * W / w``, ``v = (i + 0.5) * H / h``; the rays are one per latent cell, so
  they can be recomputed at any resolution from the stored cameras.
* Ray of a cell: origin o = camera centre, direction ``d = normalize(R K^-1 [u, v, 1])``;
  Plücker ``[d, o x d]`` (6 channels, direction then moment), channel-first.
* Latent form, as the released OneDiffusion inference feeds them: ``[r, r, r[:4]] * 1.658``
  (6 -> 16 channels; any count: the 6 channels tiled and cut).
* Normalised rigs live in the released loader's world: camera 0's PyTorch3D view frame (x
  left, y up, z forward; ``_cameras_from_opencv_projection`` then ``first_camera_transform``),
  so camera 0's OpenCV c2w is :data:`CAMERA0` = diag(-1, -1, 1, 1), a 180° turn about its
  optical axis from the identity. Camera 0 sits ``DEFAULT_DISTANCE`` from the least-squares
  intersection of the optical axes (see :func:`normalize_cameras`). :data:`CAMERA_FRAME`
  names this frame in the shards' manifests, so a fit never mixes it with another.

Arrays that reach these functions from files (transforms.json, CO3D annotations) are checked:
a wrong shape or a NaN / inf is a ``ValueError`` naming the argument.

nerfstudio ``transforms.json`` is read and written here once, for every reader and writer
(:func:`nerfstudio_camera`, :func:`nerfstudio_transforms`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RAY_SCALE = 1.658
# Camera 0's distance to the optical axes' intersection after normalisation (released loader).
DEFAULT_DISTANCE = 1.7

_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])
# Camera 0 after normalisation, as an OpenCV c2w: the identity in PyTorch3D's view frame.
CAMERA0 = np.diag([-1.0, -1.0, 1.0, 1.0])
CAMERA_FRAME = "pytorch3d-camera0"  # the world normalised rigs (and their rays) are in
_FLIP_XY = np.diag([-1.0, -1.0, 1.0])
MAX_IMAGE_SIDE = 1 << 16  # pixels: a w or h beyond this is not a camera


class CameraValueError(ValueError):
    """A well-formed value that describes no camera (NaN / inf, a focal length <= 0, a
    non-rigid pose), as opposed to a plain ValueError: a missing key or a wrong type/shape."""


# --------------------------------------------------------------------------- validation


def _array(x: object, name: str, shapes: Sequence[tuple[int | None, ...]]) -> np.ndarray:
    """``x`` as finite float64 of one of ``shapes`` (None: any size), else a ValueError."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array ({exc})") from None
    for shape in shapes:
        if a.ndim == len(shape) and all(
            s is None or s == n for s, n in zip(shape, a.shape, strict=True)
        ):
            break
    else:
        want = " or ".join(str(tuple("N" if s is None else s for s in sh)) for sh in shapes)
        raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _size(x: object, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in x)  # type: ignore[union-attr]
        ok = all(float(v) == int(v) for v in x)  # type: ignore[union-attr]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected (height, width), got {x!r}") from None
    if not ok or a <= 0 or b <= 0:
        raise ValueError(f"{name}: expected two positive integers, got {x!r}")
    return a, b


def _poses(c2w: object, name: str = "c2w") -> np.ndarray:
    """[V, 4, 4] rigid camera-to-world matrices (a [4, 4] is one camera)."""
    a = _array(c2w, name, [(4, 4), (None, 4, 4)]).reshape(-1, 4, 4)
    if a.shape[0] == 0:
        raise ValueError(f"{name}: no cameras")
    if not np.allclose(a[:, 3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise ValueError(f"{name}: last row must be [0, 0, 0, 1]")
    _check_rotation(a[:, :3, :3], name)
    return a


def _check_rotation(r: np.ndarray, name: str) -> None:
    eye = np.broadcast_to(np.eye(3), r.shape)
    if not np.allclose(np.swapaxes(r, -1, -2) @ r, eye, atol=1e-3) or np.any(np.linalg.det(r) < 0):
        raise ValueError(f"{name}: rotation part is not a proper rotation (orthonormal, det +1)")


def _intrinsics(K: object, views: int, name: str = "K") -> np.ndarray:
    """[V, 3, 3] intrinsics (a [3, 3] is shared by every view)."""
    a = _array(K, name, [(3, 3), (None, 3, 3)])
    a = np.broadcast_to(a, (views, 3, 3)) if a.ndim == 2 else a
    if a.shape[0] != views:
        raise ValueError(f"{name}: {a.shape[0]} intrinsics for {views} cameras")
    if not np.allclose(a[:, 2], [0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(f"{name}: last row must be [0, 0, 1]")
    if np.any(np.abs(a[:, 0, 0] * a[:, 1, 1]) < 1e-12):
        raise ValueError(f"{name}: focal lengths must be non-zero")
    return np.array(a)


# --------------------------------------------------------------------------- rays


def _pixel_grid(image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """[h, w, 3] homogeneous half-pixel centres ``[u, v, 1]`` of the cells."""
    (H, W), (h, w) = image_size, grid
    u = (np.arange(w) + 0.5) * (W / w)
    v = (np.arange(h) + 0.5) * (H / h)
    uu, vv = np.meshgrid(u, v)  # [h, w]
    return np.stack([uu, vv, np.ones_like(uu)], axis=-1)


def plucker_rays(
    c2w: np.ndarray,
    K: np.ndarray,
    image_size: tuple[int, int],
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Plücker rays ``[d, o x d]`` [V, 6, h, w] float32 of cameras ``c2w`` [V, 4, 4] (or one
    [4, 4]) with intrinsics ``K`` [V, 3, 3] (or one shared [3, 3]) for (H, W) images, one ray
    per cell of ``grid`` (h, w), by default the 8x-downsampled latent grid."""
    poses = _poses(c2w)
    Ks = _intrinsics(K, poses.shape[0])
    H, W = _size(image_size, "image_size")
    h, w = _size(grid if grid is not None else (H // 8, W // 8), "grid")
    pix = _pixel_grid((H, W), (h, w))
    # d = R K^-1 x for every view and cell at once: [V, h, w, 3]
    m = poses[:, :3, :3] @ np.linalg.inv(Ks)
    d = np.einsum("vab,hwb->vhwa", m, pix)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(poses[:, None, None, :3, 3], d.shape)
    rays = np.concatenate([d, np.cross(o, d)], axis=-1)
    return np.ascontiguousarray(rays.transpose(0, 3, 1, 2), dtype=np.float32)


def to_latent_channels(
    rays6: np.ndarray, channels: int = 16, scale: float = RAY_SCALE
) -> np.ndarray:
    """[..., 6, h, w] -> [..., channels, h, w]: the 6 channels tiled and cut (16: ``[r, r,
    r[:4]]``), times ``scale``, the form the released model was trained on."""
    r = np.asarray(rays6)
    if r.ndim < 3 or r.shape[-3] != 6:
        raise ValueError(f"rays6: expected shape [..., 6, h, w], got {r.shape}")
    if int(channels) < 1:
        raise ValueError(f"channels: expected a positive count, got {channels}")
    index = np.arange(int(channels)) % 6
    return np.take(r, index, axis=-3) * np.asarray(scale, dtype=r.dtype)


def from_latent_channels(x: np.ndarray, scale: float = RAY_SCALE) -> np.ndarray:
    """[..., C >= 6, h, w] -> [..., 6, h, w]: each channel the mean of its tiled copies (a
    generated sample's copies disagree a little), divided by ``scale``."""
    a = np.asarray(x)
    if a.ndim < 3 or a.shape[-3] < 6:
        raise ValueError(f"x: expected shape [..., C >= 6, h, w], got {a.shape}")
    if float(scale) == 0.0:
        raise ValueError("scale: must be non-zero")
    src = np.moveaxis(a, -3, 0)
    out = np.stack([src[k::6].mean(axis=0) for k in range(6)], axis=0)
    return np.moveaxis(out, 0, -3) / np.asarray(scale, dtype=out.dtype)


def cameras_to_plucker(
    c2w: np.ndarray,
    K: np.ndarray,
    image_size: tuple[int, int],
    grid: tuple[int, int] | None = None,
    channels: int = 16,
    scale: float = RAY_SCALE,
) -> np.ndarray:
    """The model's ray views of a rig: :func:`plucker_rays` in latent form, [V, channels, h,
    w] float32."""
    return to_latent_channels(plucker_rays(c2w, K, image_size, grid), channels, scale)


# --------------------------------------------------------------------------- rays -> cameras


def _kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[V, 3, 3] proper rotations R minimising sum |R src_k - dst_k|^2 (src, dst [V, N, 3])."""
    m = np.einsum("vna,vnb->vab", dst, src)
    u, _, vt = np.linalg.svd(m)
    s = np.ones(u.shape[:-1])
    s[:, -1] = np.sign(np.linalg.det(u @ vt))
    s[s == 0] = 1.0
    return (u * s[:, None, :]) @ vt


def _rq(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RQ decomposition of [V, 3, 3]: a = r @ q, r upper triangular, q orthogonal."""
    p = np.eye(3)[::-1]
    q1, r1 = np.linalg.qr((p @ a).swapaxes(-1, -2))
    r = p @ r1.swapaxes(-1, -2) @ p
    q = p @ q1.swapaxes(-1, -2)
    return r, q


def _homography(d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[V, 3, 3] H with d_k ~ +H x_k (DLT on ``d x Hx = 0``, pixels Hartley-normalised);
    d [V, N, 3] unit world directions, x [N, 3] homogeneous pixels."""
    mean = x[:, :2].mean(axis=0)
    spread = np.sqrt(((x[:, :2] - mean) ** 2).sum(axis=1).mean()) / np.sqrt(2.0)
    t = np.array([[1, 0, -mean[0]], [0, 1, -mean[1]], [0, 0, spread]]) / spread
    xn = x @ t.T  # [N, 3]
    V, N = d.shape[:2]
    zero = np.zeros((V, N, 3))
    xb = np.broadcast_to(xn, (V, N, 3))
    d1, d2, d3 = (d[..., k : k + 1] for k in range(3))
    rows = np.concatenate(
        [
            np.concatenate([zero, -d3 * xb, d2 * xb], axis=-1),
            np.concatenate([d3 * xb, zero, -d1 * xb], axis=-1),
            np.concatenate([-d2 * xb, d1 * xb, zero], axis=-1),
        ],
        axis=1,
    )  # [V, 3N, 9]
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    hmat = vt[:, -1].reshape(V, 3, 3) @ t
    sign = np.sign(np.einsum("vna,vab,nb->v", d, hmat, x))
    sign[sign == 0] = 1.0
    return hmat * sign[:, None, None]


def plucker_to_cameras(
    rays: np.ndarray,
    image_size: tuple[int, int],
    K: np.ndarray | None = None,
    *,
    scale: float = RAY_SCALE,
) -> tuple[np.ndarray, np.ndarray]:
    """Cameras (c2w [V, 4, 4], K [V, 3, 3], float64) that best explain ``rays`` [V, 6, h, w]
    (or the latent form [V, C > 6, h, w], undone with ``scale``), e.g. a generated sample's.

    Centre: the point closest to all of a view's rays (least squares). Rotation: Kabsch between
    the camera-frame directions at the cells' half-pixel centres and the rays' directions. With
    ``K`` None the intrinsics are recovered too: the homography d ~ H [u, v, 1] by DLT, then
    RQ of H^-1 ~ K R^T (K with positive diagonal, zero skew), then Kabsch with that K.
    """
    r = _array(rays, "rays", [(None, None, None, None)])
    if r.shape[1] < 6:
        raise ValueError(f"rays: expected [V, 6 or C > 6, h, w], got {r.shape}")
    if r.shape[0] == 0:
        raise ValueError("rays: no views")
    if r.shape[1] > 6:
        r = from_latent_channels(r, scale)
    V, _, h, w = r.shape
    if h < 2 or w < 2:
        raise ValueError(f"rays: need a grid of at least 2x2 cells, got {h}x{w}")
    H, W = _size(image_size, "image_size")
    flat = r.reshape(V, 6, h * w).transpose(0, 2, 1)  # [V, N, 6]
    d, m = flat[..., :3], flat[..., 3:]
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    if np.any(norm[..., 0].max(axis=1) < 1e-12):
        raise ValueError("rays: a view has only zero directions")
    norm = np.maximum(norm, 1e-12)
    d, m = d / norm, m / norm

    # Centre: sum_k (I - d d^T) p = sum_k (I - d d^T) (d x m)
    proj = np.eye(3) - d[..., :, None] * d[..., None, :]  # [V, N, 3, 3]
    foot = np.cross(d, m)
    rhs = np.einsum("vnab,vnb->va", proj, foot)
    centre = np.linalg.solve(proj.sum(axis=1), rhs[..., None])[..., 0]

    pix = _pixel_grid((H, W), (h, w)).reshape(-1, 3)
    if K is None:
        hinv = np.linalg.inv(_homography(d, pix))
        kq, _ = _rq(hinv)
        kq = kq * np.sign(np.diagonal(kq, axis1=-2, axis2=-1))[:, None, :]
        Ks = kq / kq[:, 2:3, 2:3]
        Ks[:, 0, 1] = 0.0  # zero skew, the convention's K; exact for rays made from one
        Ks[:, 1:, 0] = 0.0
        Ks[:, 2, 1] = 0.0
    else:
        Ks = _intrinsics(K, V)
    cam = np.einsum("vab,nb->vna", np.linalg.inv(Ks), pix)
    cam /= np.linalg.norm(cam, axis=-1, keepdims=True)
    rot = _kabsch(cam, d)

    c2w = np.tile(np.eye(4), (V, 1, 1))
    c2w[:, :3, :3] = rot
    c2w[:, :3, 3] = centre
    return c2w, np.array(Ks, dtype=np.float64)


# --------------------------------------------------------------------------- normalisation


def normalize_cameras(
    c2w: np.ndarray, distance: float = DEFAULT_DISTANCE
) -> tuple[np.ndarray, float]:
    """A rig in the frame the model was trained on: returns (c2w [V, 4, 4], scale).

    Every camera is first expressed in camera 0's frame (:func:`relative_to_camera0`: camera 0
    becomes :data:`CAMERA0`, the identity in PyTorch3D's view frame), then translations are
    multiplied by ``scale`` so camera 0 is ``distance`` from the least-squares
    intersection of the optical axes (the lines through each centre along its z axis), which
    fixes the scene's unknown metric scale. Fallback, when that intersection is not usable
    (a single camera; axes nearly parallel: the normal matrix' smallest eigenvalue < 1e-6 of
    its largest; or the point not in front of camera 0): scale so the mean distance from
    camera 0 to the other centres is ``distance``; scale 1 when all centres coincide.
    """
    if not (np.isfinite(distance) and distance > 0):
        raise ValueError(f"distance: expected a positive number, got {distance}")
    rel = relative_to_camera0(c2w)
    centres, axes = rel[:, :3, 3], rel[:, :3, 2]
    scale = 1.0
    point = None
    if len(rel) > 1:
        proj = np.eye(3) - axes[:, :, None] * axes[:, None, :]
        a = proj.sum(axis=0)
        eig = np.linalg.eigvalsh(a)
        if eig[0] >= 1e-6 * eig[-1]:
            p = np.linalg.solve(a, np.einsum("vab,vb->a", proj, centres))
            if p[2] > 0:
                point = p
    if point is not None:
        scale = float(distance / np.linalg.norm(point))
    else:
        mean = float(np.linalg.norm(centres[1:], axis=-1).mean()) if len(rel) > 1 else 0.0
        if mean > 1e-12:
            scale = float(distance / mean)
    rel[:, :3, 3] *= scale
    return rel, scale


def relative_to_camera0(c2w: np.ndarray) -> np.ndarray:
    """Cameras [V, 4, 4] re-anchored in the released loader's world: camera 0's PyTorch3D
    view frame (x left, y up, z forward), where camera 0 is exactly :data:`CAMERA0`."""
    poses = _poses(c2w)
    rel = CAMERA0 @ np.linalg.inv(poses[0]) @ poses
    rel[0] = CAMERA0
    return rel


# --------------------------------------------------------------------------- conventions


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """nerfstudio / Blender / DL3DV camera-to-world (x right, y up, z back) -> OpenCV."""
    return _array(c2w, "c2w", [(4, 4), (None, 4, 4)]) @ _FLIP_YZ


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world -> OpenGL (the same flip; it is its own inverse)."""
    return _array(c2w, "c2w", [(4, 4), (None, 4, 4)]) @ _FLIP_YZ


def pytorch3d_to_opencv(
    R: np.ndarray,
    T: np.ndarray,
    focal_length: float | Sequence[float] | np.ndarray,
    principal_point: Sequence[float] | np.ndarray,
    image_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """A CO3D v2 frame annotation (PyTorch3D: ``X_view = X_world @ R + T``, view x left, y up,
    z forward; focal length and principal point in "ndc_isotropic" NDC, scale min(H, W) / 2,
    +x left, +y up) -> OpenCV (c2w [4, 4], K [3, 3]); batched inputs give [V, ...]."""
    Rs = _array(R, "R", [(3, 3), (None, 3, 3)])
    batched = Rs.ndim == 3
    Rs = Rs.reshape(-1, 3, 3)
    V = Rs.shape[0]
    _check_rotation(Rs, "R")
    Ts = _array(T, "T", [(3,), (None, 3)]).reshape(-1, 3)
    f = _array(focal_length, "focal_length", [(), (2,), (None, 2)])
    f = np.stack([f, f], axis=-1) if f.ndim == 0 else f
    pp = _array(principal_point, "principal_point", [(2,), (None, 2)])
    for name, a in (("T", Ts), ("focal_length", f), ("principal_point", pp)):
        if a.ndim == 2 and a.shape[0] != V:
            raise ValueError(f"{name}: {a.shape[0]} rows for {V} rotations")
    f, pp = np.broadcast_to(f, (V, 2)), np.broadcast_to(pp, (V, 2))
    H, W = _size(image_size, "image_size")
    s = min(H, W) / 2.0
    r_cv = _FLIP_XY @ Rs.swapaxes(-1, -2)  # world-to-camera, OpenCV axes
    t_cv = Ts @ _FLIP_XY
    c2w = np.tile(np.eye(4), (V, 1, 1))
    c2w[:, :3, :3] = r_cv.swapaxes(-1, -2)
    c2w[:, :3, 3] = -np.einsum("vba,vb->va", r_cv, t_cv)
    K = np.tile(np.eye(3), (V, 1, 1))
    K[:, 0, 0], K[:, 1, 1] = f[:, 0] * s, f[:, 1] * s
    K[:, 0, 2], K[:, 1, 2] = W / 2.0 - pp[:, 0] * s, H / 2.0 - pp[:, 1] * s
    return (c2w, K) if batched else (c2w[0], K[0])


def look_at(
    eye: Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray,
    up: Sequence[float] | np.ndarray = (0, 0, 1),
) -> np.ndarray:
    """OpenCV c2w [4, 4] at ``eye`` with z towards ``target``, x right and y down relative to
    ``up``; when ``up`` is parallel to the view, the world axis least aligned with it is used."""
    e = _array(eye, "eye", [(3,)])
    t = _array(target, "target", [(3,)])
    u = _array(up, "up", [(3,)])
    z = t - e
    if np.linalg.norm(z) < 1e-12:
        raise ValueError("look_at: eye and target coincide")
    if np.linalg.norm(u) < 1e-12:
        raise ValueError("up: zero vector")
    z /= np.linalg.norm(z)
    x = np.cross(z, u)
    if np.linalg.norm(x) < 1e-9 * np.linalg.norm(u):
        x = np.cross(z, np.eye(3)[int(np.argmin(np.abs(z)))])
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, np.cross(z, x), z, e
    return c2w


def orbit_cameras(
    azimuths_deg: Sequence[float] | np.ndarray,
    elevations_deg: Sequence[float] | np.ndarray,
    distances: float | Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray = (0, 0, 0),
    up: Sequence[float] | np.ndarray = (0, 0, 1),
) -> np.ndarray:
    """[V, 4, 4] OpenCV c2w on a sphere around ``target``, looking at it (azimuth about +z from
    +x, elevation above the xy plane; the three broadcast against each other)."""
    az = np.radians(_array(azimuths_deg, "azimuths_deg", [(), (None,)]))
    el = np.radians(_array(elevations_deg, "elevations_deg", [(), (None,)]))
    dist = _array(distances, "distances", [(), (None,)])
    try:
        az, el, dist = (np.atleast_1d(a) for a in np.broadcast_arrays(az, el, dist))
    except ValueError:
        raise ValueError("azimuths_deg, elevations_deg, distances: lengths differ") from None
    if np.any(dist <= 0):
        raise ValueError("distances: must be positive")
    tgt = _array(target, "target", [(3,)])
    dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    eyes = tgt + dist[:, None] * dirs
    return np.stack([look_at(e, tgt, up) for e in eyes])


def intrinsics_from_focal(
    focal_px: float | Sequence[float], image_size: tuple[int, int]
) -> np.ndarray:
    """K [3, 3] with focal ``focal_px`` (one value, or (fx, fy)) and the principal point at
    the image centre."""
    f = _array(focal_px, "focal_px", [(), (1,), (2,)]).reshape(-1)
    fx, fy = (f[0], f[0]) if f.size == 1 else (f[0], f[1])
    if fx <= 0 or fy <= 0:
        raise ValueError(f"focal_px: must be positive, got {focal_px}")
    H, W = _size(image_size, "image_size")
    return np.array([[fx, 0.0, W / 2.0], [0.0, fy, H / 2.0], [0.0, 0.0, 1.0]])


def crop_intrinsics(K: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """K [..., 3, 3] after cropping the image at the box origin (x0, y0) in pixels."""
    out = _array(K, "K", [(3, 3), (None, 3, 3)]).copy()
    out[..., 0, 2] -= x0
    out[..., 1, 2] -= y0
    return out


def resize_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K [..., 3, 3] after resizing the image by ``sx`` (width) and ``sy`` (height): with
    half-pixel centres an edge-aligned resize maps u to u * sx, so rows 0 and 1 scale."""
    if not (sx > 0 and sy > 0):
        raise ValueError(f"sx, sy: must be positive, got {sx}, {sy}")
    out = _array(K, "K", [(3, 3), (None, 3, 3)]).copy()
    out[..., 0, :] *= sx
    out[..., 1, :] *= sy
    return out


# --------------------------------------------------------------------------- nerfstudio

_NS_INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_NS_RESERVED = frozenset({"camera_model", "frames", *_NS_INTRINSICS})


def _ns_value(frame: Mapping, top: Mapping, key: str) -> Any:
    """``frame[key]``, else ``top[key]``, else None (a json null counts as absent)."""
    value = frame.get(key)
    return top.get(key) if value is None else value


# The json value readers below serve every camera file format (nerfstudio here, CO3D and
# Objaverse renders in datagen.sources.scenes.formats): a ValueError names ``where`` and the key; a
# CameraValueError is a well-formed value that describes no camera.


def json_number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {key} must be a finite number, got {str(value)[:60]!r}")
    try:
        number = float(value)
    except OverflowError:  # a json integer of 400 digits
        number = math.inf
    if not math.isfinite(number):
        raise CameraValueError(f"{where}: {key} must be a finite number, got {str(value)[:60]}")
    return number


def json_side(value: Any, key: str, where: str) -> int:
    v = json_number(value, key, where)
    if v != int(v) or not 0 < v <= MAX_IMAGE_SIDE:
        raise ValueError(
            f"{where}: {key} must be an integer within [1, {MAX_IMAGE_SIDE}], got {str(value)[:60]}"
        )
    return int(v)


def _ns_focal(
    frame: Mapping, top: Mapping, key: str, angle_key: str, side: int, where: str
) -> float | None:
    """``key`` (pixels), else ``angle_key`` (radians across ``side`` pixels), else None."""
    if (value := _ns_value(frame, top, key)) is not None:
        focal = json_number(value, key, where)
        if focal <= 0:
            raise CameraValueError(f"{where}: {key} must be positive, got {focal}")
        return focal
    if (value := _ns_value(frame, top, angle_key)) is not None:
        return focal_from_angle(json_number(value, angle_key, where), side, angle_key, where)
    return None


def focal_from_angle(angle: float, side: int, key: str, where: str) -> float:
    """The focal length in pixels of a field of view ``angle`` (radians) across ``side``."""
    if not 0 < angle < math.pi:
        raise CameraValueError(f"{where}: {key} {angle} is not within (0, pi)")
    return 0.5 * side / math.tan(0.5 * angle)


def json_pose(value: Any, name: str) -> np.ndarray:
    """A rigid camera-to-world [4, 4] (in the file's convention) from a json 4x4 (or 3x4)
    list of lists."""
    if value is None:
        raise ValueError(f"{name}: missing")
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: not a matrix of numbers") from None
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4):
        raise ValueError(f"{name}: expected shape (4, 4) or (3, 4), got {m.shape}")
    try:
        return _poses(m, name)[0]
    except ValueError as exc:  # the shape is right: NaN / inf or not rigid
        raise CameraValueError(str(exc)) from None


def nerfstudio_camera(
    frame: Mapping, top: Mapping, where: str, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One nerfstudio ``transforms.json`` frame -> (OpenCV c2w [4, 4], pixel K [3, 3], the
    (W, H) that K refers to).

    ``transform_matrix`` is the frame's OpenGL camera-to-world (4x4, or 3x4 without the last
    row), rigid with a proper rotation. Each of ``fl_x, fl_y, cx, cy, w, h, camera_angle_x,
    camera_angle_y`` is read from ``frame`` first, else from ``top`` (a null is absent);
    ``size`` (W, H) stands in when w or h is absent. fl_x beats camera_angle_x; fl_y defaults
    to camera_angle_y, else fl_x; cx, cy to the image centre. Any problem is one ValueError
    whose message starts with ``where`` and names the key: a :class:`CameraValueError` for a
    value that is no camera (NaN / inf, focal <= 0, an angle outside (0, pi), a non-rigid
    pose), a plain ValueError for a missing key or a wrong type or shape.
    """
    if not isinstance(frame, Mapping):
        raise ValueError(f"{where}: not an object")
    w, h = _ns_value(frame, top, "w"), _ns_value(frame, top, "h")
    if w is None or h is None:
        if size is None:
            missing = "w" if w is None else "h"
            raise ValueError(f"{where}: {missing} is missing (image width and height, pixels)")
        w, h = size
    W, H = json_side(w, "w", where), json_side(h, "h", where)
    fx = _ns_focal(frame, top, "fl_x", "camera_angle_x", W, where)
    if fx is None:
        raise ValueError(
            f"{where}: fl_x must be a finite number, got nothing (give fl_x or camera_angle_x)"
        )
    fy = _ns_focal(frame, top, "fl_y", "camera_angle_y", H, where) or fx
    centre = {"cx": W / 2.0, "cy": H / 2.0}
    for key in centre:
        if (value := _ns_value(frame, top, key)) is not None:
            centre[key] = json_number(value, key, where)
    c2w = json_pose(frame.get("transform_matrix"), f"{where}: transform_matrix") @ _FLIP_YZ
    K = np.array([[fx, 0.0, centre["cx"]], [0.0, fy, centre["cy"]], [0.0, 0.0, 1.0]])
    return c2w, K, (W, H)


def nerfstudio_transforms(
    c2w: np.ndarray,
    K: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    file_paths: Sequence[str],
    **top: Any,
) -> dict:
    """A nerfstudio ``transforms.json`` document of OpenCV cameras ``c2w`` [V, 4, 4] with
    intrinsics ``K`` [V, 3, 3] (or one shared [3, 3]) of (W, H) ``sizes``: ``camera_model``
    OPENCV, per frame ``file_path`` and the OpenGL ``transform_matrix``; the intrinsics
    ``fl_x, fl_y, cx, cy, w, h`` once at the top level when every frame shares them, else per
    frame. ``top`` adds top-level keys (``caption``, ``generator``...), not the ones above.
    :func:`nerfstudio_camera` reads each frame back exactly."""
    poses = _poses(c2w)
    V = poses.shape[0]
    Ks = _intrinsics(K, V)
    if len(sizes) != V or len(file_paths) != V:
        raise ValueError(f"sizes, file_paths: {len(sizes)} and {len(file_paths)} for {V} cameras")
    clash = sorted(_NS_RESERVED & set(top))
    if clash:
        raise ValueError(f"top: {', '.join(clash)} are written from the cameras")
    gl = poses @ _FLIP_YZ
    intrinsics = []
    for v, (k, size) in enumerate(zip(Ks, sizes, strict=True)):
        try:
            w, h = size
        except (TypeError, ValueError):
            raise ValueError(f"sizes[{v}]: expected (W, H), got {size!r}") from None
        W, H = json_side(w, "w", f"sizes[{v}]"), json_side(h, "h", f"sizes[{v}]")
        values = (float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]), W, H)
        intrinsics.append(dict(zip(_NS_INTRINSICS, values, strict=True)))
    shared = all(d == intrinsics[0] for d in intrinsics)
    frames = [
        {"file_path": str(name), "transform_matrix": m.tolist(), **({} if shared else d)}
        for name, m, d in zip(file_paths, gl, intrinsics, strict=True)
    ]
    return {"camera_model": "OPENCV", **(intrinsics[0] if shared else {}), **top, "frames": frames}


# --------------------------------------------------------------------------- metrics


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Angle in degrees of ``Ra^T Rb`` ([..., 3, 3], broadcast); atan2 keeps small angles
    accurate where arccos of the trace would not."""
    a = _array(Ra, "Ra", [(3, 3), (None, 3, 3), (None, None, 3, 3)])
    b = _array(Rb, "Rb", [(3, 3), (None, 3, 3), (None, None, 3, 3)])
    r = np.swapaxes(a, -1, -2) @ b
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    sk = r - np.swapaxes(r, -1, -2)
    sin = np.linalg.norm(np.stack([sk[..., 2, 1], sk[..., 0, 2], sk[..., 1, 0]], -1), axis=-1)
    return np.degrees(np.arctan2(sin / 2.0, cos))


def _rotations(R: np.ndarray, name: str) -> np.ndarray:
    r = _array(R, name, [(None, 3, 3)])
    if r.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 cameras, got {r.shape[0]}")
    return r


def relative_rotation_accuracy(
    R_pred: np.ndarray, R_gt: np.ndarray, threshold_deg: float = 15.0
) -> float:
    """RayDiffusion's metric: fraction of ordered pairs i != j whose relative rotation
    ``R_i^T R_j`` (c2w rotations) is within ``threshold_deg`` of the GT one. Invariant to a
    global rotation; ordered and unordered pairs give the same fraction (the angle of a pair
    equals that of its transpose)."""
    p, g = _rotations(R_pred, "R_pred"), _rotations(R_gt, "R_gt")
    if p.shape != g.shape:
        raise ValueError(f"R_pred {p.shape} and R_gt {g.shape} differ")
    rel_p = np.swapaxes(p, -1, -2)[:, None] @ p[None]  # [V, V, 3, 3]
    rel_g = np.swapaxes(g, -1, -2)[:, None] @ g[None]
    err = rotation_angle_deg(rel_p, rel_g)
    off = ~np.eye(len(p), dtype=bool)
    return float((err[off] < threshold_deg).mean())


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising sum |dst - (s R src + t)|^2 (Umeyama 1991); src, dst
    [N, 3]. All-equal ``src`` gives s = 0, R = I, t = mean(dst)."""
    a = _array(src, "src", [(None, 3)])
    b = _array(dst, "dst", [(None, 3)])
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"src {a.shape} and dst {b.shape}: need the same non-empty [N, 3]")
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - ma, b - mb
    var = float((ac**2).sum() / len(a))
    if var < 1e-300:
        return 0.0, np.eye(3), mb
    u, sv, vt = np.linalg.svd(bc.T @ ac / len(a))
    s_fix = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s_fix[-1] = -1.0
    rot = (u * s_fix) @ vt
    s = float((sv * s_fix).sum() / var)
    return s, rot, mb - s * rot @ ma


def camera_center_accuracy(c_pred: np.ndarray, c_gt: np.ndarray, threshold: float = 0.1) -> float:
    """RayDiffusion's metric: after aligning the predicted centres to the GT ones by a
    similarity (the scene's scale and frame are arbitrary), the fraction of cameras within
    ``threshold`` x the scene scale (GT centroid to the furthest GT camera). NaN when all GT
    centres coincide (no scale)."""
    p = _array(c_pred, "c_pred", [(None, 3)])
    g = _array(c_gt, "c_gt", [(None, 3)])
    if p.shape != g.shape or len(p) < 2:
        raise ValueError(f"c_pred {p.shape} and c_gt {g.shape}: need the same [V >= 2, 3]")
    s, rot, t = umeyama(p, g)
    err = np.linalg.norm(s * p @ rot.T + t - g, axis=-1)
    scene = float(np.linalg.norm(g - g.mean(axis=0), axis=-1).max())
    if scene < 1e-12:
        return float("nan")
    return float((err < threshold * scene).mean())


def pose_metrics(
    c2w_pred: np.ndarray,
    c2w_gt: np.ndarray,
    rotation_threshold_deg: float = 15.0,
    center_thresholds: Sequence[float] = (0.1, 0.3),
) -> dict[str, float]:
    """``{"rotation_acc@15": ..., "center_acc@0.1": ..., "center_acc@0.3": ...}`` of one
    rig (keys built from the thresholds with ``:g``)."""
    p = _array(c2w_pred, "c2w_pred", [(None, 4, 4)])
    g = _array(c2w_gt, "c2w_gt", [(None, 4, 4)])
    if p.shape != g.shape:
        raise ValueError(f"c2w_pred {p.shape} and c2w_gt {g.shape} differ")
    out = {
        f"rotation_acc@{rotation_threshold_deg:g}": relative_rotation_accuracy(
            p[:, :3, :3], g[:, :3, :3], rotation_threshold_deg
        )
    }
    for thr in center_thresholds:
        out[f"center_acc@{thr:g}"] = camera_center_accuracy(p[:, :3, 3], g[:, :3, 3], thr)
    return out
