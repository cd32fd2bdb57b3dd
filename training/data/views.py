"""A sample's views at a bucket: header sizes, crop plans, decoded pixels, ray views.

Every view of a frame gets the same cover-and-center-crop geometry (:class:`CropPlan`), at
whatever resolution it is stored; ray views are the Plücker rays of that crop at the latent
grid (``datagen.cameras``), and the model sees image and ray views alternating
(:func:`interleave_rays`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from common.pil_open import pil_open
from datagen.cameras import cameras_to_plucker, crop_intrinsics, resize_intrinsics

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
    with pil_open(io.BytesIO(data)) as im:
        return im.size


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


# --- ray views ------------------------------------------------------------------------------


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


def interleave_rays(latents: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
    """[B, V, C, h, w] image latents and ray views -> [B, 2V, C, h, w], alternating as the
    released multiview pipeline lays them out."""
    rays = rays.to(device=latents.device, dtype=latents.dtype)
    if rays.shape != latents.shape:
        raise ValueError(
            f"ray views {list(rays.shape)} do not match the image latents {list(latents.shape)}"
        )
    return torch.stack([latents, rays], dim=2).flatten(1, 2)
