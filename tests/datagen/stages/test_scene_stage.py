"""The scene stage on hand-built group rows (no Ray): the real decode stage, the stage
runner and the sink's sample builder, so what is checked is what a shard would hold."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest

from datagen import params as P
from datagen.cameras import CAMERA0, orbit_cameras
from datagen.images import decode_rgb
from datagen.params import ParamError
from datagen.schema import validate_sample
from datagen.sources.groups import group_row, group_table
from datagen.stages.decode import DecodeStage, DecodeStageParams
from datagen.stages.protocol import Stage, error_column, object_column, status_column
from datagen.stages.runner import run_stage
from datagen.stages.scene import SceneParams, SceneStage
from pipelines.sink import build_sample

TARGET = np.array([0.3, -0.2, 0.5])
DISTANCE = 3.0
# Two points seen by every view, drawn as a red and a blue disc.
POINTS = {"red": TARGET, "blue": TARGET + np.array([0.3, 0.2, -0.2])}
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}
# File sizes (W, H): landscape, portrait, square; the manifest's K refer to twice these.
FILE_SIZES = [(320, 200), (200, 300), (260, 260)]
DECODE = DecodeStageParams(min_side=32, max_side=240)


class FakeCaption(Stage):
    """Stands in for the VLM caption stage with ``group_views: first``: one caption per
    scene, of view 0 (it says which image it saw, so the test knows it was view 0)."""

    name: ClassVar[str] = "caption"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("jpg",)
    produces: ClassVar[tuple[str, ...]] = ("caption", "caption_model")
    views_of_group = "first"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        shapes = [decode_rgb(bytes(j)).shape for j in batch["jpg"]]
        return {
            "meta": [
                {"caption": f"a scene seen at {w}x{h}", "caption_model": "fake"}
                for h, w, _ in shapes
            ]
        }


def rig(views: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV c2w [V, 4, 4] orbiting TARGET, and K [V, 3, 3] in pixels of twice FILE_SIZES,
    principal points off centre (so the crop arithmetic matters)."""
    c2w = orbit_cameras([0, 25, -30][:views], [15, 20, 5][:views], DISTANCE, TARGET)
    # Manifest size (2w, 2h): principal point (w + 30, h - 20), off its centre (w, h).
    ks = [[[420.0, 0.0, w + 30.0], [0.0, 410.0, h - 20.0], [0.0, 0.0, 1.0]] for w, h in FILE_SIZES]
    return c2w, np.array(ks[:views])


def project(c2w: np.ndarray, k: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(u, v) in pixels (pixel (i, j) centred at (j + 0.5, i + 0.5))."""
    cam = np.linalg.inv(c2w) @ np.append(point, 1.0)
    uvw = k @ cam[:3]
    return uvw[:2] / uvw[2]


def draw_view(size_wh: tuple[int, int], discs: dict[str, np.ndarray], radius: float) -> np.ndarray:
    w, h = size_wh
    image = np.full((h, w, 3), 235, np.uint8)
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    for name, (u, v) in discs.items():
        image[(jj - u) ** 2 + (ii - v) ** 2 <= radius**2] = COLOURS[name]
    return image


def centroid(image: np.ndarray, name: str) -> np.ndarray:
    """Sub-pixel centre of the disc of colour ``name``: its pixels found by colour, weighted
    by darkness (luma: JPEG keeps it at full resolution, its chroma at half)."""
    rgb = image.astype(np.float64)
    ii, jj = np.indices(rgb.shape[:2])
    rough = {}
    for n, channel in (("red", 0), ("blue", 2)):
        hue = np.clip(rgb[..., channel] - rgb[..., 1] - 60, 0, None)
        assert hue.sum() > 0, f"no {n} disc in the stored view"
        rough[n] = np.array([(hue * jj).sum(), (hue * ii).sum()]) / hue.sum()
    other = rough["blue" if name == "red" else "red"]
    mine = np.hypot(jj - rough[name][0], ii - rough[name][1])
    weight = np.clip(220.0 - rgb @ [0.299, 0.587, 0.114], 0, None)
    weight[mine >= np.hypot(jj - other[0], ii - other[1])] = 0
    return np.array([(weight * (jj + 0.5)).sum(), (weight * (ii + 0.5)).sum()]) / weight.sum()


def scene_row(
    tmp_path: Path,
    key: str,
    views: int = 3,
    c2w: np.ndarray | None = None,
    k: np.ndarray | None = None,
    sizes: bool = True,
    **kw: Any,
) -> dict[str, Any]:
    """A group row whose views are PNG files with the rig's projections of POINTS drawn."""
    good_c2w, good_k = rig(views)
    uris = []
    for v in range(views):
        file_k = good_k[v].copy()
        file_k[:2] /= 2  # the manifest's K refer to twice the file size
        discs = {n: project(good_c2w[v], file_k, p) for n, p in POINTS.items()}
        path = tmp_path / f"{key}-{v}.png"
        cv2.imwrite(
            str(path), cv2.cvtColor(draw_view(FILE_SIZES[v], discs, 7.0), cv2.COLOR_RGB2BGR)
        )
        uris.append(str(path))
    return group_row(
        key,
        f"scene-{key}",
        str(tmp_path),
        uris,
        frames=[3 * v + 1 for v in range(views)],
        cameras=good_c2w if c2w is None else c2w,
        intrinsics=good_k if k is None else k,
        sizes=[(2 * w, 2 * h) for w, h in FILE_SIZES[:views]] if sizes else None,
        **kw,
    )


def run_scene(
    rows: list[dict[str, Any]],
    scene: SceneParams | None = None,
    caption: bool = False,
    decode: DecodeStageParams = DECODE,
) -> tuple[dict[str, Any], list[str]]:
    """decode (-> caption) -> scene over ``rows`` as the builder runs them; the batch and
    the stages the multiview subset needs."""
    batch: dict[str, Any] = {c: object_column(v) for c, v in group_table(rows).to_pydict().items()}
    batch.update(run_stage(DecodeStage(decode), batch, name="decode", needs=()))
    needs = ["decode"]
    if caption:
        batch.update(run_stage(FakeCaption(), batch, name="caption", needs=("decode",)))
        needs.append("caption")
    stage = SceneStage(scene or SceneParams(size=96))
    batch.update(run_stage(stage, batch, name="scene", needs=tuple(needs)))
    return batch, [*needs, "scene"]


def sample(batch: dict[str, Any], needs: list[str], i: int) -> tuple[dict[str, bytes], dict]:
    """Row ``i`` as the sink writes it, validated against the schema: (files, meta)."""
    assert batch[status_column("scene")][i] == "ok", batch[error_column("scene")][i]
    files = build_sample("multiview", needs, batch, i)
    meta = validate_sample("multiview", {"__key__": batch["key"][i], **files})
    return files, meta


def arrays(files: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    c2w = np.load(io.BytesIO(files["cameras.npy"]), allow_pickle=False)
    k = np.load(io.BytesIO(files["intrinsics.npy"]), allow_pickle=False)
    return c2w, k


def reprojection_errors(files: dict[str, bytes], meta: dict, views: int = 3) -> np.ndarray:
    """|found - projected| in stored pixels of each point in each view: where the disc drawn
    in the original view is found in the stored one, against where the stored camera and K
    project the point (the stored world is camera 0's frame turned to CAMERA0, scaled by
    camera_scale)."""
    c2w, k = arrays(files)
    original, _ = rig(views)
    to_stored = CAMERA0 @ np.linalg.inv(original[0])
    errors = []
    for v in range(views):
        stored = decode_rgb(files[f"img{v}.jpg"])
        for name, point in POINTS.items():
            p = meta["camera_scale"] * (to_stored @ np.append(point, 1.0))[:3]
            expected = project(c2w[v].astype(np.float64), k[v].astype(np.float64), p)
            errors.append(np.abs(centroid(stored, name) - expected))
    return np.array(errors)


def test_stored_intrinsics_describe_the_stored_pixels(tmp_path):
    """Each 3D point lands, through the stored camera and K, on the disc drawn for it in the
    original view: the manifest size -> file -> max_side -> crop -> resize chain is exact
    (a half-pixel slip in any step would show as >= 0.2 px)."""
    batch, needs = run_scene([scene_row(tmp_path, "s0")])
    files, meta = sample(batch, needs, 0)
    c2w, k = arrays(files)
    assert c2w.dtype == np.float32 and c2w.shape == (3, 4, 4)
    assert k.dtype == np.float32 and k.shape == (3, 3, 3)
    # The decoded views differ (max_side 240: 240x150, 160x240, 240x240); all stored 96x96.
    assert {decode_rgb(files[f"img{v}.jpg"]).shape for v in range(3)} == {(96, 96, 3)}
    assert [meta[k] for k in ("width", "height", "num_views")] == [96, 96, 3]
    assert reprojection_errors(files, meta).max() < 0.15


def test_sizes_missing_means_the_files_own_size(tmp_path):
    """Without ``sizes`` the K refer to the decoded file: K for twice the file is then off
    by 2x, which the stored K must reproduce (not silently correct)."""
    _, k2 = rig()
    k_file = k2.copy()
    k_file[:, :2] /= 2
    batch, needs = run_scene([scene_row(tmp_path, "s1", k=k_file, sizes=False)])
    _, k_stored = arrays(sample(batch, needs, 0)[0])
    ref_batch, _ = run_scene([scene_row(tmp_path, "s2")])
    _, k_ref = arrays(sample(ref_batch, needs, 0)[0])
    np.testing.assert_allclose(k_stored, k_ref, rtol=1e-6)


def test_cameras_normalised_camera_zero_at_camera0_at_distance(tmp_path):
    batch, needs = run_scene([scene_row(tmp_path, "s0", views=3)], SceneParams(size=64))
    files, meta = sample(batch, needs, 0)
    c2w, _ = arrays(files)
    np.testing.assert_allclose(c2w[0], CAMERA0, atol=1e-6)
    # Orbit cameras all look at TARGET from DISTANCE: the axes meet there.
    assert meta["camera_scale"] == pytest.approx(1.7 / DISTANCE, rel=1e-6)
    c2w = c2w.astype(np.float64)
    centres, axes = c2w[:, :3, 3], c2w[:, :3, 2]
    proj = np.eye(3) - axes[:, :, None] * axes[:, None, :]
    meet = np.linalg.solve(proj.sum(0), np.einsum("vab,vb->a", proj, centres))
    assert np.linalg.norm(meet) == pytest.approx(1.7, rel=1e-5)
    np.testing.assert_allclose(meet, [0, 0, 1.7], atol=1e-5)  # straight ahead of camera 0
    # Relative rotations are those of the rig.
    original, _ = rig()
    rel = CAMERA0 @ np.linalg.inv(original[0]) @ original[2]
    np.testing.assert_allclose(c2w[2][:3, :3], rel[:3, :3], atol=1e-6)
    for m in c2w:
        np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-5)
    assert meta["frames"] == [1, 4, 7] and meta["scene"] == "scene-s0"


def test_distance_param(tmp_path):
    batch, needs = run_scene([scene_row(tmp_path, "s0")], SceneParams(size=64, distance=2.5))
    assert sample(batch, needs, 0)[1]["camera_scale"] == pytest.approx(2.5 / DISTANCE, rel=1e-6)


def test_caption_rules(tmp_path):
    rows = [
        scene_row(tmp_path, "a", group_caption="a kitchen", view_captions=["one", None, "three"]),
        scene_row(tmp_path, "b"),
    ]
    # A VLM caption (a str) wins; the source's is kept beside it.
    batch, needs = run_scene(rows, caption=True)
    a, b = sample(batch, needs, 0)[1], sample(batch, needs, 1)[1]
    assert a["caption"] == "a scene seen at 240x150"  # view 0 after max_side
    assert a["source_caption"] == "a kitchen" and a["caption_model"] == "fake"
    assert b["caption"] == "a scene seen at 240x150" and "source_caption" not in b
    assert a["captions"] == ["one", "", "three"] and b["captions"] == ["", "", ""]
    # No caption stage: decode's per-view list is not a caption; the group's is used.
    batch, needs = run_scene(rows)
    a, b = sample(batch, needs, 0)[1], sample(batch, needs, 1)[1]
    assert a["caption"] == "a kitchen" and b["caption"] == ""
    assert "caption_model" not in a and "source_caption" not in a
    # source_caption false: a bare [[multiview]] prompt.
    batch, needs = run_scene(rows, SceneParams(size=64, source_caption=False))
    assert sample(batch, needs, 0)[1]["caption"] == ""


def _bad(c2w: np.ndarray, k: np.ndarray, view: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    c2w, k = c2w.copy(), k.copy()
    if what == "nan":
        c2w[view, 0, 3] = np.nan
    elif what == "scaled":
        c2w[view, :3, :3] *= 1.1
    elif what == "mirrored":
        c2w[view, :3, 0] *= -1
    elif what == "focal":
        k[view, 1, 1] = -5.0
    return c2w, k


def test_bad_cameras_fail_their_row_only(tmp_path):
    good_c2w, good_k = rig()
    rows = [scene_row(tmp_path, "good")]
    expected = {"good": ("ok", "")}
    for what, error in (
        ("nan", "BadCamera"),
        ("scaled", "BadCamera"),
        ("mirrored", "BadCamera"),
        ("focal", "BadIntrinsics"),
    ):
        c2w, k = _bad(good_c2w, good_k, 1, what)
        rows.append(scene_row(tmp_path, what, c2w=c2w, k=k))
        expected[what] = ("error", error)
    missing = scene_row(tmp_path, "missing")
    missing["cameras"] = None
    rows.append(missing)
    expected["missing"] = ("error", "BadCamera")
    batch, needs = run_scene(rows)
    got = {
        key: (batch[status_column("scene")][i], batch[error_column("scene")][i])
        for i, key in enumerate(batch["key"])
    }
    assert got == expected
    messages = dict(zip(batch["key"], batch["scene.message"], strict=True))
    assert "view 1" in messages["scaled"] and "\n" not in messages["nan"]
    assert len(sample(batch, needs, 0)[0]) == 3 + 2 + 1  # 3 views, 2 arrays, json


def test_size_null_keeps_the_smallest_crop_side(tmp_path):
    """Views of different sizes all stored at the smallest crop side (one size a sample)."""
    batch, needs = run_scene([scene_row(tmp_path, "s0")], SceneParams(size=None))
    files, meta = sample(batch, needs, 0)
    assert meta["width"] == meta["height"] == 150  # view 0: 240x150 after max_side
    assert {decode_rgb(files[f"img{v}.jpg"]).shape for v in range(3)} == {(150, 150, 3)}


def test_upscaling_keeps_intrinsics_exact(tmp_path):
    """Views smaller than ``size`` are enlarged (2x for the portrait view): a half-pixel
    slip would be 0.5 px here."""
    batch, needs = run_scene([scene_row(tmp_path, "s0")], SceneParams(size=320))
    files, meta = sample(batch, needs, 0)
    assert reprojection_errors(files, meta).max() < 0.25


def test_params_are_checked():
    assert P.build(SceneParams, {"size": None}).size is None
    for raw, key in (
        ({"size": 8}, "size"),
        ({"distance": 0.0}, "distance"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"sizes": 64}, "sizes"),
    ):
        with pytest.raises(ParamError, match=key):
            P.build(SceneParams, raw)


def test_check_needs_refuses_what_cannot_work():
    from datagen.stages.caption import CaptionParams

    SceneStage.check_needs(SceneParams(), {"decode": DecodeStageParams()})
    SceneStage.check_needs(
        SceneParams(size=256),
        {"decode": DecodeStageParams(max_side=256), "caption": CaptionParams(group_views="first")},
    )
    with pytest.raises(ParamError, match="group_views"):
        SceneStage.check_needs(SceneParams(), {"caption": CaptionParams(group_views="all")})
    with pytest.raises(ParamError, match="max_side"):
        SceneStage.check_needs(SceneParams(size=512), {"decode": DecodeStageParams(max_side=256)})
