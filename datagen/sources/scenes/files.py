"""What every scene format reader shares: the scene types, safe reading of untrusted files,
and the checks of the values they hold.

A reader builds :class:`Scene` / :class:`SceneFrame` (OpenCV camera-to-world matrices and
pixel intrinsics) from files on a :class:`Store` (local or fsspec). Every file is untrusted:
read as regular files only, size capped, under a timeout (:func:`datagen.io.read_bytes`);
paths a scene file names are joined with :func:`safe_join` so they cannot leave the dataset.
A file or value that cannot be used raises :class:`SceneProblem` (``"Class: message"``),
which the readers turn into the scene's error row.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from common.pil_open import pil_open
from datagen.cameras import (
    CameraValueError,
    focal_from_angle,
    json_number,
    json_pose,
    json_side,
)
from datagen.io import BadInput, open_regular, read_bytes, run_with_timeout
from datagen.sources.base import SourceError

HEADER_BYTES = 1 << 20  # read to learn an image's size from its header
READ_TIMEOUT_S = 120.0


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


class SceneProblem(Exception):
    """Why a scene cannot be used, ``"Class: message"`` (BadSceneFile, BadCamera)."""


def printable(text: str) -> str:
    """A path as valid UTF-8 text (Arrow strings), undecodable bytes escaped."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def natural_key(text: str) -> list[Any]:
    """Sort key: ``r_2`` before ``r_10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text)]


class Store:
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
        return sorted(found, key=lambda f: natural_key(f[0]))


def read_file(store: Store, path: str, max_bytes: int) -> bytes:
    uri = store.uri(path)
    try:
        return read_bytes(uri, max_bytes=max_bytes, timeout_s=READ_TIMEOUT_S)
    except BadInput as exc:
        raise SceneProblem(
            f"BadSceneFile: {printable(uri)}: {exc.error}: {printable(exc.message)}"
        ) from None


def parse_json(data: bytes, uri: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SceneProblem(f"BadSceneFile: {printable(uri)}: not valid JSON ({reason})") from None


def image_size(uri: str) -> tuple[int, int] | None:
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


def open_store(path: str) -> Store:
    store = Store(path)
    if not store.fs.exists(store.base):
        raise SourceError(f"scene path {path} does not exist")
    return store


# --------------------------------------------------------------------------- numbers


def camera_checked(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)``, one of :mod:`datagen.cameras`' json value readers, its complaint as
    this scene's problem: ``BadCamera`` for a value that describes no camera, else
    ``BadSceneFile``."""
    try:
        return read(*args)
    except CameraValueError as exc:
        raise SceneProblem(f"BadCamera: {exc}") from None
    except ValueError as exc:
        raise SceneProblem(f"BadSceneFile: {exc}") from None


def check_number(value: Any, what: str, where: str) -> float:
    return camera_checked(json_number, value, what, where)


def check_pixels(value: Any, what: str, where: str) -> int:
    return camera_checked(json_side, value, what, where)


def check_text(value: Any, what: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_utf8(value):
        raise SceneProblem(f"BadSceneFile: {where}: {what} is not a string")
    return value


def check_matrix(value: Any, what: str, where: str) -> np.ndarray:
    """A rigid 4x4 from a json 4x4 or 3x4 list of lists."""
    return camera_checked(json_pose, value, f"{where}: {what}")


def pinhole(fx: float, fy: float, cx: float, cy: float, where: str) -> np.ndarray:
    if not (fx > 0 and fy > 0):
        raise SceneProblem(f"BadCamera: {where}: focal lengths ({fx}, {fy}) must be positive")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def check_focal_from_angle(angle: float, pixels: int, what: str, where: str) -> float:
    return camera_checked(focal_from_angle, angle, pixels, what, where)


# --------------------------------------------------------------------------- paths


def safe_join(root: str, relative: str) -> str | None:
    """``root/relative`` normalised, or None when ``relative`` is absolute, a URL or leaves
    ``root``: a scene file must not point the pipeline at other files of the machine."""
    if not relative or relative.startswith("/") or "://" in relative or "\\" in relative:
        return None
    joined = posixpath.normpath(posixpath.join(root, relative))
    return joined if joined.startswith(root.rstrip("/") + "/") else None


def view_error(store: Store, path: str | None, shown: str, root: str) -> str | None:
    """Why a frame's image cannot be used: a path outside ``root``, a name that is not
    UTF-8, a missing file; None when it is listed."""
    if path is None:
        return f"BadPath: {printable(shown)} points outside {printable(store.uri(root))}"
    if not is_utf8(path):
        return f"BadFileName: {printable(store.uri(path))} is not a valid UTF-8 path"
    if not store.exists(path):
        return f"MissingFile: {printable(store.uri(path))} does not exist"
    return None
