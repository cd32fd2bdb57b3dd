"""Hand-made shards of every single-view and faceid subset, written through the real shard
writer: small images of several aspect ratios (``SIZES``), every field a subset's tasks read."""

from __future__ import annotations

import json

import cv2
import numpy as np

from datagen import shards
from datagen.schema import make_meta, palette_rgb

SIZES = [(40, 60), (60, 40), (48, 48), (128, 192), (96, 64)]  # (H, W)


def image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)


def jpg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def png(img: np.ndarray) -> bytes:
    if img.ndim == 3:
        img = img[:, :, ::-1]
    return cv2.imencode(".png", img)[1].tobytes()


def meta(key: str, subset: str, tokens: list[str], **extra) -> bytes:
    return json.dumps(make_meta(key, subset, f"/in/{key}.jpg", tokens, **extra)).encode()


def make_sample(subset: str, i: int) -> tuple[str, dict[str, bytes]]:
    key = f"{subset}_{i:05d}"
    h, w = SIZES[i % len(SIZES)]
    img = image(h, w, seed=hash(key) % 2**32)
    cap = f"caption of {key}"
    common = {"caption": cap, "width": w, "height": h}
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if subset == "t2i":
        return key, {
            "jpg": jpg(img),
            "txt": cap.encode(),
            "json": meta(key, "t2i", ["[[text2image]]"], **common),
        }
    if subset == "i2i":
        tokens = ["[[canny2image]]", "[[hed2img]]", "[[deblurring]]", "[[image_inpainting]]"]
        return key, {
            "jpg": jpg(img),
            "canny.png": png(cv2.Canny(gray, 50, 100)),
            "hed.png": png(gray),
            "blur.jpg": jpg(cv2.GaussianBlur(img, (0, 0), 2)),
            "lowres.jpg": jpg(img[::2, ::2]),
            "masked.jpg": jpg(img // 2),
            "mask.png": png(np.zeros((h, w), np.uint8)),
            "json": meta(key, "i2i", tokens, degradations={}, **common),
        }
    if subset == "semantic":
        sem = np.zeros((h, w, 3), np.uint8)
        sem[: h // 2, : w // 2] = palette_rgb(0)
        sem[h // 2 :, w // 2 :] = palette_rgb(1)
        entities = [
            {"label": "cat", "color": "red", "box": [0, 0, w // 2, h // 2]},
            {"label": "dog", "color": "lime", "box": [w // 2, h // 2, w, h]},
        ]
        return key, {
            "jpg": jpg(img),
            "semantic.png": png(sem),
            "boxes.png": png(sem),
            "json": meta(
                key,
                "semantic",
                ["[[semanticmap2image]]", "[[boundingbox2image]]"],
                entities=entities,
                entities_dropped=[],
                segment_model="hand-made",
                **common,
            ),
        }
    if subset == "depth":
        depth = np.zeros((h, w), np.uint16)
        depth[:, w // 2 :] = 65535
        return key, {
            "jpg": jpg(img),
            "depth.png": png(depth),
            "json": meta(
                key,
                "depth",
                ["[[depth2image]]"],
                depth_model="test",
                depth_min=0.0,
                depth_max=1.0,
                **common,
            ),
        }
    if subset == "pose":
        return key, {
            "jpg": jpg(img),
            "pose.png": png(np.zeros((h, w, 3), np.uint8)),
            "json": meta(key, "pose", ["[[pose2image]]"], people=[], pose_model="test", **common),
        }
    if subset == "faceid":
        n = 2 + i % 3
        files = {f"img{v}.jpg": jpg(image(h, w, seed=i * 10 + v)) for v in range(n)}
        files["json"] = meta(
            key,
            "faceid",
            ["[[faceid]]"],
            identity=f"id{i}",
            captions=[f"person {i} view {v}" for v in range(n)],
            num_views=n,
        )
        return key, files
    raise ValueError(subset)


def write_subset(out: str, subset: str, shard_sizes: list[int]) -> None:
    i = 0
    for n in shard_sizes:
        shards.commit_shard(out, subset, [make_sample(subset, i + j) for j in range(n)])
        i += n
    shards.write_manifest(out, subset, {})
