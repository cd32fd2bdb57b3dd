"""Scene sources: multi-view captures -> group rows (datagen.sources.groups), cameras in OpenCV.

A ``scenes`` source names a folder of scenes in one format (nerfstudio / DL3DV, CO3D v2 or
Objaverse-style renders: per-view json, or Zero123's NNN.png + NNN.npy, read by
:mod:`datagen.sources.scenes.formats` on the safe file helpers of
:mod:`datagen.sources.scenes.files`); a ``procedural_scenes`` source renders nerfstudio scenes first.
A scene that cannot be used becomes ONE row with its ``group_error``; a source folder holding no
scene at all is a :class:`SourceError` naming what was looked for (a wrong ``format`` or path
must not pass as an empty dataset).

Each scene gives ``samples_per_scene`` samples (rows), its views chosen by
:func:`sample_frames`, a pure function of (scene, sample index, seed). Paths may be local or
fsspec URLs.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa

from datagen.params import ParamError
from datagen.sources.base import Source, SourceError
from datagen.sources.groups import group_rng, group_row, group_table
from datagen.sources.scenes.files import Scene, SceneFrame, Store, printable
from datagen.sources.scenes.formats import (
    IMAGE_FOLDERS,
    LOOKED_FOR,
    ZERO123_FOCAL_MM,
    ZERO123_SENSOR_MM,
    co3d_scenes,
    nerfstudio_scenes,
    objaverse_scenes,
    read_nerfstudio,
)
from datagen.sources.scenes.procedural import procedural_scenes

MAX_NAME_CHARS = 150  # of the readable part of a key


@dataclass(frozen=True)
class ScenesParams:
    """A folder of scenes in one format; every scene gives ``samples_per_scene`` samples of
    ``views`` (min, max) views, consecutive views ``stride`` frames apart. ``focal_mm`` /
    ``sensor_mm``: the Blender lens of ``objaverse`` folders in the Zero123 layout (NNN.npy
    cameras carry no intrinsics; Zero123 renders at 35 mm on a 32 mm sensor)."""

    kind: Literal["scenes"]
    path: str
    format: Literal["nerfstudio", "co3d", "objaverse"] = "nerfstudio"
    images: str = "images"  # nerfstudio / DL3DV: images, images_2, images_4 or images_8
    views: tuple[int, int] = (2, 12)
    samples_per_scene: int = 1
    stride: int = 1
    focal_mm: float = ZERO123_FOCAL_MM
    sensor_mm: float = ZERO123_SENSOR_MM

    def __post_init__(self) -> None:
        if not self.path:
            raise ParamError("path: must name a folder of scenes")
        for key in ("focal_mm", "sensor_mm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ParamError(f"{key}: must be a positive number of millimetres, got {value}")
        if self.images not in IMAGE_FOLDERS:
            raise ParamError(
                f"images: must be one of {', '.join(IMAGE_FOLDERS)}, got {self.images!r}"
            )
        check_sampling(self.views, self.samples_per_scene, self.stride)


@dataclass(frozen=True)
class ProceduralScenesParams:
    """Scenes rendered by datagen.sources.scenes.procedural into ``cache_dir`` (tests, the demo),
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


# --------------------------------------------------------------------------- sampling


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


def load_scenes(source: ScenesParams | ProceduralScenesParams, work_dir: str) -> list[Scene]:
    """The scenes of a source (the procedural ones rendered into their cache first)."""
    if isinstance(source, ProceduralScenesParams):
        cache = source.cache_dir or str(Path(work_dir) / "procedural_scenes")
        folders = procedural_scenes(cache, source.n, source.frames, source.size)
        store = Store(cache)
        return [
            read_nerfstudio(store, posixpath.join(store.base, f.name, "transforms.json"))
            for f in folders
        ]
    if source.format == "co3d":
        scenes = co3d_scenes(source.path)
    elif source.format == "objaverse":
        scenes = objaverse_scenes(source.path, source.focal_mm, source.sensor_mm)
    else:
        scenes = nerfstudio_scenes(source.path, source.images)
    if not scenes:
        raise SourceError(
            f"no scene under {printable(source.path)} (format {source.format}): looked for "
            f"{LOOKED_FOR[source.format]}; source.format picks {', '.join(LOOKED_FOR)}"
        )
    return scenes


def scene_table(
    source: ScenesParams | ProceduralScenesParams, work_dir: str, seed: int
) -> pa.Table:
    """A group table (:data:`datagen.sources.groups.GROUP_MANIFEST_SCHEMA`), one row per
    sample of every scene of ``source``."""
    rows = [
        row
        for scene in load_scenes(source, work_dir)
        for row in scene_rows(scene, source.views, source.samples_per_scene, source.stride, seed)
    ]
    return group_table(rows)


class ScenesSource(Source):
    """``source: {kind: scenes, path: ..., format: ...}``: multiview group rows."""

    kind: ClassVar[str] = "scenes"
    Params: ClassVar[type] = ScenesParams
    subset: ClassVar[str | None] = "multiview"

    @classmethod
    def rows(cls, params: ScenesParams, work_dir: str, seed: int) -> pa.Table:
        return scene_table(params, work_dir, seed)


class ProceduralScenesSource(Source):
    """``source: {kind: procedural_scenes}``: scenes rendered into ``cache_dir`` (default
    ``<work_dir>/procedural_scenes``), then read as nerfstudio scenes."""

    kind: ClassVar[str] = "procedural_scenes"
    Params: ClassVar[type] = ProceduralScenesParams
    subset: ClassVar[str | None] = "multiview"

    @classmethod
    def rows(cls, params: ProceduralScenesParams, work_dir: str, seed: int) -> pa.Table:
        return scene_table(params, work_dir, seed)


SCENE_SOURCES: dict[str, type[Source]] = {
    "scenes": ScenesSource,
    "procedural_scenes": ProceduralScenesSource,
}


def scene_manifest(spec: dict, work_dir: str, seed: int = 0) -> pa.Table:
    """A ``scenes`` or ``procedural_scenes`` source spec -> its group table."""
    cls = SCENE_SOURCES.get(spec.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise SourceError(
            f"scene_manifest: kind {spec.get('kind')!r} is not scenes or procedural_scenes"
        )
    return cls.rows(cls.params(spec), work_dir, seed)
