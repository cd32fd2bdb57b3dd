"""Small multi-view scenes rendered with numpy, for tests and the demo (no downloads).

A scene is 2-4 textured spheres and boxes on a tiled ground plane (z = 0, world z up)
under a sky gradient, lit by one directional light (Lambert shading, hard shadows),
seen by cameras on an orbit around the scene centre: azimuth sweeping one way, a little
elevation and distance jitter, one pinhole intrinsics per scene with a field of view of
40-60 degrees. Everything is a pure function of the seed.

Rendering casts one ray per pixel centre, exactly as :mod:`datagen.cameras` defines the
rays (OpenCV camera-to-world, pixel (row i, col j) centre at (j + 0.5, i + 0.5), ray
direction ``R K^-1 [u, v, 1]``), with no anti-aliasing, so the hit point stored for a
pixel lies on that pixel's ray: tests check the camera conventions against the pictures.

:func:`write_nerfstudio_scene` writes a scene in the nerfstudio / DL3DV layout
(``transforms.json`` with OpenGL camera-to-world matrices, ``images/`` and the half-size
``images_2/``) that :mod:`datagen.sources.scenes.manifest` reads; :func:`procedural_scenes` keeps a cache
of such folders, regenerating only what is missing or stale.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from datagen.cameras import intrinsics_from_focal, look_at, nerfstudio_transforms
from datagen.io import BadInput, read_bytes

# Bumped whenever the pictures or cameras for a seed change: cached scenes are redrawn.
GENERATOR_VERSION = 1
SKY, GROUND = -1, 0  # shape ids of a pixel that hits nothing / the ground plane
_EPS = 1e-9
_MAX_JSON_BYTES = 1 << 20  # our own transforms.json, read back to check the cache

# Named colours (linear RGB in [0, 1]) used for objects and captions.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.15, 0.12),
    "orange": (0.92, 0.48, 0.10),
    "yellow": (0.92, 0.82, 0.15),
    "green": (0.20, 0.62, 0.22),
    "teal": (0.10, 0.58, 0.58),
    "blue": (0.15, 0.30, 0.82),
    "purple": (0.50, 0.22, 0.70),
    "pink": (0.92, 0.45, 0.65),
    "brown": (0.50, 0.32, 0.16),
}
# Ground looks: (caption words, colour a, colour b, tile size in world units).
FLOORS: tuple[tuple[str, tuple[float, ...], tuple[float, ...], float], ...] = (
    ("gray tiled", (0.55, 0.55, 0.55), (0.38, 0.38, 0.40), 0.5),
    ("sandy checkered", (0.80, 0.70, 0.50), (0.62, 0.52, 0.36), 0.4),
    ("dark blue tiled", (0.22, 0.26, 0.40), (0.32, 0.36, 0.52), 0.6),
    ("white and black checkered", (0.85, 0.85, 0.85), (0.12, 0.12, 0.12), 0.5),
)
TEXTURES = ("checkered", "striped", "gradient", "plain")
_SKY_HORIZON = np.array([0.86, 0.90, 0.95])
_SKY_ZENITH = np.array([0.32, 0.52, 0.85])


@dataclass(frozen=True)
class Shape:
    """One object: a sphere (``size`` = (r, r, r)) or a box (``size`` = half extents,
    turned by ``yaw`` radians about +z), textured in its own frame."""

    kind: Literal["sphere", "box"]
    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    colour: str
    texture: str
    colour2: str  # second colour of a gradient

    @property
    def radius(self) -> float:
        return self.size[0]


@dataclass(frozen=True)
class SceneRender:
    """A rendered scene: ``images`` uint8 [F, H, W, 3]; ``c2w`` OpenCV camera-to-world
    [F, 4, 4]; ``K`` pixel intrinsics [F, 3, 3]; ``depth`` [F, H, W] distance along each
    pixel-centre unit ray to its hit (inf for sky); ``shape_id`` [F, H, W] int8 (SKY,
    GROUND, or 1 + index into ``shapes``); ``light`` the unit direction towards the light."""

    seed: int
    images: np.ndarray
    c2w: np.ndarray
    K: np.ndarray
    depth: np.ndarray
    shape_id: np.ndarray
    shapes: tuple[Shape, ...]
    floor: str
    light: np.ndarray
    caption: str

    @property
    def frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.images.shape[1]), int(self.images.shape[2])


@dataclass(frozen=True)
class VisiblePoints:
    """Hit points of pixel centres of one frame: ``points`` [N, 3] world, ``pixels`` [N, 2]
    (row, col), ``shape_id`` [N] (GROUND or 1 + shape index)."""

    points: np.ndarray
    pixels: np.ndarray
    shape_id: np.ndarray


# --------------------------------------------------------------------------- scene layout


def _place_shapes(rng: np.random.Generator) -> tuple[Shape, ...]:
    """2-4 shapes resting on the ground, footprints apart and inside a disc of radius 1.6
    (a shape that finds no room after 200 tries is left out)."""
    names = list(COLOURS)
    shapes: list[Shape] = []
    footprints: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(2, 5))):
        kind: Literal["sphere", "box"] = "sphere" if rng.random() < 0.5 else "box"
        if kind == "sphere":
            r = float(rng.uniform(0.25, 0.5))
            size = (r, r, r)
            reach = r
        else:
            size = tuple(float(v) for v in rng.uniform(0.18, 0.42, size=3))
            reach = float(np.hypot(size[0], size[1]))
        for _try in range(200):
            xy = rng.uniform(-1.2, 1.2, size=2)
            if np.linalg.norm(xy) + reach <= 1.6 and all(
                np.linalg.norm(xy - other) > reach + r_other + 0.08 for other, r_other in footprints
            ):
                break
        else:
            continue  # no room left: fewer shapes
        footprints.append((xy, reach))
        colour, colour2 = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        shapes.append(
            Shape(
                kind=kind,
                centre=(float(xy[0]), float(xy[1]), float(size[2])),
                size=size,  # type: ignore[arg-type]
                yaw=float(rng.uniform(0, np.pi)) if kind == "box" else 0.0,
                colour=colour,
                texture=str(rng.choice(TEXTURES)),
                colour2=colour2,
            )
        )
    return tuple(shapes)


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(shapes: tuple[Shape, ...], floor: str) -> str:
    """A short caption: "a red checkered sphere and a blue box on a gray tiled floor"."""
    parts = []
    for s in shapes:
        look = {
            "checkered": f"{s.colour} checkered",
            "striped": f"{s.colour} striped",
            "gradient": f"{s.colour} and {s.colour2} gradient",
            "plain": s.colour,
        }[s.texture]
        parts.append(_article(f"{look} {s.kind}"))
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {_article(floor)} floor"


def _orbit(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(c2w [F, 4, 4], K [F, 3, 3]): an orbit sweeping 200-340 degrees of
    azimuth, elevation 15-35 degrees with jitter, distance 3.4-4.2 with 6 % jitter."""
    target = np.array([0.0, 0.0, 0.3])
    az0, span = rng.uniform(0, 360), rng.uniform(200, 340)
    steps = np.arange(frames) / max(frames - 1, 1)
    az = np.radians(az0 + span * steps + rng.uniform(-2, 2, frames))
    el = np.radians(np.clip(rng.uniform(15, 35) + rng.normal(0, 3, frames), 8, 50))
    dist = rng.uniform(3.4, 4.2) * (1 + rng.uniform(-0.06, 0.06, frames))
    looks = target + rng.normal(0, 0.05, (frames, 3))
    eyes = target + dist[:, None] * np.stack(
        [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1
    )
    c2w = np.stack([look_at(e, t, up=(0, 0, 1)) for e, t in zip(eyes, looks, strict=True)])
    fov = np.radians(rng.uniform(40, 60))
    focal = 0.5 * size / np.tan(fov / 2)
    K = np.broadcast_to(intrinsics_from_focal(focal, (size, size)), (frames, 3, 3)).copy()
    return c2w, K


# --------------------------------------------------------------------------- ray casting


def camera_rays(c2w: np.ndarray, K: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(origins [H*W, 3], unit directions [H*W, 3]) of one camera's pixel centres, row-major."""
    H, W = size
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    pix = np.stack([u.ravel(), v.ravel(), np.ones(H * W)], axis=-1)
    d = pix @ np.linalg.inv(K).T @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return np.broadcast_to(c2w[:3, 3], d.shape), d


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _hit_sphere(o: np.ndarray, d: np.ndarray, centre: np.ndarray, r: float) -> np.ndarray:
    """Distance t [N] along unit rays to a sphere (inf on a miss; the far side from inside)."""
    oc = o - centre
    b = np.einsum("na,na->n", oc, d)
    disc = b * b - (np.einsum("na,na->n", oc, oc) - r * r)
    root = np.sqrt(np.maximum(disc, 0.0))
    near, far = -b - root, -b + root
    t = np.where(near > _EPS, near, np.where(far > _EPS, far, np.inf))
    return np.where(disc >= 0, t, np.inf)


def _hit_box(o: np.ndarray, d: np.ndarray, s: Shape) -> np.ndarray:
    """Distance t [N] along unit rays to a box turned about +z (slabs in the box frame),
    tested only on the rays that meet its bounding sphere."""
    half = np.asarray(s.size)
    t = np.full(len(d), np.inf)
    near_sphere = np.isfinite(_hit_sphere(o, d, np.asarray(s.centre), float(np.linalg.norm(half))))
    if not near_sphere.any():
        return t
    rot = _rot_z(s.yaw)
    lo = (o[near_sphere] - np.asarray(s.centre)) @ rot  # world -> box frame (R^T x, as rows)
    ld = d[near_sphere] @ rot
    safe = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1, t2 = (-half - lo) / safe, (half - lo) / safe
    near = np.minimum(t1, t2).max(axis=1)
    far = np.maximum(t1, t2).min(axis=1)
    hit = (near <= far) & (far > _EPS)
    t[near_sphere] = np.where(hit, np.where(near > _EPS, near, far), np.inf)
    return t


def _normal(p: np.ndarray, s: Shape) -> np.ndarray:
    """Outward unit normals [N, 3] at points ``p`` on the surface of ``s``."""
    if s.kind == "sphere":
        return (p - np.asarray(s.centre)) / s.radius
    rot = _rot_z(s.yaw)
    local = (p - np.asarray(s.centre)) @ rot
    axis = np.argmax(np.abs(local) / np.asarray(s.size), axis=1)
    normal = np.zeros_like(local)
    rows = np.arange(len(local))
    normal[rows, axis] = np.sign(local[rows, axis])
    return normal @ rot.T


def _hit_ground(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    down = d[:, 2] < -1e-12
    t = np.where(down, -o[:, 2] / np.where(down, d[:, 2], -1.0), np.inf)
    return np.where(t > _EPS, t, np.inf)


def _cast(
    o: np.ndarray, d: np.ndarray, shapes: tuple[Shape, ...], ground: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of each unit ray: (t [N], shape id [N])."""
    t = _hit_ground(o, d) if ground else np.full(len(d), np.inf)
    ids = np.where(np.isfinite(t), GROUND, SKY).astype(np.int8)
    for k, s in enumerate(shapes):
        if s.kind == "sphere":
            ts = _hit_sphere(o, d, np.asarray(s.centre), s.radius)
        else:
            ts = _hit_box(o, d, s)
        closer = ts < t
        t = np.where(closer, ts, t)
        ids[closer] = k + 1
    return t, ids


def _parity(x: np.ndarray, period: float) -> np.ndarray:
    return np.floor(x / period).astype(np.int64).sum(axis=-1) % 2


def _albedo(
    p: np.ndarray, ids: np.ndarray, shapes: tuple[Shape, ...], floor: tuple, t: np.ndarray
) -> np.ndarray:
    """[N, 3] surface colours: solid textures in each shape's frame, tiles on the ground
    (their contrast fading with distance, against aliasing)."""
    out = np.zeros_like(p)
    _, ca, cb, tile = floor
    g = ids == GROUND
    if g.any():
        mix = _parity(p[g, :2], tile)[:, None].astype(float)
        fade = np.clip(1.0 - t[g] / 14.0, 0.0, 1.0)[:, None] * 0.5 + 0.5
        mean = (np.asarray(ca) + np.asarray(cb)) / 2
        colour = np.asarray(ca) * (1 - mix) + np.asarray(cb) * mix
        out[g] = mean + (colour - mean) * fade
    white = np.array([0.92, 0.92, 0.90])
    for k, s in enumerate(shapes):
        m = ids == k + 1
        if not m.any():
            continue
        local = (p[m] - np.asarray(s.centre)) @ _rot_z(s.yaw)
        main, second = np.asarray(COLOURS[s.colour]), np.asarray(COLOURS[s.colour2])
        if s.texture == "checkered":
            mix = _parity(local, 0.5 * max(s.size) / 1.5)[:, None].astype(float)
            out[m] = main * (1 - mix) + white * mix
        elif s.texture == "striped":
            mix = _parity(local[:, 2:], max(s.size) / 3.0)[:, None].astype(float)
            out[m] = main * (1 - mix) + white * mix
        elif s.texture == "gradient":
            a = np.clip((local[:, 2:] / s.size[2] + 1) / 2, 0, 1)
            out[m] = main * (1 - a) + second * a
        else:
            out[m] = main
    return out


def _shade(
    o: np.ndarray,
    d: np.ndarray,
    shapes: tuple[Shape, ...],
    floor: tuple,
    light: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(colours [N, 3] in [0, 1], t [N], ids [N]) of unit rays."""
    t, ids = _cast(o, d, shapes)
    hit = ids != SKY
    p = o + np.where(hit, t, 0.0)[:, None] * d
    normal = np.broadcast_to(np.array([0.0, 0.0, 1.0]), d.shape).copy()
    for k, s in enumerate(shapes):
        on = ids == k + 1
        normal[on] = _normal(p[on], s)
    sky = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * np.clip(d[:, 2:], 0, 1) ** 0.7
    colour = sky.copy()
    if hit.any():
        ph, nh = p[hit], normal[hit]
        lit = np.clip(nh @ light, 0.0, None)
        ts, _ = _cast(ph + 1e-6 * nh, np.broadcast_to(light, ph.shape), shapes, ground=False)
        lit = np.where(np.isfinite(ts), 0.0, lit)
        albedo = _albedo(ph, ids[hit], shapes, floor, t[hit])
        surface = albedo * (0.32 + 0.75 * lit)[:, None]
        fog = 1.0 - np.exp(-np.maximum(t[hit] - 7.0, 0.0) / 9.0)
        colour[hit] = surface * (1 - fog[:, None]) + sky[hit] * fog[:, None]
    return colour, np.where(hit, t, np.inf), ids


def render_scene(seed: int, frames: int = 12, size: int = 256) -> SceneRender:
    """Scene ``seed`` seen by ``frames`` orbit cameras at ``size`` x ``size`` pixels."""
    if frames < 1 or size < 8:
        raise ValueError(f"render_scene: need frames >= 1 and size >= 8, got {frames}, {size}")
    rng = np.random.default_rng([GENERATOR_VERSION, int(seed)])
    shapes = _place_shapes(rng)
    floor = FLOORS[int(rng.integers(len(FLOORS)))]
    az, el = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(35, 65))
    light = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    c2w, K = _orbit(rng, frames, size)
    images = np.empty((frames, size, size, 3), np.uint8)
    depth = np.empty((frames, size, size), np.float64)
    ids = np.empty((frames, size, size), np.int8)
    for f in range(frames):
        o, d = camera_rays(c2w[f], K[f], (size, size))
        colour, t, hit = _shade(o, d, shapes, floor, light)
        gamma = np.clip(colour, 0, 1) ** (1 / 2.2)
        images[f] = np.round(gamma * 255).reshape(size, size, 3).astype(np.uint8)
        depth[f] = t.reshape(size, size)
        ids[f] = hit.reshape(size, size)
    return SceneRender(
        seed=int(seed),
        images=images,
        c2w=c2w,
        K=K,
        depth=depth,
        shape_id=ids,
        shapes=shapes,
        floor=floor[0],
        light=light,
        caption=describe(shapes, floor[0]),
    )


def visible_points(render: SceneRender, frame: int, n: int = 64, seed: int = 0) -> VisiblePoints:
    """Up to ``n`` random pixels of ``frame`` that hit a surface, with the world point each
    pixel centre's ray hits (what the pixel shows)."""
    hit = np.flatnonzero(render.shape_id[frame].ravel() != SKY)
    rng = np.random.default_rng([int(seed), int(frame)])
    chosen = np.sort(rng.choice(hit, size=min(n, len(hit)), replace=False))
    o, d = camera_rays(render.c2w[frame], render.K[frame], render.size)
    points = o[chosen] + render.depth[frame].ravel()[chosen, None] * d[chosen]
    W = render.size[1]
    pixels = np.stack([chosen // W, chosen % W], axis=-1)
    return VisiblePoints(points, pixels, render.shape_id[frame].ravel()[chosen])


# --------------------------------------------------------------------------- nerfstudio files


def frame_name(index: int) -> str:
    """``frame_00001.png`` for frame 0: DL3DV's 1-based names."""
    return f"frame_{index + 1:05d}.png"


def _generator_record(render: SceneRender) -> dict[str, Any]:
    """What a cached scene was drawn from: a different record means a stale scene."""
    size = render.size[1]
    return {
        "version": GENERATOR_VERSION,
        "seed": render.seed,
        "frames": render.frames,
        "size": size,
    }


def write_nerfstudio_scene(
    folder: str | Path, render: SceneRender, caption: str | None = None
) -> Path:
    """``folder/transforms.json`` (OpenGL camera-to-world per frame, shared intrinsics at
    the top level, an optional ``caption``), ``images/frame_00001.png``... and half-size
    ``images_2/`` (2x2 box average, so its pixels have half the focal length)."""
    root = Path(folder)
    for sub in ("images", "images_2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    H, W = render.size
    for f in range(render.frames):
        name = frame_name(f)
        img = Image.fromarray(render.images[f])
        img.save(root / "images" / name, compress_level=1)
        half = img.resize((max(1, W // 2), max(1, H // 2)), Image.Resampling.BOX)
        half.save(root / "images_2" / name, compress_level=1)
    doc = nerfstudio_transforms(
        render.c2w,
        render.K,
        [(W, H)] * render.frames,
        [f"images/{frame_name(f)}" for f in range(render.frames)],
        k1=0.0,
        k2=0.0,
        p1=0.0,
        p2=0.0,
        generator=_generator_record(render),
        **({} if caption is None else {"caption": caption}),
    )
    (root / "transforms.json").write_text(json.dumps(doc, indent=1))
    return root


def _is_current(folder: Path, seed: int, frames: int, size: int) -> bool:
    """A cached scene written by this generator version for these arguments, whole."""
    try:
        doc = json.loads(read_bytes(str(folder / "transforms.json"), max_bytes=_MAX_JSON_BYTES))
    except (BadInput, ValueError):
        return False
    want = {"version": GENERATOR_VERSION, "seed": seed, "frames": frames, "size": size}
    if not isinstance(doc, dict) or doc.get("generator") != want:
        return False
    return all(
        (folder / sub / frame_name(f)).is_file()
        for sub in ("images", "images_2")
        for f in range(frames)
    )


def scene_folder_name(index: int) -> str:
    return f"scene_{index:04d}"


def procedural_scenes(cache_dir: str | Path, n: int, frames: int, size: int) -> list[Path]:
    """Folders ``cache_dir/scene_0000``... of scenes 0..n-1 (scene i = seed i), written
    only when missing or stale (other arguments, another generator version, files gone).
    Each is written into a fresh temporary folder and renamed into place."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        final = root / scene_folder_name(i)
        if not _is_current(final, i, frames, size):
            render = render_scene(i, frames, size)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
            try:
                write_nerfstudio_scene(tmp, render, caption=render.caption)
                os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        out.append(final)
    return out
