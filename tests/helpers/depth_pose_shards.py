"""Tiny real t2i / i2i / depth / pose / semantic / multiview / faceid shards for the training
tests and the README's training commands (the demo config's subsets).

Every sample is built with the contract's own helpers (``make_meta``), checked with
``validate_sample`` and committed with ``datagen.shards.commit_shard``, the way the sink
writes them. Images are ``H x W = 32 x 48`` so a ``[32, 48]`` bucket takes them without
any resize: pixel values can then be checked exactly.

* depth: a 16-bit gray PNG, value ``depth_value(i, y, x)`` (0 at the top-left corner,
  65535 at the bottom-right, distinct non-multiples of 257 elsewhere, so 8 bits could not
  hold them); ``depth_model`` is ``random-tiny`` for odd ``i``.
* pose: an RGB skeleton on black (``POSE_LIMB_RGB`` limb from ``POSE_LIMB`` endpoints,
  a ``POSE_JOINT_RGB`` joint dot); ``pose_model`` is ``random-tiny`` for odd ``i``.
* multiview: ``MV_VIEWS`` square ``MV_SIDE`` views on an orbit (:func:`multiview_cameras`),
  normalised as the scene stage stores them; faceid: ``FACE_VIEWS`` photos with captions.
"""

from __future__ import annotations

import io
import json

import cv2
import numpy as np

from datagen import shards
from datagen.schema import make_meta, validate_sample

H, W = 32, 48
RANDOM = "random-tiny"
REAL_DEPTH_MODEL = "depth-anything-v2-small"
REAL_POSE_MODEL = "yolo11n-pose+vitpose-base"
POSE_LIMB = ((6, 8), (40, 8))  # (x, y) endpoints of one horizontal limb
POSE_LIMB_RGB = (255, 0, 0)
POSE_JOINT = (24, 24)
POSE_JOINT_RGB = (0, 85, 255)


def image(i: int) -> np.ndarray:
    """A smooth RGB image (H x W x 3 uint8), different per ``i``."""
    rng = np.random.default_rng(1000 + i)
    return cv2.resize(rng.integers(0, 255, (4, 4, 3)).astype(np.uint8), (W, H))


def jpg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def png(arr: np.ndarray) -> bytes:
    """PNG bytes of a gray (8/16-bit) or RGB array (OpenCV writes BGR: flipped here)."""
    return cv2.imencode(".png", arr[:, :, ::-1] if arr.ndim == 3 else arr)[1].tobytes()


def depth_value(i: int) -> np.ndarray:
    """The 16-bit depth map of depth sample ``i`` (H x W uint16)."""
    y, x = np.mgrid[0:H, 0:W]
    v = 1000 + (y * W + x) * 37 + i  # 1000 .. 57831: never a multiple-of-257 ladder
    v[0, 0], v[-1, -1] = 0, 65535  # far and near ends of the min-max range
    return v.astype(np.uint16)


def pose_map() -> np.ndarray:
    rgb = np.zeros((H, W, 3), np.uint8)
    cv2.line(rgb, POSE_LIMB[0], POSE_LIMB[1], POSE_LIMB_RGB, 3)
    cv2.circle(rgb, POSE_JOINT, 3, POSE_JOINT_RGB, -1)
    return rgb


def _meta(key: str, subset: str, tokens: list[str], **extra) -> bytes:
    meta = make_meta(key, subset, f"/in/{key}.jpg", tokens, width=W, height=H, **extra)
    return json.dumps(meta).encode()


def sample(subset: str, i: int) -> tuple[str, dict[str, bytes]]:
    key = f"{subset}_{i:04d}"
    rgb = image(i)
    caption = f"a {subset} photo number {i}"
    if subset == "t2i":
        files = {
            "jpg": jpg(rgb),
            "txt": caption.encode(),
            "json": _meta(key, subset, ["[[text2image]]"], caption=caption),
        }
    elif subset == "i2i":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        files = {
            "jpg": jpg(rgb),
            "canny.png": png(cv2.Canny(gray, 20, 60)),
            "hed.png": png(gray),
            "blur.jpg": jpg(cv2.GaussianBlur(rgb, (0, 0), 2)),
            "lowres.jpg": jpg(rgb[::2, ::2]),
            "masked.jpg": jpg(rgb // 2),
            "mask.png": png(np.zeros((H, W), np.uint8)),
            "json": _meta(
                key,
                subset,
                ["[[canny2image]]", "[[hed2img]]", "[[deblurring]]", "[[image_inpainting]]"],
                caption=caption,
                degradations={},
            ),
        }
    elif subset == "depth":
        files = {
            "jpg": jpg(rgb),
            "depth.png": png(depth_value(i)),
            "json": _meta(
                key,
                subset,
                ["[[depth2image]]"],
                caption=caption,
                depth_model=RANDOM if i % 2 else REAL_DEPTH_MODEL,
                depth_min=0.25 + i,
                depth_max=7.5 + i,
            ),
        }
    elif subset == "pose":
        keypoints = [[float(8 + k), float(8 + k), 0.9] for k in range(17)]
        files = {
            "jpg": jpg(rgb),
            "pose.png": png(pose_map()),
            "json": _meta(
                key,
                subset,
                ["[[pose2image]]"],
                caption=caption,
                people=[{"box": [4.0, 2.0, 44.0, 30.0], "keypoints": keypoints}],
                pose_model=RANDOM if i % 2 else REAL_POSE_MODEL,
            ),
        }
    elif subset == "semantic":
        files = semantic_files(key, rgb, caption)
    elif subset in ("multiview", "faceid"):
        files = group_files(subset, key, i)
    else:
        raise ValueError(subset)
    validate_sample(subset, {"__key__": key, **files})
    return key, files


def semantic_files(key: str, rgb: np.ndarray, caption: str) -> dict[str, bytes]:
    """Two hand-made entities (a cat on the left half, a ball lower right) drawn and
    recorded by the segment stage's own renderers, in colours drawn from the key."""
    from datagen.stages.segment_render import (
        Entity,
        entity_colours,
        entity_record,
        render_boxes,
        render_semantic,
    )

    cat, ball = np.zeros((H, W), bool), np.zeros((H, W), bool)
    cat[:, : W // 2] = True
    ball[H // 2 :, 3 * W // 4 :] = True
    colours = entity_colours(key, 0, 2)
    entities = [
        Entity("cat", colours[0], np.array([[0, 0, W // 2, H]], np.float32), np.ones(1), cat),
        Entity(
            "ball", colours[1], np.array([[3 * W // 4, H // 2, W, H]], np.float32), np.ones(1), ball
        ),
    ]
    return {
        "jpg": jpg(rgb),
        "semantic.png": png(render_semantic(entities, W, H)),
        "boxes.png": png(render_boxes(entities, W, H)),
        "json": _meta(
            key,
            "semantic",
            ["[[semanticmap2image]]", "[[boundingbox2image]]"],
            caption=caption,
            entities=[entity_record(e) for e in entities],
            entities_dropped=[],
            segment_model="hand-made",
        ),
    }


MV_SIDE, MV_VIEWS, MV_FOCAL = 32, 3, 40.0
FACE_VIEWS = 3


def multiview_cameras(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(c2w [V, 4, 4], K [V, 3, 3]) of multiview sample ``i``: an orbit 25 degrees apart,
    normalised (camera 0 ``CAMERA0``, 1.7 from the axes' intersection)."""
    from datagen.cameras import intrinsics_from_focal, normalize_cameras, orbit_cameras

    az = [10.0 * i + 25.0 * v for v in range(MV_VIEWS)]
    c2w = orbit_cameras(az, [15.0] * MV_VIEWS, [2.0] * MV_VIEWS)
    c2w, _ = normalize_cameras(c2w)
    K = np.stack([intrinsics_from_focal(MV_FOCAL, (MV_SIDE, MV_SIDE))] * MV_VIEWS)
    return c2w, K


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def group_files(subset: str, key: str, i: int) -> dict[str, bytes]:
    if subset == "multiview":
        c2w, K = multiview_cameras(i)
        files = {
            f"img{v}.jpg": jpg(cv2.resize(image(10 * i + v), (MV_SIDE, MV_SIDE)))
            for v in range(MV_VIEWS)
        }
        meta = make_meta(
            key, subset, f"/in/scene{i}/transforms.json", ["[[multiview]]"],
            scene=f"scene{i}", caption=f"a small scene number {i}", captions=[""] * MV_VIEWS,
            num_views=MV_VIEWS, width=MV_SIDE, height=MV_SIDE, frames=list(range(MV_VIEWS)),
            camera_scale=1.0,
        )  # fmt: skip
        return {**files, "cameras.npy": _npy(c2w), "intrinsics.npy": _npy(K), "json": _j(meta)}
    files = {f"img{v}.jpg": jpg(image(20 * i + v)) for v in range(FACE_VIEWS)}
    captions = [f"person {i} photo {v}" for v in range(FACE_VIEWS)]
    meta = make_meta(
        key, subset, f"/in/people.parquet#person{i}", ["[[faceid]]"],
        identity=f"person{i}", captions=captions, num_views=FACE_VIEWS,
    )  # fmt: skip
    return {**files, "json": _j(meta)}


def _j(meta: dict) -> bytes:
    return json.dumps(meta).encode()


def write(out: str, subset: str, shard_sizes: list[int]) -> None:
    """Shards of ``subset`` under ``out`` (a datagen output folder) plus its manifest."""
    i = 0
    for n in shard_sizes:
        shards.commit_shard(out, subset, [sample(subset, i + j) for j in range(n)])
        i += n
    shards.write_manifest(out, subset, {})


def write_all(out: str) -> str:
    write(out, "t2i", [6, 4])
    write(out, "i2i", [6])
    write(out, "depth", [5, 5])
    write(out, "pose", [6])
    write(out, "semantic", [4])
    write(out, "multiview", [4])
    write(out, "faceid", [4])
    return out
