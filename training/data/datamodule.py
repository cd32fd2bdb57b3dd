"""Training data: One-Gen shards -> mixed, bucketed, multi-view batches.

Batch contract (what the LightningModule gets, every batch one shape)::

    {"pixels":    FloatTensor [B, V, 3, H, W] in [-1, 1]
     "rays":      FloatTensor [B, V, C, h, w]  multiview batches only: each image view's
                                       Plücker rays at the latent grid (datagen.cameras); the
                                       model's views alternate image and ray (2V views)
     "cond_mask": BoolTensor  [B, V]   True = condition view (held clean, no loss); [B, 2V]
                                       over the alternating views of a multiview batch
     "prompts":   list[str] (B)        task token [+ colour tags / [[imgX]] markers] + caption
     "tasks":     list[str] (B)        e.g. "text2image", "canny2image", "image2canny"
     "subsets":   list[str] (B)
     "keys":      list[str] (B)
     "skipped":   int                  samples dropped while building this batch
     "skip_reasons": dict[str, int]    the same by reason (SKIP_REASONS): unreadable (read or
                                       tar error), truncated (shard cut short), schema
                                       (fields / metadata fail the schema), decode (image bytes)
     "skip_last": str                  "reason: message" of the batch's last skip, or ""
     "batch_index": int}               the rank's batch number k

Determinism and resume: batch ``k`` of rank ``r`` is a pure function of
``(seed, r, k)`` and the data (see :mod:`training.data.index`). Worker ``w`` of
``W`` builds batches ``start + w, start + w + W, ...`` and torch's DataLoader
yields workers round-robin, so the loader's i-th batch is batch ``start + i``
whatever ``W`` is. ``start = global_step * batches_per_step``: a loader built
after a resume yields exactly what the uninterrupted run yields from there.
Every rank streams forever (the trainer stops at ``max_steps``), so ranks
always have the same number of batches.

Per batch: one subset (by the mixing weights), ``reads_per_batch`` windows of
consecutive samples each read with one byte-range request, a shuffle, then
per sample a task (uniform over the sample's tasks; map tasks reversed with
``reverse_prob``) and caption dropout. The bucket is the one nearest the
aspect ratio of the batch's first sample (or drawn, ``bucket_mode=random``);
every view of a sample gets the same cover-and-center-crop geometry. Samples
that cannot be read, fail ``validate_sample`` or do not decode are skipped,
counted in ``skipped`` / ``skip_reasons``, and replaced by further reads, so batches are
always full; a batch that skips more than ``max_skipped_per_batch`` raises. The trainer sums
the counts over ranks, logs them and stops past ``max_skip_rate`` (``training.module``).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datagen.cameras import cameras_to_plucker, crop_intrinsics, resize_intrinsics
from datagen.schema import SUBSETS, SchemaError, validate_sample
from datagen.shards.layout import MANIFEST, filesystem
from datagen.shards.reader import ShardReader, read_range
from datagen.shards.tar import sample_files
from training.data import tasks as T
from training.config import DataConfig
from training.data.index import SubsetIndex, batch_rng, build_subset_index, choose_subset, mix_weights, plan_window, worker_batches

IMPLEMENTED_SUBSETS = ("t2i", "i2i", "semantic", "depth", "pose", "faceid", "multiview")
# Why a sample was skipped: stable names, used in metric keys (data/skipped.<subset>.<reason>).
SKIP_REASONS = ("unreadable", "truncated", "schema", "decode")


def resolve_paths(paths: Any) -> dict[str, list[str]]:
    """``{subset: [roots]}`` from the config's ``paths``."""
    if isinstance(paths, str):
        paths = [paths]
    if isinstance(paths, Mapping):
        out = {}
        for subset, roots in paths.items():
            out[str(subset)] = [roots] if isinstance(roots, str) else [str(r) for r in roots]
        return out
    out: dict[str, list[str]] = {}
    for root in paths:
        found = ShardReader(str(root)).subsets(with_manifest=True)
        if not found:
            raise FileNotFoundError(f"{root}: no subset folder with a {MANIFEST}")
        for s in found:
            out.setdefault(s, []).append(str(root))
    return out


# --- decoding and geometry --------------------------------------------------------------------

_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DecodeError(ValueError):
    """Bytes that do not decode to an image."""


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment, without decoding."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only (JPEG and PNG parsed directly,
    anything else through PIL)."""
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        if size and size[0] > 0 and size[1] > 0:
            return size
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def nearest_bucket(buckets: Sequence[Sequence[int]], width: int, height: int) -> tuple[int, int]:
    target = math.log(max(width, 1) / max(height, 1))
    best = min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - target), i),
    )
    return int(buckets[best][0]), int(buckets[best][1])


@dataclass(frozen=True)
class CropPlan:
    """Cover-and-center-crop of a frame (W x H source pixels) into a bucket.

    ``reduce``: a power of two the source may be shrunk by exactly first (JPEG
    DCT scaling, or an integer area resize) while still covering the bucket.
    The crop box is in frame pixels and aligned to ``reduce``, so every view
    of the same frame, at any of these resolutions, gets the same geometry.
    """

    frame: tuple[int, int]  # (W, H)
    size: tuple[int, int]  # bucket (H, W)
    reduce: int
    box: tuple[int, int, int, int]  # x0, y0, width, height in frame pixels, multiples of reduce


def plan_crop(frame: tuple[int, int], size: tuple[int, int], max_reduce: int = 8) -> CropPlan:
    width, height = frame
    th, tw = size
    if width < 1 or height < 1:
        raise DecodeError(f"empty frame {frame}")
    cover = max(th / height, tw / width)
    reduce = 1
    while reduce * 2 <= max_reduce and reduce * 2 * cover <= 1.0:
        reduce *= 2
    # reduce <= 1 / cover <= width / tw, so width // reduce >= 1: the box is never empty.
    cw = min(max(1, round(tw / cover / reduce)), width // reduce) * reduce
    ch = min(max(1, round(th / cover / reduce)), height // reduce) * reduce
    x0 = (width - cw) // 2 // reduce * reduce
    y0 = (height - ch) // 2 // reduce * reduce
    return CropPlan(frame, size, reduce, (x0, y0, cw, ch))


def _decode_raw(data: bytes, field_name: str, reduce: int) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    if field_name.rsplit(".", 1)[-1] in ("jpg", "jpeg"):
        img = cv2.imdecode(buf, _REDUCED[reduce])
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DecodeError(f"{field_name}: not a decodable image")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] not in (3, 4):
        raise DecodeError(f"{field_name}: unsupported image shape {img.shape}")
    if img.dtype not in (np.uint8, np.uint16):
        raise DecodeError(f"{field_name}: unsupported pixel type {img.dtype}")
    return img


def load_view(
    data: bytes, field_name: str, size: tuple[int, int], frame: tuple[int, int] | None = None
) -> np.ndarray:
    """One view at the bucket size ``(H, W)``: ``[H, W]`` (gray) or
    ``[H, W, 3]`` RGB, uint8 or uint16 (16-bit PNGs keep their precision).

    Resize to cover and center-crop, all in one geometry per frame (see
    :class:`CropPlan`): JPEGs are decoded at a reduced DCT scale when the
    bucket allows, other images shrunk by the same integer factor with an area
    filter, then one bilinear resize to the bucket (nearest for semantic maps,
    which must keep exact palette colours). ``frame`` is the sample's source
    size (W, H); None: this image's own size.
    """
    if frame is None:
        frame = image_size(data)
    plan = plan_crop(frame, size)
    r = plan.reduce if field_name.rsplit(".", 1)[-1] in ("jpg", "jpeg") else 1
    img = _decode_raw(data, field_name, r)
    if img.shape[:2] != (-(-frame[1] // r), -(-frame[0] // r)):
        # Not the size the frame says (metadata off, EXIF rotation, a map at another
        # resolution): decode in full and plan from the image itself.
        if r > 1:
            img, r = _decode_raw(data, field_name, 1), 1
        plan = plan_crop((img.shape[1], img.shape[0]), size)
    x0, y0, cw, ch = plan.box
    nearest = field_name == "semantic.png"
    if r > 1:  # already reduced at decode
        crop = img[y0 // r : (y0 + ch) // r, x0 // r : (x0 + cw) // r]
    else:
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        if plan.reduce > 1:  # exact integer shrink: fast area filter
            crop = cv2.resize(
                crop,
                (cw // plan.reduce, ch // plan.reduce),
                interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA,
            )
    th, tw = size
    if crop.shape[:2] != (th, tw):
        crop = cv2.resize(
            crop, (tw, th), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        )
    if crop.ndim == 3:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGRA2RGB if crop.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return crop


_LUT8 = ((np.arange(256, dtype=np.float64) - 127.5) / 127.5).astype(np.float32)  # exact -1 and 1


def _write_unit(view: np.ndarray, out: np.ndarray) -> None:
    """Write a :func:`load_view` output into ``out`` (float32 ``[3, H, W]``,
    contiguous planes) as [-1, 1], one pass per plane: a lookup table for
    8-bit images, arithmetic for 16-bit ones."""
    planes = [view] * 3 if view.ndim == 2 else cv2.split(view)
    for c in range(3):
        if view.dtype == np.uint8:
            cv2.LUT(planes[c], _LUT8, dst=out[c])
        else:
            half = np.float32(32767.5)
            np.subtract(planes[c], half, out=out[c], dtype=np.float32)
            np.divide(out[c], half, out=out[c])


def to_unit(view: np.ndarray) -> np.ndarray:
    """float32 ``[3, H, W]`` in [-1, 1] (exact at both ends) from :func:`load_view`'s output."""
    out = np.empty((3, *view.shape[:2]), np.float32)
    _write_unit(view, out)
    return out


def decode_view(
    data: bytes, field_name: str, size: tuple[int, int], frame: tuple[int, int] | None = None
) -> np.ndarray:
    """:func:`load_view` as float32 ``[3, H, W]`` in [-1, 1]."""
    return to_unit(load_view(data, field_name, size, frame))


def assemble_pixels(
    views: list[list[np.ndarray]], size: tuple[int, int], shared: bool = False
) -> torch.Tensor:
    """``[B, V, 3, H, W]`` float32 in [-1, 1] from per-sample views of
    :func:`load_view`, written in place. With ``shared`` the tensor lives in
    shared memory from the start: what a DataLoader worker sends must be
    there anyway, so the hand-over to the main process copies nothing."""
    bsz, nv = len(views), len(views[0])
    h, w = size
    if shared:
        storage = torch.UntypedStorage._new_shared(bsz * nv * 3 * h * w * 4)
        pixels = torch.empty(0, dtype=torch.float32).set_(storage, 0, (bsz, nv, 3, h, w))
    else:
        pixels = torch.empty((bsz, nv, 3, h, w), dtype=torch.float32)
    out = pixels.numpy()
    for b, sample in enumerate(views):
        for v, arr in enumerate(sample):
            _write_unit(arr, out[b, v])
    return pixels


# --- the stream --------------------------------------------------------------------------------


@dataclass
class _Built:
    """One training sample: its image views at the bucket size, the task, the prompt, which
    views are conditions, and for multiview its ray views."""

    key: str
    task: str
    views: list[np.ndarray]
    prompt: str
    cond_mask: list[bool]
    bucket: tuple[int, int]
    rays: np.ndarray | None = None  # [V, C, h, w] float32


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


def bucket_rays(
    c2w: np.ndarray,
    K: np.ndarray,
    frame: tuple[int, int],
    bucket: tuple[int, int],
    stride: int,
    channels: int,
) -> np.ndarray:
    """Plücker ray views for cameras whose intrinsics describe ``frame`` (W, H) pixels, once
    the frame is cropped and resized into ``bucket`` (H, W) as :func:`load_view` does it: one
    ray per latent cell, in the channel layout the released model reads."""
    bh, bw = bucket
    k = bucket_intrinsics(K, frame, bucket)
    return cameras_to_plucker(c2w, k, bucket, (bh // stride, bw // stride), channels)


def bucket_intrinsics(K: np.ndarray, frame: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    """Intrinsics of ``frame`` (W, H) pixels -> of the crop :func:`load_view` makes of it for
    ``bucket`` (H, W)."""
    x0, y0, cw, ch = plan_crop(frame, bucket).box
    return resize_intrinsics(crop_intrinsics(K, x0, y0), bucket[1] / cw, bucket[0] / ch)


@dataclass
class _Candidate:
    index: int  # global sample index in its subset
    files: dict[str, bytes] | None
    error: str | None = None
    reason: str = "unreadable"  # one of SKIP_REASONS when error is set


def skip_reason(exc: BaseException) -> str:
    """The SKIP_REASONS class of an exception raised while building a sample."""
    if isinstance(exc, SchemaError):
        return "schema"
    if isinstance(exc, DecodeError | cv2.error | OSError):  # PIL's errors are OSErrors
        return "decode"
    return "schema"  # a missing field, a mistyped metadata value, bad JSON


def _view_fields(files: Mapping[str, bytes]) -> list[str]:
    """The ``img{i}.jpg`` fields of a multi-view sample."""
    return [n for n in files if n.startswith("img") and n.endswith(".jpg")]


def _meta_frame(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(W, H) the metadata gives, when it is two positive integers."""
    width, height = meta.get("width"), meta.get("height")
    ok = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (width, height))
    return (width, height) if ok else None


class OneGenStream(IterableDataset):
    """Infinite stream of whole batches for one rank (use with ``batch_size=None``)."""

    def __init__(
        self,
        indexes: Mapping[str, SubsetIndex],
        probs: Mapping[str, float],
        cfg: DataConfig,
        rank: int = 0,
        start_batch: int = 0,
    ):
        super().__init__()
        self.indexes = dict(indexes)
        self.names = [s for s in probs if probs[s] > 0]
        self.probs = [float(probs[s]) for s in self.names]
        if not self.names:
            raise ValueError("every subset has mixing weight 0")
        self.cfg = cfg
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.allowed = set(cfg.tasks) if cfg.tasks is not None else None
        self._fs: dict[str, Any] = {}

    # -- the pure per-batch functions --

    def plan_subset(self, k: int) -> str:
        """The subset batch ``k`` comes from (the first draw of its generator)."""
        return choose_subset(batch_rng(self.cfg.seed, self.rank, k), self.names, self.probs)

    def make_batch(self, k: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = batch_rng(cfg.seed, self.rank, k)
        subset = choose_subset(rng, self.names, self.probs)
        index = self.indexes[subset]
        bsz = cfg.batch_size
        bucket_u = rng.random()
        reads = min(cfg.reads_per_batch, bsz)
        window = math.ceil(bsz / reads * (1.0 + cfg.overread))
        bucket: tuple[int, int] | None = None
        if cfg.bucket_mode == "random":
            w = np.asarray(cfg.bucket_weights or [1.0] * len(cfg.buckets), np.float64)
            i = min(
                int(np.searchsorted(np.cumsum(w) / w.sum(), bucket_u, side="right")), len(w) - 1
            )
            bucket = (int(cfg.buckets[i][0]), int(cfg.buckets[i][1]))

        samples: list[_Built] = []
        skipped, ineligible, last_error = 0, 0, None
        reasons: dict[str, int] = {}
        # image views per sample: set by the batch's first sample for faceid and multiview
        num_views: int | None = {"t2i": 1, "faceid": None, "multiview": None}.get(subset, 2)
        rounds = 0
        seen: set[int] = set()
        while len(samples) < bsz:
            if rounds > 0:
                reads = 1
                window = math.ceil((bsz - len(samples)) * (1.0 + cfg.overread))
            rounds += 1
            if len(seen) >= index.num_samples:  # a subset smaller than a batch: allow repeats
                seen.clear()
            cands: list[_Candidate] = []
            for _ in range(reads):
                for cand in self._read_window(index, *plan_window(rng, index, window)):
                    if cand.index not in seen:  # overlapping windows: a sample once per batch
                        seen.add(cand.index)
                        cands.append(cand)
            order = rng.permutation(len(cands))
            # task, direction, caption dropout, source caption
            draws = rng.random((len(cands), 4))
            for j in order:
                if len(samples) == bsz:
                    break
                cand = cands[j]
                if cand.error is not None:
                    skipped, last_error = skipped + 1, f"{cand.reason}: {cand.error}"
                    reasons[cand.reason] = reasons.get(cand.reason, 0) + 1
                    continue
                try:
                    built = self._build_sample(
                        subset, index.key(cand.index), cand.files, draws[j], bucket, num_views
                    )
                except (
                    SchemaError,
                    ValueError,
                    KeyError,
                    TypeError,
                    AttributeError,
                    IndexError,
                    cv2.error,
                    OSError,
                ) as exc:
                    reason = skip_reason(exc)
                    skipped = skipped + 1
                    last_error = f"{reason}: {index.key(cand.index)}: {type(exc).__name__}: {exc}"
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                if built is None:
                    ineligible += 1
                    continue
                bucket, num_views = built.bucket, len(built.views)
                samples.append(built)
            if skipped > cfg.max_skipped_per_batch or rounds > 16 + 4 * bsz:
                raise RuntimeError(
                    f"batch {k} of subset {subset!r}: {skipped} unreadable and {ineligible} unusable samples "
                    f"after {rounds} reads; last error: {last_error}. The shards look broken."
                )

        assert bucket is not None and num_views is not None
        shared = get_worker_info() is not None
        batch: dict[str, Any] = {
            "pixels": assemble_pixels([s.views for s in samples], bucket, shared=shared)
        }
        if samples[0].rays is not None:
            batch["rays"] = torch.from_numpy(np.stack([s.rays for s in samples]))
        return {
            **batch,
            "cond_mask": torch.tensor([s.cond_mask for s in samples], dtype=torch.bool),
            "prompts": [s.prompt for s in samples],
            "tasks": [s.task for s in samples],
            "subsets": [subset] * bsz,
            "keys": [s.key for s in samples],
            "skipped": int(skipped),
            "skip_reasons": dict(sorted(reasons.items())),
            "skip_last": " ".join(str(last_error or "").split())[:300],
            "batch_index": int(k),
        }

    # -- pieces --

    def _filesystem(self, url: str):
        if url not in self._fs:
            self._fs[url] = filesystem(url)
        return self._fs[url]

    def _read_window(
        self, index: SubsetIndex, shard: int, first: int, stop: int
    ) -> list[_Candidate]:
        url = index.urls[shard]
        start = int(index.offsets[first])
        end = int(index.offsets[stop - 1] + index.lengths[stop - 1])
        try:
            fs, path = self._filesystem(url)
            data = memoryview(read_range(fs, path, start, end))
        except (OSError, ValueError) as exc:
            return [
                _Candidate(i, None, f"{url}: {type(exc).__name__}: {exc}", "unreadable")
                for i in range(first, stop)
            ]
        out = []
        for i in range(first, stop):
            rel, n = int(index.offsets[i]) - start, int(index.lengths[i])
            if rel + n > len(data):
                out.append(
                    _Candidate(
                        i,
                        None,
                        f"{url}: sample {index.key(i)} is cut short (truncated tar)",
                        "truncated",
                    )
                )
                continue
            try:
                out.append(_Candidate(i, sample_files(data[rel : rel + n], index.key(i))))
            except (ValueError, UnicodeDecodeError) as exc:
                out.append(_Candidate(i, None, f"{url}: {exc}", "unreadable"))
        return out

    def _build_sample(
        self,
        subset: str,
        key: str,
        files: dict[str, bytes],
        draws: np.ndarray,
        bucket: tuple[int, int] | None,
        num_views: int | None,
    ) -> _Built | None:
        """Sample ``key`` as the batch's task layout, or None when it cannot join this batch
        (too few views, no allowed task)."""
        cfg = self.cfg
        if cfg.validate:
            meta = validate_sample(subset, {"__key__": key, **files})
        else:
            meta = json.loads(files["json"].decode("utf-8"))
        drop = bool(draws[2] < cfg.caption_dropout)
        if subset == "multiview":
            return self._build_multiview(key, files, meta, draws, bucket, num_views, drop)
        if subset == "faceid":
            have = len(_view_fields(files))
            if num_views is None:
                num_views = min(have, cfg.faceid_max_views)
            if have < num_views or (self.allowed is not None and "faceid" not in self.allowed):
                return None
            task = T.faceid_task(num_views)
            captions = meta.get("captions") or []
            caption: str | list[str] = (
                [str(c) for c in captions] if isinstance(captions, list) else str(captions)
            )
        else:
            pairs = T.candidate_tasks(subset, files.keys(), meta, self.allowed)
            task = T.choose_task(pairs, float(draws[0]), float(draws[1]), cfg.reverse_prob)
            if task is None or task.num_views != num_views:
                return None
            caption = str(meta.get("caption") or "")
            if subset == "t2i" and "txt" in files:
                caption = files["txt"].decode("utf-8")
            source = meta.get("source_caption")
            if isinstance(source, str) and source.strip() and draws[3] < cfg.source_caption_prob:
                caption = source
        # All views of a sample share the source frame, except faceid's separate photos.
        frame: tuple[int, int] | None = None
        if subset != "faceid":
            frame = _meta_frame(meta) or image_size(files["jpg"])
        if bucket is None:
            bucket_frame = frame or image_size(files[task.views[0]])
            bucket = nearest_bucket(cfg.buckets, *bucket_frame)
        views = [load_view(files[f], f, bucket, frame) for f in task.views]
        prompt = T.build_prompt(task, caption, meta, drop_caption=drop)
        return _Built(key, task.name, views, prompt, task.cond_mask, bucket)

    def _build_multiview(
        self,
        key: str,
        files: dict[str, bytes],
        meta: dict,
        draws: np.ndarray,
        bucket: tuple[int, int] | None,
        num_views: int | None,
        drop: bool,
    ) -> _Built | None:
        """The first ``num_views`` views of a scene (view 0 keeps the identity camera), each
        followed by its ray view at the latent grid of the bucket; ``camera_pose`` with
        probability ``camera_pose_prob``, else novel views."""
        cfg = self.cfg
        have = len(_view_fields(files))
        if num_views is None:
            num_views = min(have, cfg.multiview_max_views)
        names = [n for n in T.MULTIVIEW_TASKS if self.allowed is None or n in self.allowed]
        if have < num_views or not names:
            return None
        pose = "camera_pose" in names and (draws[0] < cfg.camera_pose_prob or len(names) == 1)
        layout = T.multiview_layout("camera_pose" if pose else "multiview", num_views, draws[1])
        c2w = load_npy(files["cameras.npy"], "cameras.npy", (have, 4, 4))[:num_views]
        K = load_npy(files["intrinsics.npy"], "intrinsics.npy", (have, 3, 3))[:num_views]
        frame = _meta_frame(meta) or image_size(files["img0.jpg"])
        if bucket is None:
            bucket = nearest_bucket(cfg.buckets, *frame)
        fields = [f"img{i}.jpg" for i in range(num_views)]
        views = [load_view(files[f], f, bucket, frame) for f in fields]
        rays = bucket_rays(c2w, K, frame, bucket, cfg.latent_stride, cfg.latent_channels)
        caption = "" if drop else str(meta.get("caption") or "").strip()
        prompt = f"[[multiview]] {caption}".strip()
        return _Built(key, layout.name, views, prompt, layout.cond_mask, bucket, rays)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in worker_batches(self.start_batch, worker, workers):
            yield self.make_batch(k)


# --- the DataModule ----------------------------------------------------------------------------


class OneGenDataModule(LightningDataModule):
    """Streams One-Gen shards of several subsets as mixed, bucketed batches.

    ``start_step``: the optimizer step to resume at (when attached to a
    trainer whose ``global_step`` is > 0, that wins). The stream starts at
    batch ``start_step * batches_per_step``.
    """

    def __init__(self, config: Any = None, start_step: int = 0, **overrides: Any):
        super().__init__()
        self.cfg = DataConfig.from_any(config, **overrides)
        self.start_step = int(start_step)
        self.indexes: dict[str, SubsetIndex] | None = None
        self.probs: dict[str, float] | None = None

    # -- setup --

    def setup(self, stage: str | None = None) -> None:
        if self.indexes is not None:
            return
        paths = resolve_paths(self.cfg.paths)
        unknown = sorted(set(paths) - set(SUBSETS))
        if unknown:
            raise ValueError(f"unknown subsets {unknown}; the schema knows {sorted(SUBSETS)}")
        probs = mix_weights(list(paths), self.cfg.mix)
        wanted = [s for s, p in probs.items() if p > 0]
        missing = [s for s in wanted if s not in IMPLEMENTED_SUBSETS]
        if missing:
            raise NotImplementedError(f"training on subset(s) {missing} is not implemented")
        if self.cfg.tasks is not None:
            idle = [s for s in wanted if not set(T.subset_task_names(s)) & set(self.cfg.tasks)]
            if idle:
                raise ValueError(
                    f"data.tasks {self.cfg.tasks} leaves subset(s) {idle} nothing to train; "
                    "give them weight 0 in data.mix or allow one of their tasks"
                )
        self.indexes = {s: build_subset_index(paths[s], s) for s in wanted}
        self.probs = {s: probs[s] for s in wanted}

    # -- where the stream starts --

    def _attached_trainer(self):
        try:
            return self.trainer
        except (AttributeError, RuntimeError):
            return None

    def rank(self) -> int:
        if self.cfg.rank is not None:
            return int(self.cfg.rank)
        trainer = self._attached_trainer()
        if trainer is not None:
            return int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return int(torch.distributed.get_rank())
        return 0

    def current_step(self) -> int:
        trainer = self._attached_trainer()
        if trainer is not None and int(trainer.global_step) > 0:
            return int(trainer.global_step)
        return self.start_step

    def batches_per_step(self) -> int:
        trainer = self._attached_trainer()
        if trainer is not None:
            return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        return int(self.cfg.batches_per_step)

    def start_batch(self) -> int:
        return self.current_step() * self.batches_per_step()

    # -- loaders --

    def stream(self, start_batch: int | None = None, rank: int | None = None) -> OneGenStream:
        self.setup()
        assert self.indexes is not None and self.probs is not None
        return OneGenStream(
            self.indexes,
            self.probs,
            self.cfg,
            self.rank() if rank is None else rank,
            self.start_batch() if start_batch is None else start_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def loader(self, start_batch: int | None = None, rank: int | None = None) -> DataLoader:
        cfg = self.cfg
        workers = int(cfg.num_workers)
        return DataLoader(
            self.stream(start_batch, rank),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            persistent_workers=bool(cfg.persistent_workers) and workers > 0,
            pin_memory=bool(cfg.pin_memory),
            multiprocessing_context=cfg.multiprocessing_context if workers > 0 else None,
        )

    # -- checkpoint state --

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.current_step(),
            "seed": int(self.cfg.seed),
            "batches_per_step": self.batches_per_step(),
            "batch_size": int(self.cfg.batch_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = int(state_dict.get("step", 0))
        seed = int(state_dict.get("seed", self.cfg.seed))
        if seed != self.cfg.seed:
            warnings.warn(
                f"data seed {self.cfg.seed} differs from the checkpoint's {seed}: using the "
                "checkpoint's so the resumed stream continues the original one",
                stacklevel=2,
            )
            self.cfg.seed = seed
        if int(state_dict.get("batch_size", self.cfg.batch_size)) != self.cfg.batch_size:
            warnings.warn(
                "data.batch_size differs from the checkpoint's: the resumed stream is not the "
                "continuation of the original one",
                stacklevel=2,
            )
