"""Readers of the on-disk scene formats: each turns one dataset layout into :class:`Scene`s
with OpenCV camera-to-world matrices and pixel intrinsics (``K`` of an image of ``size`` =
(W, H) pixels), converted at ingest, on the shared helpers of :mod:`datagen.sources.scenes.files`.

* **nerfstudio / DL3DV**: a scene is a folder holding ``transforms.json`` (each frame read
  by :func:`datagen.cameras.nerfstudio_camera`: OpenGL ``transform_matrix`` per frame;
  ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` at the top level or per frame;
  ``camera_angle_x`` / ``camera_angle_y`` as in Blender's NeRF-synthetic files; an optional
  ``caption`` at the top level and per frame). Frames are sorted by file
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
* **Zero123 / allenai objaverse-rendering renders** (same ``format``, detected per folder: one
  with ``NNN.npy`` files and no ``NNN.json``): views ``NNN.png`` (RGBA; decode composites
  them on white, as Zero123's loader does) and ``NNN.npy``, the float 3x4 (or 4x4)
  ``get_3x4_RT_matrix_from_blender`` wrote: world-to-camera in Blender's camera axes (OpenGL:
  y up, looking down -z), inverted and flipped to OpenCV here. There is no intrinsics file:
  fx = fy = ``focal_mm`` / ``sensor_mm`` * max(W, H) (Blender's AUTO sensor fit; Zero123
  renders with lens 35 mm on a 32 mm sensor), the principal point at the centre, (W, H) read
  once per folder from the first image's header. A png without its npy makes the folder
  a ``BadSceneFile``; an npy without its png keeps the view with a ``MissingFile``.

A scene file that cannot be read or parsed becomes a scene with an ``error``
``BadSceneFile: <path>: <reason>`` (one row downstream); NaN, non-rigid or singular cameras
make ``BadCamera``; a frame whose image is missing keeps its view with a per-view error
(``MissingFile``, the row's ``source_error``) so decode quarantines the sample naming the
file; a frame path that leaves the dataset is ``BadPath``.
"""

from __future__ import annotations

import gzip
import io
import math
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from datagen.cameras import json_pose, nerfstudio_camera, pytorch3d_to_opencv
from datagen.sources.base import SourceError
from datagen.sources.scenes.files import (
    Scene,
    SceneFrame,
    SceneProblem,
    Store,
    camera_checked,
    check_focal_from_angle,
    check_matrix,
    check_number,
    check_pixels,
    check_text,
    image_size,
    is_utf8,
    natural_key,
    open_store,
    parse_json,
    pinhole,
    printable,
    read_file,
    safe_join,
    view_error,
)

IMAGE_FOLDERS = ("images", "images_2", "images_4", "images_8")
VIEW_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SCENE_FILE_BYTES = 64 << 20  # one transforms.json (DL3DV: ~300 frames, ~200 KB)
MAX_VIEW_FILE_BYTES = 1 << 20  # one Objaverse-style per-view json
MAX_ANNOTATION_BYTES = 1 << 30  # CO3D frame_annotations.jgz, compressed and unpacked
MAX_POSE_FILE_BYTES = 4096  # one Zero123 NNN.npy: a 128-byte header + 16 float64
ZERO123_FOCAL_MM = 35.0  # the Blender lens of Zero123's / objaverse-rendering's script
ZERO123_SENSOR_MM = 32.0  # ... and its sensor width (Blender's default)
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL <-> OpenCV camera axes


# --------------------------------------------------------------------------- nerfstudio


def _ns_path(file_path: str, images: str, where: str) -> str:
    """The frame's image relative to the scene folder, in the ``images`` folder asked for."""
    rel = posixpath.normpath(file_path.removeprefix("./"))
    if not posixpath.splitext(rel)[1]:
        rel += ".png"  # Blender NeRF-synthetic names frames without an extension
    if images != "images":
        head, _, tail = rel.partition("/")
        if head not in IMAGE_FOLDERS or not tail:
            raise SceneProblem(
                f"BadSceneFile: {where}: frame path {file_path!r} is not under images/, so "
                f"{images} cannot be picked (use images: images)"
            )
        rel = f"{images}/{tail}"
    return rel


def _ns_fallback_size(
    store: Store, folder: str, file_path: str, images: str, where: str
) -> tuple[int, int]:
    """(W, H) the intrinsics of a json without w/h refer to: the named image's, else the
    downscaled image's times its factor."""
    candidates = [(_ns_path(file_path, "images", where), 1)]
    if images != "images":
        candidates.append((_ns_path(file_path, images, where), int(images.rsplit("_", 1)[1])))
    for rel, factor in candidates:
        path = safe_join(folder, rel)
        if path is not None and store.exists(path):
            size = image_size(store.uri(path))
            if size is not None:
                return size[0] * factor, size[1] * factor
    raise SceneProblem(
        f"BadSceneFile: {where}: no w/h, and the size of {file_path!r} cannot be read from "
        "its image"
    )


def _ns_frames(store: Store, doc: Any, folder: str, images: str, uri: str) -> list[SceneFrame]:
    if not isinstance(doc, dict):
        raise SceneProblem(f"BadSceneFile: {uri}: the top level is not an object")
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneProblem(f"BadSceneFile: {uri}: 'frames' is missing or empty")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise SceneProblem(f"BadSceneFile: {uri}: frame {i} has no file_path")
        if not is_utf8(frame["file_path"]):
            raise SceneProblem(f"BadSceneFile: {uri}: frame {i} file_path is not valid text")
    frames = sorted(frames, key=lambda f: natural_key(f["file_path"]))
    size_box: list[tuple[int, int]] = []

    def fallback() -> tuple[int, int]:  # read once per scene, only when w/h are missing
        if not size_box:
            size_box.append(_ns_fallback_size(store, folder, frames[0]["file_path"], images, uri))
        return size_box[0]

    out = []
    for frame in frames:
        where = f"{uri}: frame {frame['file_path']}"
        sized = all(frame.get(k) is not None or doc.get(k) is not None for k in ("w", "h"))
        c2w, K, size = camera_checked(
            nerfstudio_camera, frame, doc, where, None if sized else fallback()
        )
        path = safe_join(folder, _ns_path(frame["file_path"], images, uri))
        caption = check_text(frame.get("caption"), "caption", where)
        out.append(
            SceneFrame(
                uri=printable(store.uri(path)) if path else "",
                c2w=c2w,
                K=K,
                size=size,
                caption=caption,
                error=view_error(store, path, frame["file_path"], folder),
            )
        )
    return out


def read_nerfstudio(store: Store, transforms: str, images: str = "images") -> Scene:
    """The scene of one ``transforms.json`` (a path on ``store``)."""
    folder = posixpath.dirname(transforms)
    name = store.relative(folder)
    uri = printable(store.uri(transforms))
    scene = Scene(name=printable(name), source=uri, source_id=store.source_id(transforms))
    try:
        doc = parse_json(read_file(store, transforms, MAX_SCENE_FILE_BYTES), uri)
        scene.frames = _ns_frames(store, doc, folder, images, uri)
        scene.caption = check_text(doc.get("caption"), "caption", uri)
    except SceneProblem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def nerfstudio_scenes(path: str, images: str = "images") -> list[Scene]:
    """Every scene under ``path`` (a scene folder, a folder of scene folders searched
    recursively, or one transforms.json), sorted by folder."""
    store = open_store(path)
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
        raise SceneProblem(f"BadSceneFile: {uri}: not a gzip file ({exc})") from None
    if len(out) > MAX_ANNOTATION_BYTES:
        raise SceneProblem(
            f"BadSceneFile: {uri}: unpacks to more than {MAX_ANNOTATION_BYTES} bytes"
        )
    return out


def _co3d_camera(
    frame: dict[str, Any], where: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(c2w, K, (W, H)) of one CO3D frame annotation."""
    image = frame.get("image")
    view = frame.get("viewpoint")
    if not isinstance(image, dict) or not isinstance(view, dict):
        raise SceneProblem(f"BadSceneFile: {where}: no image or viewpoint")
    hw = image.get("size")
    if not isinstance(hw, list) or len(hw) != 2:
        raise SceneProblem(f"BadSceneFile: {where}: image.size is not [H, W]")
    H, W = (check_pixels(v, "image.size", where) for v in hw)
    fmt = view.get("intrinsics_format", "ndc_norm_image_bounds")
    if fmt not in _CO3D_FORMATS:
        raise SceneProblem(f"BadSceneFile: {where}: intrinsics_format {str(fmt)[:40]!r} unknown")
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
        raise SceneProblem(f"BadCamera: {where}: {exc}") from None
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise SceneProblem(f"BadCamera: {where}: focal lengths must be positive")
    return c2w, K, (W, H)


def _co3d_sequence(
    store: Store, root: str, category: str, uri: str, sequence: str, entries: list[dict]
) -> Scene:
    name = f"{category}/{sequence}"
    scene = Scene(
        name=printable(name),
        source=f"{uri}#{printable(sequence)}",
        source_id=f"{category}/{_CO3D_FILE}#{sequence}",
    )
    try:
        frames = []
        for entry in entries:
            number = entry.get("frame_number")
            where = f"{uri}#{sequence}: frame {str(number)[:20]}"
            if isinstance(number, bool) or not isinstance(number, int):
                raise SceneProblem(f"BadSceneFile: {where}: frame_number is not an integer")
            c2w, K, size = _co3d_camera(entry, where)
            rel = check_text(entry["image"].get("path"), "image.path", where)
            if rel is None:
                raise SceneProblem(f"BadSceneFile: {where}: no image.path")
            path = safe_join(root, rel)
            frames.append(
                (
                    number,
                    SceneFrame(
                        uri=printable(store.uri(path)) if path else "",
                        c2w=c2w,
                        K=K,
                        size=size,
                        error=view_error(store, path, rel, root),
                    ),
                )
            )
        scene.frames = [f for _, f in sorted(frames, key=lambda nf: nf[0])]
    except SceneProblem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def read_co3d(store: Store, annotations: str, root: str) -> list[Scene]:
    """One scene per sequence of a category's ``frame_annotations.jgz``; image paths are
    relative to the dataset ``root`` (the category folder's parent)."""
    category = posixpath.basename(posixpath.dirname(annotations))
    uri = printable(store.uri(annotations))
    try:
        data = _gunzip(read_file(store, annotations, MAX_ANNOTATION_BYTES), uri)
        doc = parse_json(data, uri)
        if not isinstance(doc, list):
            raise SceneProblem(f"BadSceneFile: {uri}: not a list of frame annotations")
        sequences: dict[str, list[dict]] = {}
        for i, entry in enumerate(doc):
            seq = entry.get("sequence_name") if isinstance(entry, dict) else None
            if not isinstance(seq, str) or not seq or not is_utf8(seq):
                raise SceneProblem(f"BadSceneFile: {uri}: entry {i} has no sequence_name")
            sequences.setdefault(seq, []).append(entry)
    except SceneProblem as exc:
        return [Scene(printable(category), uri, f"{category}/{_CO3D_FILE}", error=str(exc))]
    return [
        _co3d_sequence(store, root, category, uri, seq, sequences[seq])
        for seq in sorted(sequences, key=natural_key)
    ]


def co3d_scenes(path: str) -> list[Scene]:
    """Every sequence of the CO3D dataset root ``path`` (its category folders) or of one
    category folder."""
    store = open_store(path)
    if _CO3D_FILE in store.names(store.base):
        categories = [store.base]
    else:
        categories = [
            folder
            for folder in sorted(store.fs.ls(store.base, detail=False), key=natural_key)
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


def _objaverse_view(store: Store, folder: str, names: set[str], stem: str) -> SceneFrame:
    path = posixpath.join(folder, f"{stem}.json")
    uri = printable(store.uri(path))
    doc = parse_json(read_file(store, path, MAX_VIEW_FILE_BYTES), uri)
    if not isinstance(doc, dict):
        raise SceneProblem(f"BadSceneFile: {uri}: the top level is not an object")
    image = next((f"{stem}{e}" for e in VIEW_IMAGE_EXTENSIONS if f"{stem}{e}" in names), None)
    image_path = posixpath.join(folder, image or f"{stem}.png")
    key = "c2w" if "c2w" in doc else "transform_matrix"
    c2w = check_matrix(doc.get(key), key, uri)
    convention = doc.get("convention", "opengl")
    if convention not in ("opencv", "opengl", "blender"):
        raise SceneProblem(f"BadSceneFile: {uri}: convention {str(convention)[:40]!r} unknown")
    if convention != "opencv":
        c2w = c2w @ _FLIP_YZ
    if doc.get("width") is not None and doc.get("height") is not None:
        size = (
            check_pixels(doc["width"], "width", uri),
            check_pixels(doc["height"], "height", uri),
        )
    else:
        read = image_size(store.uri(image_path)) if image else None
        if read is None:
            raise SceneProblem(f"BadSceneFile: {uri}: no width/height and no readable image")
        size = read
    w, h = size
    if doc.get("fx") is not None:
        fx = check_number(doc["fx"], "fx", uri)
        fy = check_number(doc["fy"], "fy", uri) if doc.get("fy") is not None else fx
    elif doc.get("fov") is not None or doc.get("fov_deg") is not None:
        fov = (
            check_number(doc["fov"], "fov", uri)
            if doc.get("fov") is not None
            else math.radians(check_number(doc["fov_deg"], "fov_deg", uri))
        )
        fx = fy = check_focal_from_angle(fov, w, "fov", uri)
    else:
        raise SceneProblem(f"BadSceneFile: {uri}: no intrinsics (fx or fov / fov_deg)")
    cx = check_number(doc["cx"], "cx", uri) if doc.get("cx") is not None else w / 2.0
    cy = check_number(doc["cy"], "cy", uri) if doc.get("cy") is not None else h / 2.0
    error = None if image else f"MissingFile: {printable(store.uri(image_path))} does not exist"
    return SceneFrame(
        uri=printable(store.uri(image_path)),
        c2w=c2w,
        K=pinhole(fx, fy, cx, cy, uri),
        size=size,
        error=error,
    )


def read_objaverse(store: Store, folder: str, files: Sequence[str]) -> Scene:
    """The views of one object folder, in view-number order."""
    stems = sorted((m.group(1) for f in files if (m := _VIEW_JSON.match(f))), key=int)
    scene = Scene(
        name=printable(store.relative(folder)),
        source=printable(store.uri(folder)),
        source_id=store.source_id(folder),
    )
    try:
        names = set(files)
        scene.frames = [_objaverse_view(store, folder, names, stem) for stem in stems]
    except SceneProblem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


# --------------------------------------------------------------------------- Zero123 renders

_VIEW_NPY = re.compile(r"^(\d+)\.npy$", re.ASCII)
_VIEW_IMAGE = re.compile(r"^(\d+)(\.png|\.jpg|\.jpeg|\.webp)$", re.ASCII)
_NPY_SHAPES = ((3, 4), (4, 4))


def _stem_order(stem: str) -> tuple[int, str]:
    return int(stem), stem


def _npy_matrix(data: bytes, uri: str) -> np.ndarray:
    """The float64 3x4 / 4x4 of a ``.npy`` file's bytes. The header is checked before any
    data is read: numpy would allocate whatever shape a hostile header claims, and would
    unpickle an object array."""
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SceneProblem(f"BadSceneFile: {uri}: not a .npy array ({reason})") from None
    if dtype.hasobject:
        raise SceneProblem(f"BadSceneFile: {uri}: an object array (pickled data is not read)")
    if dtype.kind not in "fiu":
        raise SceneProblem(f"BadSceneFile: {uri}: dtype {dtype} is not a real number type")
    if tuple(shape) not in _NPY_SHAPES:
        raise SceneProblem(
            f"BadSceneFile: {uri}: expected a 3x4 or 4x4 world-to-camera, got shape {tuple(shape)}"
        )
    count = int(np.prod(shape))
    raw = data[fh.tell() :]
    if len(raw) < count * dtype.itemsize:
        raise SceneProblem(f"BadSceneFile: {uri}: truncated ({len(raw)} data bytes)")
    values = np.frombuffer(raw, dtype=dtype, count=count)
    return values.reshape(shape, order="F" if fortran else "C").astype(np.float64)


def _zero123_camera(store: Store, path: str) -> np.ndarray:
    """The OpenCV camera-to-world of one ``NNN.npy`` Blender world-to-camera [R | t]."""
    uri = printable(store.uri(path))
    w2c = camera_checked(
        json_pose, _npy_matrix(read_file(store, path, MAX_POSE_FILE_BYTES), uri), uri
    )
    rot, t = w2c[:3, :3], w2c[:3, 3]
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot.T, -rot.T @ t  # what Zero123's loader computes
    return c2w @ _FLIP_YZ  # Blender camera axes are OpenGL's


def _zero123_frames(
    store: Store, folder: str, files: Sequence[str], focal_mm: float, sensor_mm: float
) -> list[SceneFrame]:
    where = printable(store.uri(folder))
    poses = sorted((m.group(1) for f in files if (m := _VIEW_NPY.match(f))), key=_stem_order)
    images: dict[str, str] = {}
    for ext in VIEW_IMAGE_EXTENSIONS:  # NNN.png before NNN.jpg ...
        for f in files:
            if (m := _VIEW_IMAGE.match(f)) and m.group(2) == ext:
                images.setdefault(m.group(1), f)
    orphans = sorted(set(images) - set(poses), key=_stem_order)
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise SceneProblem(
            f"BadSceneFile: {where}: {printable(images[orphans[0]])} has no "
            f"{printable(orphans[0])}.npy camera{more}"
        )
    first = next((images[s] for s in poses if s in images), None)
    if first is None:
        raise SceneProblem(f"BadSceneFile: {where}: NNN.npy cameras but no NNN.png image")
    size = image_size(store.uri(posixpath.join(folder, first)))
    if size is None:
        raise SceneProblem(
            f"BadSceneFile: {where}: the size of {printable(first)} cannot be read from its image"
        )
    w, h = size
    fx = focal_mm / sensor_mm * max(w, h)  # Blender's AUTO fit: the sensor spans the larger side
    K = pinhole(fx, fx, w / 2.0, h / 2.0, where)
    out = []
    for stem in poses:
        image = images.get(stem, f"{stem}.png")
        path = posixpath.join(folder, image)
        out.append(
            SceneFrame(
                uri=printable(store.uri(path)),
                c2w=_zero123_camera(store, posixpath.join(folder, f"{stem}.npy")),
                K=K.copy(),
                size=size,
                error=view_error(store, path, image, folder),
            )
        )
    return out


def read_zero123(
    store: Store,
    folder: str,
    files: Sequence[str],
    focal_mm: float = ZERO123_FOCAL_MM,
    sensor_mm: float = ZERO123_SENSOR_MM,
) -> Scene:
    """The views of one Zero123 / objaverse-rendering folder, in view-number order."""
    scene = Scene(
        name=printable(store.relative(folder)),
        source=printable(store.uri(folder)),
        source_id=store.source_id(folder),
    )
    try:
        scene.frames = _zero123_frames(store, folder, files, focal_mm, sensor_mm)
    except SceneProblem as exc:
        scene.frames, scene.error = [], str(exc)
    return scene


def objaverse_scenes(
    path: str, focal_mm: float = ZERO123_FOCAL_MM, sensor_mm: float = ZERO123_SENSOR_MM
) -> list[Scene]:
    """Every object folder under ``path``: one holding ``NNN.json`` view files, else one
    holding ``NNN.npy`` Zero123 cameras (``focal_mm`` / ``sensor_mm``: their lens)."""
    store = open_store(path)
    found = store.walk(
        lambda folder, files: any(_VIEW_JSON.match(f) or _VIEW_NPY.match(f) for f in files)
    )
    return [
        read_objaverse(store, folder, files)
        if any(_VIEW_JSON.match(f) for f in files)
        else read_zero123(store, folder, files, focal_mm, sensor_mm)
        for folder, files in found
    ]


# What each format's reader looks for under a source path: the error of a source without scenes.
LOOKED_FOR = {
    "nerfstudio": "transforms.json in it or in any folder below (nerfstudio / DL3DV)",
    "co3d": (
        "<category>/frame_annotations.jgz (or frame_annotations.jgz in it) holding at least "
        "one sequence (CO3D v2)"
    ),
    "objaverse": (
        "object folders of NNN.json + NNN.png views, or of NNN.png + NNN.npy Blender "
        "world-to-camera renders (Zero123 / objaverse-rendering)"
    ),
}
