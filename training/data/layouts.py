"""How one sample becomes training views and a prompt, per sample kind.

A subset's sample kind (``datagen.schema.Subset.kind``: the layout its tasks share) picks
the builder; nothing here looks at subset names:

- ``single``: the target image alone (``text2image``);
- ``pair``: the target and one condition field, a map (either direction) or a degraded copy;
- ``faceid``: img0 the target, the other photos of the person its references;
- ``multiview``: the first views of a scene, each followed by its ray view.

A builder returns None when the sample cannot join the batch (too few views, no allowed
task, another view count than the batch's first sample). A data problem of the sample (a
missing field, bytes that do not decode, a metadata value of the wrong type) raises a
``ValueError`` (``SchemaError``, ``DecodeError``), ``OSError`` or ``cv2.error``: the stream
skips the sample. Anything else is a bug and propagates.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from datagen.schema import SUBSETS, SchemaError
from training.data import tasks as T
from training.data.buckets import BucketTable
from training.data.config import DataConfig
from training.data.views import bucket_rays, image_size, load_view


@dataclass
class Built:
    """One training sample: its image views at the bucket size, the task, the prompt, which
    views are conditions, and for multiview its ray views."""

    key: str
    task: str
    views: list[np.ndarray]
    prompt: str
    cond_mask: list[bool]
    bucket: tuple[int, int]
    rays: np.ndarray | None = None  # [V, C, h, w] float32


class SampleFiles(dict):
    """A sample's files, ``{field: bytes}``. A field the sample lacks is a ``SchemaError`` (the
    sample is skipped), never a ``KeyError``, which stays a bug of the code that raised it."""

    def __missing__(self, name: str) -> bytes:
        raise SchemaError(f"missing field {name!r}")


@dataclass(frozen=True)
class BatchPlan:
    """What a batch fixes before its first sample: the buckets, the bucket draw and, for
    faceid and multiview with ``data.<kind>_min_views`` set, the most image views it has."""

    buckets: BucketTable
    bucket_u: float  # uniform in [0, 1)
    view_cap: int | None = None  # None: data.<kind>_max_views

    def bucket(self, subset: str, num_views: int, frame: tuple[int, int]) -> tuple[int, int]:
        """The batch's bucket, set by its first sample's view count and frame (W, H)."""
        return self.buckets.pick(subset, num_views, frame, self.bucket_u)

    def num_views(self, cfg: DataConfig, subset: str, have: int) -> int | None:
        """The view count a first sample with ``have`` views gives the batch (None: it has
        fewer than ``data.<kind>_min_views`` and sits this batch out)."""
        fewest, most = cfg.view_limits(subset)
        if fewest is not None and have < fewest:
            return None
        return min(have, self.view_cap or most)


@dataclass(frozen=True)
class Sample:
    """A read sample, its draws and its batch's plan."""

    subset: str
    key: str
    files: SampleFiles
    meta: Mapping[str, Any]
    draws: np.ndarray  # uniform in [0, 1): task, direction, caption dropout, source caption
    batch: BatchPlan

    def drop_caption(self, cfg: DataConfig) -> bool:
        return bool(self.draws[2] < cfg.caption_dropout)


# (cfg, allowed task names or None, the sample, the batch's bucket and image views per
# sample, None until its first sample set them) -> the sample's views, or None.
Builder = Callable[
    [DataConfig, set[str] | None, Sample, tuple[int, int] | None, int | None], Built | None
]


@dataclass(frozen=True)
class Layout:
    """A sample kind's builder and how many image views each sample of it has (None: as many
    as the batch's first sample)."""

    kind: str
    num_views: int | None
    build: Builder


def load_npy(data: bytes, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float array stored in a sample (no pickle), checked: shape (-1 = any), finite."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SchemaError(f"{name}: not a readable .npy ({exc})") from None
    ok = arr.ndim == len(shape) and all(w in (-1, n) for w, n in zip(shape, arr.shape, strict=True))
    if not ok or arr.dtype.kind != "f":
        raise SchemaError(f"{name}: expected a float array of shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise SchemaError(f"{name}: holds NaN or infinite values")
    return arr.astype(np.float64)


def view_fields(files: Mapping[str, bytes]) -> list[str]:
    """The ``img{i}.jpg`` fields of a multi-view sample."""
    return [n for n in files if n.startswith("img") and n.endswith(".jpg")]


def meta_frame(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(W, H) the metadata gives, when it is two positive integers."""
    width, height = meta.get("width"), meta.get("height")
    ok = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (width, height))
    return (width, height) if ok else None


def build_fixed(
    cfg: DataConfig,
    allowed: set[str] | None,
    sample: Sample,
    bucket: tuple[int, int] | None,
    num_views: int | None,
) -> Built | None:
    """``single`` and ``pair``: one of the sample's tasks (map tasks in either direction), its
    fields cropped alike from the source frame."""
    files, meta = sample.files, sample.meta
    pairs = T.candidate_tasks(sample.subset, files.keys(), meta, allowed)
    task = T.choose_task(pairs, float(sample.draws[0]), float(sample.draws[1]), cfg.reverse_prob)
    if task is None or task.num_views != num_views:
        return None
    caption = str(meta.get("caption") or "")
    if "txt" in files:
        caption = files["txt"].decode("utf-8")
    source = meta.get("source_caption")
    if isinstance(source, str) and source.strip() and sample.draws[3] < cfg.source_caption_prob:
        caption = source
    # All views of a sample share the source frame.
    frame = meta_frame(meta) or image_size(files["jpg"])
    if bucket is None:
        bucket = sample.batch.bucket(sample.subset, task.num_views, frame)
    views = [load_view(files[f], f, bucket, frame) for f in task.views]
    prompt = T.build_prompt(task, caption, meta, drop_caption=sample.drop_caption(cfg))
    return Built(sample.key, task.name, views, prompt, task.cond_mask, bucket)


def build_faceid(
    cfg: DataConfig,
    allowed: set[str] | None,
    sample: Sample,
    bucket: tuple[int, int] | None,
    num_views: int | None,
) -> Built | None:
    """``faceid``: the first ``num_views`` photos (img0 the target), each cropped on its own
    (separate photos share no frame), one caption per image."""
    files, meta = sample.files, sample.meta
    have = len(view_fields(files))
    if num_views is None:
        num_views = sample.batch.num_views(cfg, sample.subset, have)
    if num_views is None or have < num_views or (allowed is not None and "faceid" not in allowed):
        return None
    task = T.faceid_task(num_views)
    captions = meta.get("captions") or []
    caption: str | list[str] = (
        [str(c) for c in captions] if isinstance(captions, list) else str(captions)
    )
    if bucket is None:
        frame = image_size(files[task.views[0]])
        bucket = sample.batch.bucket(sample.subset, num_views, frame)
    views = [load_view(files[f], f, bucket) for f in task.views]
    prompt = T.build_prompt(task, caption, meta, drop_caption=sample.drop_caption(cfg))
    return Built(sample.key, task.name, views, prompt, task.cond_mask, bucket)


def build_multiview(
    cfg: DataConfig,
    allowed: set[str] | None,
    sample: Sample,
    bucket: tuple[int, int] | None,
    num_views: int | None,
) -> Built | None:
    """``multiview``: the first ``num_views`` views of a scene (view 0 keeps the identity
    camera), each followed by its ray view at the latent grid of the bucket; ``camera_pose``
    with probability ``camera_pose_prob``, else novel views."""
    files, meta, draws = sample.files, sample.meta, sample.draws
    have = len(view_fields(files))
    if num_views is None:
        num_views = sample.batch.num_views(cfg, sample.subset, have)
    names = [n for n in T.MULTIVIEW_TASKS if allowed is None or n in allowed]
    if num_views is None or have < num_views or not names:
        return None
    pose = "camera_pose" in names and (draws[0] < cfg.camera_pose_prob or len(names) == 1)
    layout = T.multiview_layout("camera_pose" if pose else "multiview", num_views, draws[1])
    c2w = load_npy(files["cameras.npy"], "cameras.npy", (have, 4, 4))[:num_views]
    K = load_npy(files["intrinsics.npy"], "intrinsics.npy", (have, 3, 3))[:num_views]
    frame = meta_frame(meta) or image_size(files["img0.jpg"])
    if bucket is None:
        bucket = sample.batch.bucket(sample.subset, num_views, frame)
    fields = [f"img{i}.jpg" for i in range(num_views)]
    views = [load_view(files[f], f, bucket, frame) for f in fields]
    rays = bucket_rays(c2w, K, frame, bucket, cfg.latent_stride, cfg.latent_channels)
    caption = "" if sample.drop_caption(cfg) else T.plain_text(str(meta.get("caption") or ""))
    prompt = f"[[multiview]] {caption}".strip()
    return Built(sample.key, layout.name, views, prompt, layout.cond_mask, bucket, rays)


# One builder per sample kind of datagen.schema.SAMPLE_KINDS.
LAYOUTS: dict[str, Layout] = {
    "single": Layout("single", 1, build_fixed),
    "pair": Layout("pair", 2, build_fixed),
    "faceid": Layout("faceid", None, build_faceid),
    "multiview": Layout("multiview", None, build_multiview),
}


def layout_of(subset: str) -> Layout:
    """The layout of a subset's samples, by its sample kind."""
    return LAYOUTS[SUBSETS[subset].kind]
