"""Scene sources: multi-view captures -> group rows (datagen.groups), cameras in OpenCV.

Three on-disk formats are read, each converted at ingest to OpenCV camera-to-world
matrices and pixel intrinsics (``K`` of an image of ``size`` = (W, H) pixels):

* **nerfstudio / DL3DV**: a scene is a folder holding ``transforms.json`` (OpenGL
  ``transform_matrix`` per frame; ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` at the top
  level or per frame; ``camera_angle_x`` / ``camera_angle_y`` as in Blender's NeRF-synthetic
  files; an optional ``caption`` at the top level and per frame). Frames are sorted by file
  name (natural order). The ``images`` option reads ``images_2`` / ``_4`` / ``_8`` instead of
  ``images`` (the first folder of each ``file_path`` is replaced), but the intrinsics keep
  referring to the json's full-size (w, h): the scene stage scales them by the decoded file's
  size. Without ``w``/``h`` the size is read from the header of the image the json names (or
  from the downscaled one, times its factor); ``cx``/``cy`` default to the image centre; a
  ``file_path`` without an extension gets ``.png`` (NeRF-synthetic). Distortion is ignored.
* **CO3D v2**: ``<category>/frame_annotations.jgz`` (gzip JSON list), one scene per
  ``sequence_name``, frames sorted by ``frame_number``; PyTorch3D cameras in NDC, format
  ``ndc_isotropic`` (v2) or ``ndc_norm_image_bounds`` (the annotation default when the key
  is absent); image paths relative to the dataset root. No captions.
* **Objaverse-style renders**: a folder per object with ``NNN.json`` per view and the image
  ``NNN.png`` (or .jpg / .jpeg / .webp) beside it. The json holds a 4x4 (or 3x4)
  camera-to-world ``c2w`` or ``transform_matrix`` in ``convention`` ``opengl`` (default, as
  Zero123-style Blender renders), ``blender`` (the same axes) or ``opencv``; intrinsics as
  ``fx``, ``fy`` (default fx), ``cx``, ``cy`` (default the centre) in pixels, or a horizontal
  field of view ``fov`` (radians) / ``fov_deg`` with square pixels; ``width`` / ``height``
  (else read from the image header). Images without a json are ignored.

Every file is untrusted: read as regular files only, size capped, under a timeout
(:func:`datagen.decode.read_bytes`). A scene file that cannot be read or parsed becomes ONE
row with ``group_error`` ``BadSceneFile: <path>: <reason>``; NaN, non-rigid or singular
cameras make ``BadCamera``; a frame whose image is missing keeps its view with a per-view
``source_error`` (``MissingFile``) so decode quarantines the sample naming the file; a frame
path that leaves the dataset is ``BadPath``.

Each scene gives ``samples_per_scene`` samples (rows), its views chosen by
:func:`sample_frames`, a pure function of (scene, sample index, seed). Paths may be local or
fsspec URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from datagen.cameras import pytorch3d_to_opencv
from datagen.decode import BadInput, open_regular, pil_open, read_bytes, run_with_timeout
from datagen.groups import group_rng, group_row, group_table
from datagen.params import ParamError, build
from datagen.procedural_scenes import procedural_scenes
from datagen.sources import SourceError

IMAGE_FOLDERS = ("images", "images_2", "images_4", "images_8")
VIEW_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SCENE_FILE_BYTES = 64 << 20  # one transforms.json (DL3DV: ~300 frames, ~200 KB)
MAX_VIEW_FILE_BYTES = 1 << 20  # one Objaverse-style per-view json
MAX_ANNOTATION_BYTES = 1 << 30  # CO3D frame_annotations.jgz, compressed and unpacked
HEADER_BYTES = 1 << 20  # read to learn an image's size from its header
READ_TIMEOUT_S = 120.0
ROTATION_TOLERANCE = 1e-3  # as datagen.cameras and the scene stage check rotations
MAX_IMAGE_SIDE = 1 << 16  # pixels: a w or h beyond this is not a camera
MAX_NAME_CHARS = 150  # of the readable part of a key
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL <-> OpenCV camera axes


@dataclass(frozen=True)
class ScenesSource:
    """A folder of scenes in one format; every scene gives ``samples_per_scene`` samples of
    ``views`` (min, max) views, consecutive views ``stride`` frames apart."""

    kind: Literal["scenes"]
    path: str
    format: Literal["nerfstudio", "co3d", "objaverse"] = "nerfstudio"
    images: str = "images"  # nerfstudio / DL3DV: images, images_2, images_4 or images_8
    views: tuple[int, int] = (2, 12)
    samples_per_scene: int = 1
    stride: int = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ParamError("path: must name a folder of scenes")
        if self.images not in IMAGE_FOLDERS:
            raise ParamError(
                f"images: must be one of {', '.join(IMAGE_FOLDERS)}, got {self.images!r}"
            )
        check_sampling(self.views, self.samples_per_scene, self.stride)


@dataclass(frozen=True)
class ProceduralScenesSource:
    """Scenes rendered by datagen.procedural_scenes into ``cache_dir`` (tests, the demo),
    then read as nerfstudio scenes."""

    kind: Literal["procedural_scenes"]
    n: int = 6
    frames: int = 12
    size: int = 256
    cache_dir: str | None = None
    views: tuple[int, int] = (2, 6)
    samples_per_scene: int = 2
    stride: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 100_000:
            raise ParamError(f"n: must be within [1, 100000], got {self.n}")
        if not 1 <= self.frames <= 10_000:
            raise ParamError(f"frames: must be within [1, 10000], got {self.frames}")
        if not 16 <= self.size <= 4096:
            raise ParamError(f"size: must be within [16, 4096], got {self.size}")
        check_sampling(self.views, self.samples_per_scene, self.stride)


def check_sampling(views: tuple[int, int], samples: int, stride: int) -> None:
    """The sampling parameters both sources share, a ParamError naming the key."""
    if not 2 <= views[0] <= views[1]:
        raise ParamError(f"views: need 2 <= views[0] <= views[1], got {list(views)}")
    if samples < 1:
        raise ParamError(f"samples_per_scene: must be >= 1, got {samples}")
    if stride < 1:
        raise ParamError(f"stride: must be >= 1, got {stride}")


# --------------------------------------------------------------------------- scenes


@dataclass
class SceneFrame:
    """One frame: its image ``uri``, OpenCV camera-to-world ``c2w`` [4, 4], pixel ``K``
    [3, 3] of an image of ``size`` (W, H), an optional caption, and the reason its image
    cannot be used (``"Class: message"``) if the reader already knows one."""

    uri: str
    c2w: np.ndarray
    K: np.ndarray
    size: tuple[int, int]
    caption: str | None = None
    error: str | None = None


@dataclass
class Scene:
    """A scene as read: ``name`` (the group id), ``source`` (its file, ``#sequence`` for
    CO3D), ``source_id`` (the source relative to the dataset root: keys digest it, so they
    survive moving the dataset), frames in capture order, a caption, or the ``error`` that
    makes the whole scene one error row."""

    name: str
    source: str
    source_id: str
    frames: list[SceneFrame] = field(default_factory=list)
    caption: str | None = None
    error: str | None = None


class _Problem(Exception):
    """Why a scene cannot be used, ``"Class: message"`` (BadSceneFile, BadCamera)."""


def _shown(text: str) -> str:
    """A path as valid UTF-8 text (Arrow strings), undecodable bytes escaped."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _natural(text: str) -> list[Any]:
    """Sort key: ``r_2`` before ``r_10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text)]


class _Store:
    """The filesystem a source path lives on (local or fsspec): uris and cached listings."""

    def __init__(self, root: str):
        try:
            self.fs, self.base = fsspec.core.url_to_fs(root)
        except (ValueError, ImportError) as exc:
            raise SourceError(f"scene path {root}: {exc}") from None
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        self.base = self.base.rstrip("/") or "/"
        self._listings: dict[str, set[str]] = {}

    def uri(self, path: str) -> str:
        return self.prefix + path

    def relative(self, path: str) -> str:
        """``path`` below the root (the root's own name for the root): a scene's name."""
        rel = posixpath.relpath(path, self.base)
        return posixpath.basename(self.base) if rel == "." else rel

    def source_id(self, path: str) -> str:
        """``path`` relative to the root's parent: what keys digest, stable when the dataset
        moves, and distinct for two single-scene roots."""
        return posixpath.relpath(path, posixpath.dirname(self.base))

    def names(self, folder: str) -> set[str]:
        """Base names of the entries of ``folder`` (empty when it cannot be listed)."""
        if folder not in self._listings:
            try:
                entries = self.fs.ls(folder, detail=False)
            except (OSError, ValueError):
                entries = []
            self._listings[folder] = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        return self._listings[folder]

    def exists(self, path: str) -> bool:
        return posixpath.basename(path) in self.names(posixpath.dirname(path))

    def walk(self, keep: Callable[[str, list[str]], bool]) -> list[tuple[str, list[str]]]:
        """(folder, file names) of every folder under the root that ``keep`` accepts; the
        walk does not descend into an accepted folder (its subfolders hold its images)."""
        found = []
        seen: set[str] = set()  # real paths of local folders: a symlink loop ends the branch
        for folder, dirs, files in self.fs.walk(self.base, topdown=True):
            if not self.prefix:
                real = os.path.realpath(folder)
                if real in seen:
                    dirs.clear()
                    continue
                seen.add(real)
            names = sorted(files)
            self._listings[folder] = set(names) | set(dirs)
            if keep(folder, names):
                found.append((folder, names))
                dirs.clear()
            else:
                dirs.sort()
        return sorted(found, key=lambda f: _natural(f[0]))


def _read(store: _Store, path: str, max_bytes: int) -> bytes:
    uri = store.uri(path)
    try:
        return read_bytes(uri, max_bytes=max_bytes, timeout_s=READ_TIMEOUT_S)
    except BadInput as exc:
        raise _Problem(f"BadSceneFile: {_shown(uri)}: {exc.error}: {_shown(exc.message)}") from None


def _parse_json(data: bytes, uri: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _Problem(f"BadSceneFile: {_shown(uri)}: not valid JSON ({reason})") from None


def _image_size(uri: str) -> tuple[int, int] | None:
    """(W, H) from an image's header (its first HEADER_BYTES), None if it cannot be read."""

    def head(cancelled: Any) -> bytes:
        fh, _ = open_regular(uri)
        with fh:
            return fh.read(HEADER_BYTES)

    try:
        data = run_with_timeout(head, READ_TIMEOUT_S, uri)
        with pil_open(io.BytesIO(data)) as im:
            return int(im.size[0]), int(im.size[1])
    except (BadInput, OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


# --------------------------------------------------------------------------- numbers


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Problem(f"BadSceneFile: {where}: {what} is not a number: {str(value)[:60]!r}")
    try:
        number = float(value)  # a json integer of 400 digits overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Problem(f"BadCamera: {where}: {what} is not finite")
    return number


def _pixels(value: Any, what: str, where: str) -> int:
    v = _number(value, what, where)
    if v != int(v) or not 0 < v <= MAX_IMAGE_SIDE:
        raise _Problem(
            f"BadSceneFile: {where}: {what} must be an integer within [1, {MAX_IMAGE_SIDE}], "
            f"got {value}"
        )
    return int(v)


def _text(value: Any, what: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _utf8_ok(value):
        raise _Problem(f"BadSceneFile: {where}: {what} is not a string")
    return value


def _matrix(value: Any, what: str, where: str) -> np.ndarray:
    """A rigid 4x4 from a json 4x4 or 3x4 list of lists."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _Problem(f"BadSceneFile: {where}: {what} is not a matrix of numbers") from None
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4):
        raise _Problem(f"BadSceneFile: {where}: {what} has shape {m.shape}, not 4x4 or 3x4")
    if not np.all(np.isfinite(m)):
        raise _Problem(f"BadCamera: {where}: {what} contains NaN or inf")
    r = m[:3, :3]
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=ROTATION_TOLERANCE):
        raise _Problem(f"BadCamera: {where}: {what} last row is not [0, 0, 0, 1]")
    if not np.allclose(r.T @ r, np.eye(3), atol=ROTATION_TOLERANCE) or np.linalg.det(r) <= 0:
        raise _Problem(f"BadCamera: {where}: {what} rotation is not orthonormal with det +1")
    return m


def _pinhole(fx: float, fy: float, cx: float, cy: float, where: str) -> np.ndarray:
    if not (fx > 0 and fy > 0):
        raise _Problem(f"BadCamera: {where}: focal lengths ({fx}, {fy}) must be positive")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _focal_from_angle(angle: float, pixels: int, what: str, where: str) -> float:
    if not 0 < angle < math.pi:
        raise _Problem(f"BadCamera: {where}: {what} {angle} is not within (0, pi)")
    return 0.5 * pixels / math.tan(0.5 * angle)


def _safe_join(root: str, relative: str) -> str | None:
    """``root/relative`` normalised, or None when ``relative`` is absolute, a URL or leaves
    ``root``: a scene file must not point the pipeline at other files of the machine."""
    if not relative or relative.startswith("/") or "://" in relative or "\\" in relative:
        return None
    joined = posixpath.normpath(posixpath.join(root, relative))
    return joined if joined.startswith(root.rstrip("/") + "/") else None


def _view_error(store: _Store, path: str | None, shown: str, root: str) -> str | None:
    """Why a frame's image cannot be used: a path outside ``root``, a name that is not
    UTF-8, a missing file; None when it is listed."""
    if path is None:
        return f"BadPath: {_shown(shown)} points outside {_shown(store.uri(root))}"
    if not _utf8_ok(path):
        return f"BadFileName: {_shown(store.uri(path))} is not a valid UTF-8 path"
    if not store.exists(path):
        return f"MissingFile: {_shown(store.uri(path))} does not exist"
    return None


# --------------------------------------------------------------------------- nerfstudio

_NS_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")


def _ns_path(file_path: str, images: str, where: str) -> str:
    """The frame's image relative to the scene folder, in the ``images`` folder asked for."""
    rel = posixpath.normpath(file_path.removeprefix("./"))
    if not posixpath.splitext(rel)[1]:
        rel += ".png"  # Blender NeRF-synthetic names frames without an extension
    if images != "images":
        head, _, tail = rel.partition("/")
        if head not in IMAGE_FOLDERS or not tail:
            raise _Problem(
                f"BadSceneFile: {where}: frame path {file_path!r} is not under images/, so "
                f"{images} cannot be picked (use images: images)"
            )
        rel = f"{images}/{tail}"
    return rel


def _ns_fallback_size(
    store: _Store, folder: str, file_path: str, images: str, where: str
) -> tuple[int, int]:
    """(W, H) the intrinsics of a json without w/h refer to: the named image's, else the
    downscaled image's times its factor."""
    candidates = [(_ns_path(file_path, "images", where), 1)]
    if images != "images":
        candidates.append((_ns_path(file_path, images, where), int(images.rsplit("_", 1)[1])))
    for rel, factor in candidates:
        path = _safe_join(folder, rel)
        if path is not None and store.exists(path):
            size = _image_size(store.uri(path))
            if size is not None:
                return size[0] * factor, size[1] * factor
    raise _Problem(
        f"BadSceneFile: {where}: no w/h, and the size of {file_path!r} cannot be read from "
        "its image"
    )


def _ns_intrinsics(
    cam: dict[str, Any], fallback: Callable[[], tuple[int, int]], where: str
) -> tuple[np.ndarray, tuple[int, int]]:
    if cam.get("w") is not None and cam.get("h") is not None:
        size = (_pixels(cam["w"], "w", where), _pixels(cam["h"], "h", where))
    else:
        size = fallback()
    w, h = size
    if cam.get("fl_x") is not None:
        fx = _number(cam["fl_x"], "fl_x", where)
    elif cam.get("camera_angle_x") is not None:
        angle = _number(cam["camera_angle_x"], "camera_angle_x", where)
        fx = _focal_from_angle(angle, w, "camera_angle_x", where)
    else:
        raise _Problem(f"BadSceneFile: {where}: no focal length (fl_x or camera_angle_x)")
    if cam.get("fl_y") is not None:
        fy = _number(cam["fl_y"], "fl_y", where)
    elif cam.get("camera_angle_y") is not None:
        angle = _number(cam["camera_angle_y"], "camera_angle_y", where)
        fy = _focal_from_angle(angle, h, "camera_angle_y", where)
    else:
        fy = fx
    cx = _number(cam["cx"], "cx", where) if cam.get("cx") is not None else w / 2.0
    cy = _number(cam["cy"], "cy", where) if cam.get("cy") is not None else h / 2.0
    return _pinhole(fx, fy, cx, cy, where), size


def _ns_frames(store: _Store, doc: Any, folder: str, images: str, uri: str) -> list[SceneFrame]:
    if not isinstance(doc, dict):
        raise _Problem(f"BadSceneFile: {uri}: the top level is not an object")
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise _Problem(f"BadSceneFile: {uri}: 'frames' is missing or empty")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise _Problem(f"BadSceneFile: {uri}: frame {i} has no file_path")
        if not _utf8_ok(frame["file_path"]):
            raise _Problem(f"BadSceneFile: {uri}: frame {i} file_path is not valid text")
    frames = sorted(frames, key=lambda f: _natural(f["file_path"]))
    size_box: list[tuple[int, int]] = []

    def fallback() -> tuple[int, int]:  # read once per scene, only when w/h are missing
        if not size_box:
            size_box.append(_ns_fallback_size(store, folder, frames[0]["file_path"], images, uri))
        return size_box[0]

    out = []
    for frame in frames:
        where = f"{uri}: frame {frame['file_path']}"
        cam = {k: frame.get(k, doc.get(k)) for k in _NS_KEYS}
        K, size = _ns_intrinsics(cam, fallback, where)
        c2w = _matrix(frame.get("transform_matrix"), "transform_matrix", where) @ _FLIP_YZ
        path = _safe_join(folder, _ns_path(frame["file_path"], images, uri))
        caption = _text(frame.get("caption"), "caption", where)
        out.append(
            SceneFrame(
                uri=_shown(store.uri(path)) if path else "",
                c2w=c2w,
                K=K,
                size=size,
                caption=caption,
                error=_view_error(store, path, frame["file_path"], folder),
            )
        )
    return out


def read_nerfstudio(store: _Store, transforms: str, images: str = "images") -> Scene:
    """The scene of one ``transforms.json`` (a path on ``store``)."""
    folder = posixpath.dirname(transforms)
    name = store.relative(folder)
    uri = _shown(store.uri(transforms))
    scene = Scene(name=_shown(name), source=uri, source_id=store.source_id(transforms))
    try:
        doc = _parse_json(_read(store, transforms, MAX_SCENE_FILE_BYTES), uri)
        scene.frames = _ns_frames(store, doc, folder, images, uri)
        scene.caption = _text(doc.get("caption"), "caption", uri)
    except _Problem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def nerfstudio_scenes(path: str, images: str = "images") -> list[Scene]:
    """Every scene under ``path`` (a scene folder, a folder of scene folders searched
    recursively, or one transforms.json), sorted by folder."""
    store = _store(path)
    if store.fs.isfile(store.base):
        if posixpath.basename(store.base) != "transforms.json":
            raise SourceError(f"{path} is a file, not transforms.json or a folder of scenes")
        store.base = posixpath.dirname(store.base)
        return [read_nerfstudio(store, posixpath.join(store.base, "transforms.json"), images)]
    found = store.walk(lambda folder, files: "transforms.json" in files)
    return [
        read_nerfstudio(store, posixpath.join(folder, "transforms.json"), images)
        for folder, _ in found
    ]


# --------------------------------------------------------------------------- CO3D

_CO3D_FILE = "frame_annotations.jgz"
_CO3D_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")


def _gunzip(data: bytes, uri: str) -> bytes:
    """The unpacked bytes, at most MAX_ANNOTATION_BYTES (a gzip bomb stops there)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            out = fh.read(MAX_ANNOTATION_BYTES + 1)
    except (OSError, EOFError, ValueError) as exc:
        raise _Problem(f"BadSceneFile: {uri}: not a gzip file ({exc})") from None
    if len(out) > MAX_ANNOTATION_BYTES:
        raise _Problem(f"BadSceneFile: {uri}: unpacks to more than {MAX_ANNOTATION_BYTES} bytes")
    return out


def _co3d_camera(
    frame: dict[str, Any], where: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(c2w, K, (W, H)) of one CO3D frame annotation."""
    image = frame.get("image")
    view = frame.get("viewpoint")
    if not isinstance(image, dict) or not isinstance(view, dict):
        raise _Problem(f"BadSceneFile: {where}: no image or viewpoint")
    hw = image.get("size")
    if not isinstance(hw, list) or len(hw) != 2:
        raise _Problem(f"BadSceneFile: {where}: image.size is not [H, W]")
    H, W = (_pixels(v, "image.size", where) for v in hw)
    fmt = view.get("intrinsics_format", "ndc_norm_image_bounds")
    if fmt not in _CO3D_FORMATS:
        raise _Problem(f"BadSceneFile: {where}: intrinsics_format {str(fmt)[:40]!r} unknown")
    try:
        focal = np.asarray(view.get("focal_length"), dtype=np.float64).reshape(-1)
        pp = np.asarray(view.get("principal_point"), dtype=np.float64).reshape(-1)
        if focal.size == 1:
            focal = np.repeat(focal, 2)
        if focal.size != 2 or pp.size != 2:
            raise ValueError("focal_length and principal_point need 2 values")
        if fmt == "ndc_norm_image_bounds":
            # NDC scale per axis (W/2, H/2) -> the isotropic scale min(H, W)/2 cameras.py uses.
            per_axis = np.array([W, H], dtype=np.float64) / min(H, W)
            focal, pp = focal * per_axis, pp * per_axis
        c2w, K = pytorch3d_to_opencv(view.get("R"), view.get("T"), focal, pp, (H, W))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Problem(f"BadCamera: {where}: {exc}") from None
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise _Problem(f"BadCamera: {where}: focal lengths must be positive")
    return c2w, K, (W, H)


def _co3d_sequence(
    store: _Store, root: str, category: str, uri: str, sequence: str, entries: list[dict]
) -> Scene:
    name = f"{category}/{sequence}"
    scene = Scene(
        name=_shown(name),
        source=f"{uri}#{_shown(sequence)}",
        source_id=f"{category}/{_CO3D_FILE}#{sequence}",
    )
    try:
        frames = []
        for entry in entries:
            number = entry.get("frame_number")
            where = f"{uri}#{sequence}: frame {str(number)[:20]}"
            if isinstance(number, bool) or not isinstance(number, int):
                raise _Problem(f"BadSceneFile: {where}: frame_number is not an integer")
            c2w, K, size = _co3d_camera(entry, where)
            rel = _text(entry["image"].get("path"), "image.path", where)
            if rel is None:
                raise _Problem(f"BadSceneFile: {where}: no image.path")
            path = _safe_join(root, rel)
            frames.append(
                (
                    number,
                    SceneFrame(
                        uri=_shown(store.uri(path)) if path else "",
                        c2w=c2w,
                        K=K,
                        size=size,
                        error=_view_error(store, path, rel, root),
                    ),
                )
            )
        scene.frames = [f for _, f in sorted(frames, key=lambda nf: nf[0])]
    except _Problem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def read_co3d(store: _Store, annotations: str, root: str) -> list[Scene]:
    """One scene per sequence of a category's ``frame_annotations.jgz``; image paths are
    relative to the dataset ``root`` (the category folder's parent)."""
    category = posixpath.basename(posixpath.dirname(annotations))
    uri = _shown(store.uri(annotations))
    try:
        data = _gunzip(_read(store, annotations, MAX_ANNOTATION_BYTES), uri)
        doc = _parse_json(data, uri)
        if not isinstance(doc, list):
            raise _Problem(f"BadSceneFile: {uri}: not a list of frame annotations")
        sequences: dict[str, list[dict]] = {}
        for i, entry in enumerate(doc):
            seq = entry.get("sequence_name") if isinstance(entry, dict) else None
            if not isinstance(seq, str) or not seq or not _utf8_ok(seq):
                raise _Problem(f"BadSceneFile: {uri}: entry {i} has no sequence_name")
            sequences.setdefault(seq, []).append(entry)
    except _Problem as exc:
        return [Scene(_shown(category), uri, f"{category}/{_CO3D_FILE}", error=str(exc))]
    return [
        _co3d_sequence(store, root, category, uri, seq, sequences[seq])
        for seq in sorted(sequences, key=_natural)
    ]


def co3d_scenes(path: str) -> list[Scene]:
    """Every sequence of the CO3D dataset root ``path`` (its category folders) or of one
    category folder."""
    store = _store(path)
    if _CO3D_FILE in store.names(store.base):
        categories = [store.base]
    else:
        categories = [
            folder
            for folder in sorted(store.fs.ls(store.base, detail=False), key=_natural)
            if _CO3D_FILE in store.names(str(folder).rstrip("/"))
        ]
    scenes: list[Scene] = []
    for folder in categories:
        folder = str(folder).rstrip("/")
        root = posixpath.dirname(folder)
        scenes.extend(read_co3d(store, posixpath.join(folder, _CO3D_FILE), root))
    return scenes


# --------------------------------------------------------------------------- Objaverse-style

_VIEW_JSON = re.compile(r"^(\d+)\.json$")


def _objaverse_view(store: _Store, folder: str, names: set[str], stem: str) -> SceneFrame:
    path = posixpath.join(folder, f"{stem}.json")
    uri = _shown(store.uri(path))
    doc = _parse_json(_read(store, path, MAX_VIEW_FILE_BYTES), uri)
    if not isinstance(doc, dict):
        raise _Problem(f"BadSceneFile: {uri}: the top level is not an object")
    image = next((f"{stem}{e}" for e in VIEW_IMAGE_EXTENSIONS if f"{stem}{e}" in names), None)
    image_path = posixpath.join(folder, image or f"{stem}.png")
    key = "c2w" if "c2w" in doc else "transform_matrix"
    c2w = _matrix(doc.get(key), key, uri)
    convention = doc.get("convention", "opengl")
    if convention not in ("opencv", "opengl", "blender"):
        raise _Problem(f"BadSceneFile: {uri}: convention {str(convention)[:40]!r} unknown")
    if convention != "opencv":
        c2w = c2w @ _FLIP_YZ
    if doc.get("width") is not None and doc.get("height") is not None:
        size = (_pixels(doc["width"], "width", uri), _pixels(doc["height"], "height", uri))
    else:
        read = _image_size(store.uri(image_path)) if image else None
        if read is None:
            raise _Problem(f"BadSceneFile: {uri}: no width/height and no readable image")
        size = read
    w, h = size
    if doc.get("fx") is not None:
        fx = _number(doc["fx"], "fx", uri)
        fy = _number(doc["fy"], "fy", uri) if doc.get("fy") is not None else fx
    elif doc.get("fov") is not None or doc.get("fov_deg") is not None:
        fov = (
            _number(doc["fov"], "fov", uri)
            if doc.get("fov") is not None
            else math.radians(_number(doc["fov_deg"], "fov_deg", uri))
        )
        fx = fy = _focal_from_angle(fov, w, "fov", uri)
    else:
        raise _Problem(f"BadSceneFile: {uri}: no intrinsics (fx or fov / fov_deg)")
    cx = _number(doc["cx"], "cx", uri) if doc.get("cx") is not None else w / 2.0
    cy = _number(doc["cy"], "cy", uri) if doc.get("cy") is not None else h / 2.0
    error = None if image else f"MissingFile: {_shown(store.uri(image_path))} does not exist"
    return SceneFrame(
        uri=_shown(store.uri(image_path)),
        c2w=c2w,
        K=_pinhole(fx, fy, cx, cy, uri),
        size=size,
        error=error,
    )


def read_objaverse(store: _Store, folder: str, files: Sequence[str]) -> Scene:
    """The views of one object folder, in view-number order."""
    stems = sorted((m.group(1) for f in files if (m := _VIEW_JSON.match(f))), key=int)
    scene = Scene(
        name=_shown(store.relative(folder)),
        source=_shown(store.uri(folder)),
        source_id=store.source_id(folder),
    )
    try:
        names = set(files)
        scene.frames = [_objaverse_view(store, folder, names, stem) for stem in stems]
    except _Problem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def objaverse_scenes(path: str) -> list[Scene]:
    """Every object folder (one holding ``NNN.json`` view files) under ``path``."""
    store = _store(path)
    found = store.walk(lambda folder, files: any(_VIEW_JSON.match(f) for f in files))
    return [read_objaverse(store, folder, files) for folder, files in found]


# --------------------------------------------------------------------------- sampling


def _store(path: str) -> _Store:
    store = _Store(path)
    if not store.fs.exists(store.base):
        raise SourceError(f"scene path {path} does not exist")
    return store


def sample_frames(
    scene_id: str,
    n_frames: int,
    views: tuple[int, int],
    samples: int,
    stride: int,
    seed: int,
) -> list[list[int]]:
    """The frame indices of each of a scene's ``samples`` samples ([] when the scene has
    fewer than ``views[0]`` frames).

    Sample k draws its view count n uniformly in [views[0], min(views[1], what fits)] and
    takes frames start, start + stride, ...; its start is drawn within the k-th of
    ``samples`` equal parts of the valid start range, so the samples spread over the scene
    (they may share frames, and repeat a start when there are fewer starts than samples).
    When ``views[0]`` frames do not fit at ``stride``, the stride shrinks until they do.
    A pure function of (scene_id, k, seed) and the scene's frame count.
    """
    lo, hi = views
    if n_frames < lo:
        return []
    step = min(stride, (n_frames - 1) // (lo - 1))
    fits = (n_frames - 1) // step + 1
    picks = []
    for k in range(samples):
        rng = group_rng(scene_id, k, seed)
        n = int(rng.integers(lo, min(hi, fits) + 1))
        starts = n_frames - (n - 1) * step
        start = min(starts - 1, int((k + rng.random()) * starts / samples))
        picks.append([start + i * step for i in range(n)])
    return picks


def scene_key_prefix(scene: Scene) -> str:
    """``<name cleaned to [A-Za-z0-9_-]>-<8 hex of the source id>``: readable, stable, and
    unique per scene file (two scenes with one name differ in their source)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", scene.name).strip("_")[:MAX_NAME_CHARS] or "scene"
    digest = hashlib.sha1(scene.source_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{readable}-{digest}"


def _row(scene: Scene, key: str, frames: list[SceneFrame], indices: list[int], **kw: Any) -> dict:
    captions = [f.caption for f in frames]
    return group_row(
        key,
        scene.name,
        scene.source,
        [f.uri for f in frames],
        frames=indices,
        view_captions=captions if any(c is not None for c in captions) else None,
        source_errors=[f.error for f in frames],
        group_caption=scene.caption,
        cameras=np.stack([f.c2w for f in frames]),
        intrinsics=np.stack([f.K for f in frames]),
        sizes=[f.size for f in frames],
        **kw,
    )


def scene_rows(
    scene: Scene, views: tuple[int, int], samples: int, stride: int, seed: int
) -> list[dict[str, Any]]:
    """The group rows of one scene: ``samples`` samples, or one error / filter row."""
    prefix = scene_key_prefix(scene)
    if scene.error is not None or not scene.frames:
        error = scene.error or f"BadSceneFile: {scene.source}: no frames"
        return [group_row(f"{prefix}-s0", scene.name, scene.source, [""], group_error=error)]
    n = len(scene.frames)
    picks = sample_frames(prefix, n, views, samples, stride, seed)
    if not picks:
        reason = (
            f"TooFewViews: scene {scene.name} has {n} frame{'s' if n != 1 else ''}, "
            f"fewer than views[0]={views[0]}"
        )
        return [_row(scene, f"{prefix}-s0", scene.frames, list(range(n)), group_filter=reason)]
    return [
        _row(scene, f"{prefix}-s{k}", [scene.frames[i] for i in idx], idx)
        for k, idx in enumerate(picks)
    ]


def load_scenes(source: ScenesSource | ProceduralScenesSource, work_dir: str) -> list[Scene]:
    """The scenes of a source (the procedural ones rendered into their cache first)."""
    if isinstance(source, ProceduralScenesSource):
        cache = source.cache_dir or str(Path(work_dir) / "procedural_scenes")
        folders = procedural_scenes(cache, source.n, source.frames, source.size)
        store = _Store(cache)
        return [
            read_nerfstudio(store, posixpath.join(store.base, f.name, "transforms.json"))
            for f in folders
        ]
    if source.format == "co3d":
        return co3d_scenes(source.path)
    if source.format == "objaverse":
        return objaverse_scenes(source.path)
    return nerfstudio_scenes(source.path, source.images)


def scene_manifest(spec: dict, work_dir: str, seed: int = 0) -> pa.Table:
    """A ``scenes`` or ``procedural_scenes`` source spec -> a group table
    (:data:`datagen.groups.GROUP_MANIFEST_SCHEMA`), one row per sample."""
    kinds = {"scenes": ScenesSource, "procedural_scenes": ProceduralScenesSource}
    cls = kinds.get(spec.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise SourceError(
            f"scene_manifest: kind {spec.get('kind')!r} is not scenes or procedural_scenes"
        )
    source = build(cls, spec, "source")
    rows = [
        row
        for scene in load_scenes(source, work_dir)
        for row in scene_rows(scene, source.views, source.samples_per_scene, source.stride, seed)
    ]
    return group_table(rows)
