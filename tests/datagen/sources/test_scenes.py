"""datagen.sources.scenes.manifest: nerfstudio / DL3DV, CO3D and Objaverse-style scenes -> group rows with OpenCV
cameras, checked against hand-computed projections; view sampling; broken inputs as rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datagen.cameras import orbit_cameras, plucker_rays, resize_intrinsics
from datagen.params import ParamError, build
from datagen.schema import KEY_PATTERN
from datagen.sources import resolve
from datagen.sources.base import SourceError
from datagen.sources.groups import GROUP_MANIFEST_SCHEMA
from datagen.sources.scenes.formats import co3d_scenes, nerfstudio_scenes, objaverse_scenes
from datagen.sources.scenes.manifest import (
    ProceduralScenesSource,
    ScenesSource,
    sample_frames,
    scene_manifest,
)
from datagen.sources.scenes.procedural import render_scene, visible_points, write_nerfstudio_scene
from datagen.stages.protocol import ERROR, FILTERED
from datagen.stages.runner import group_failure

FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def row_cameras(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c2w [V, 4, 4], K [V, 3, 3], sizes [V, 2] as (W, H)) of a scene row."""
    v = int(row["views"])
    c2w = np.asarray(row["cameras"], np.float64).reshape(v, 4, 4)
    k = np.asarray(row["intrinsics"], np.float64).reshape(v, 3, 3)
    return c2w, k, np.asarray(row["sizes"], np.int64).reshape(v, 2)


def _png(path: Path, size: tuple[int, int] = (16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _ns_scene(
    folder: Path, c2w_gl: list[np.ndarray], *, images: tuple[str, ...] = ("images",), **top
) -> Path:
    """A nerfstudio scene: transforms.json with ``top`` keys and one tiny PNG per frame."""
    frames = []
    for i, m in enumerate(c2w_gl):
        name = f"frame_{i + 1:05d}.png"
        for sub in images:
            _png(folder / sub / name)
        frames.append({"file_path": f"images/{name}", "transform_matrix": np.asarray(m).tolist()})
    doc = {"fl_x": 100.0, "fl_y": 100.0, "cx": 64.5, "cy": 48.5, "w": 128, "h": 96, **top}
    doc["frames"] = frames
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transforms.json").write_text(json.dumps(doc))
    return folder


def _orbit_gl(n: int) -> list[np.ndarray]:
    """n OpenGL camera-to-world matrices on an orbit (valid, distinct)."""
    cv = orbit_cameras(np.linspace(0, 300, n), 20.0, 4.0)
    return [m @ FLIP for m in cv]


def _project(c2w: np.ndarray, K: np.ndarray, point) -> np.ndarray:
    x = K @ (c2w[:3, :3].T @ (np.asarray(point, float) - c2w[:3, 3]))
    assert x[2] > 0, "behind the camera"
    return x[:2] / x[2]


def _on_pixel_ray(c2w, K, size_hw, point, row, col) -> float:
    """Distance from ``point`` to the Plücker ray of pixel (row, col)."""
    rays = plucker_rays(c2w, K, size_hw, grid=size_hw)[0].astype(np.float64)
    d, m = rays[:3, row, col], rays[3:, row, col]
    return float(np.linalg.norm(np.cross(point, d) - m))


# --- conventions -------------------------------------------------------------------------


def test_nerfstudio_opengl_camera_becomes_opencv(tmp_path):
    # OpenGL camera at (5, 0, 0) looking at the origin, up +z: x_cam = +y, y_cam = +z,
    # z_cam (back) = +x. The point (0, 1, 0.5) is then at OpenGL camera (1, 0.5, -5),
    # OpenCV (1, -0.5, 5): u = 64.5 + 100 / 5 = 84.5, v = 48.5 - 50 / 5 = 38.5.
    gl = np.array([[0, 0, 1, 5], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    _ns_scene(tmp_path / "s", [gl, _orbit_gl(2)[1]])
    (scene,) = nerfstudio_scenes(str(tmp_path / "s"))
    frame = scene.frames[0]
    assert frame.size == (128, 96)
    assert np.allclose(_project(frame.c2w, frame.K, (0, 1, 0.5)), [84.5, 38.5])
    assert _on_pixel_ray(frame.c2w, frame.K, (96, 128), (0, 1, 0.5), row=38, col=84) < 1e-6
    assert np.allclose(frame.c2w[:3, 2], [-1, 0, 0])  # OpenCV z looks forward, at the origin


def _co3d(root: Path, category: str, entries: list[dict]) -> Path:
    folder = root / category
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "frame_annotations.jgz", "wt") as fh:
        json.dump(entries, fh)
    for e in entries:
        _png(root / e["image"]["path"])
    return folder


def _co3d_entry(seq: str, number: int, R, T, fmt: str | None = "ndc_isotropic", **over) -> dict:
    viewpoint = {
        "R": np.asarray(R).tolist(),
        "T": list(T),
        "focal_length": [2.0, 2.0],
        "principal_point": [0.1, -0.2],
    }
    if fmt is not None:
        viewpoint["intrinsics_format"] = fmt
    viewpoint.update(over)
    return {
        "sequence_name": seq,
        "frame_number": number,
        "frame_timestamp": 0.0,
        "image": {"path": f"cars/{seq}/images/frame{number:06d}.jpg", "size": [96, 128]},
        "viewpoint": viewpoint,
    }


@pytest.mark.parametrize(
    ("fmt", "expected_u"),
    # PyTorch3D: X_view = X_world R + T, NDC +x left +y up, x_ndc = f X/Z + p.
    # R = I, T = (0, 0, 5), point (1, 0.5, 0): x_ndc = 2 / 5 + 0.1 = 0.5, y_ndc = 0.2 - 0.2 = 0.
    # ndc_isotropic: scale min(H, W) / 2 = 48 on both axes: u = 64 - 0.5 * 48 = 40, v = 48.
    # ndc_norm_image_bounds: scale W / 2 = 64 on x: u = 64 - 0.5 * 64 = 32, v = 48.
    [("ndc_isotropic", 40.0), ("ndc_norm_image_bounds", 32.0), (None, 32.0)],
)
def test_co3d_pytorch3d_camera_becomes_opencv(tmp_path, fmt, expected_u):
    entries = [_co3d_entry("seq1", n, np.eye(3), (0, 0, 5), fmt) for n in (1, 2)]
    _co3d(tmp_path, "cars", entries)
    (scene,) = co3d_scenes(str(tmp_path))
    assert scene.error is None and scene.name == "cars/seq1"
    frame = scene.frames[0]
    assert frame.size == (128, 96)
    assert np.allclose(_project(frame.c2w, frame.K, (1, 0.5, 0)), [expected_u, 48.0])


def test_co3d_rotated_cameras_match_the_pytorch3d_projection(tmp_path):
    """Random rotations: the OpenCV camera projects like PyTorch3D's formula (by hand)."""
    rng = np.random.default_rng(0)
    entries, cams = [], []
    for n in range(4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        R = q * np.sign(np.linalg.det(q))
        T = rng.normal(size=3) * 0.3 + [0, 0, 6]
        entries.append(_co3d_entry("seq1", n, R, T, focal_length=[1.8, 2.2]))
        cams.append((R, T))
    _co3d(tmp_path, "cars", entries)
    (scene,) = co3d_scenes(str(tmp_path / "cars"))  # one category folder as the path
    for frame, (R, T) in zip(scene.frames, cams, strict=True):
        point = rng.normal(size=3) * 0.5
        xv = point @ R + T
        ndc = np.array([1.8, 2.2]) * xv[:2] / xv[2] + [0.1, -0.2]
        expected = [64 - 48 * ndc[0], 48 - 48 * ndc[1]]
        assert np.allclose(_project(frame.c2w, frame.K, point), expected)


def test_co3d_sequences_become_scenes_sorted_by_frame_number(tmp_path):
    entries = [_co3d_entry("b", n, np.eye(3), (0, 0, 4 + n)) for n in (3, 1, 2)]
    entries += [_co3d_entry("a", n, np.eye(3), (0, 0, 5)) for n in (1, 2)]
    _co3d(tmp_path, "cars", entries)
    scenes = co3d_scenes(str(tmp_path))
    assert [s.name for s in scenes] == ["cars/a", "cars/b"]
    b = scenes[1]
    assert [Path(f.uri).name for f in b.frames] == [f"frame{n:06d}.jpg" for n in (1, 2, 3)]
    assert b.source.endswith("frame_annotations.jgz#b")
    (tmp_path / "cars" / "b" / "images" / "frame000002.jpg").unlink()
    b = co3d_scenes(str(tmp_path))[1]
    assert b.frames[1].error.startswith("MissingFile: ")


def test_objaverse_views_in_each_convention(tmp_path):
    # One camera, written three ways: OpenCV c2w, its OpenGL form, fov instead of fx.
    cv = orbit_cameras([30.0], [25.0], [2.5])[0]
    obj = tmp_path / "objs" / "chair"
    views = [
        {"c2w": cv.tolist(), "convention": "opencv", "fx": 140.0, "width": 256, "height": 256},
        {"transform_matrix": (cv @ FLIP).tolist(), "fx": 140.0, "cx": 128, "cy": 128},
        {"c2w": (cv @ FLIP).tolist(), "convention": "blender", "fov_deg": 60.0},
    ]
    for i, view in enumerate(views):
        (obj).mkdir(parents=True, exist_ok=True)
        (obj / f"{i:03d}.json").write_text(json.dumps(view))
        _png(obj / f"{i:03d}.png", (256, 256))
    (scene,) = objaverse_scenes(str(tmp_path / "objs"))
    assert scene.name == "chair" and scene.error is None
    for frame in scene.frames:
        assert np.allclose(frame.c2w, cv) and frame.size == (256, 256)
    assert np.allclose(scene.frames[0].K, scene.frames[1].K)
    assert np.isclose(scene.frames[0].K[0, 2], 128)
    assert np.isclose(scene.frames[2].K[0, 0], 128 / np.tan(np.radians(30)))


# --- images_N ----------------------------------------------------------------------------


def test_images_2_keeps_full_size_intrinsics_and_half_size_files(tmp_path):
    render = render_scene(seed=2, frames=3, size=64)
    write_nerfstudio_scene(tmp_path / "s", render)
    (scene,) = nerfstudio_scenes(str(tmp_path / "s"), images="images_2")
    for f, frame in enumerate(scene.frames):
        assert "/images_2/" in frame.uri and frame.error is None
        assert frame.size == (64, 64)  # the json's w, h: what K refers to
        assert np.allclose(frame.K, render.K[f])
        fw, fh = Image.open(frame.uri).size
        assert (fw, fh) == (32, 32)
        k_file = resize_intrinsics(frame.K, fw / frame.size[0], fh / frame.size[1])
        assert np.isclose(k_file[0, 0], render.K[f, 0, 0] / 2)
        assert np.allclose(k_file[:2, 2], 16.0)
        # a scene point lands in the half-size pixel holding its full-size pixel
        pts = visible_points(render, f, n=50)
        for p, (i, j) in zip(pts.points, pts.pixels, strict=True):
            u, v = _project(frame.c2w, k_file, p)
            assert (int(v), int(u)) == (i // 2, j // 2)


def test_images_n_needs_frames_under_images(tmp_path):
    _ns_scene(tmp_path / "s", _orbit_gl(3), images=("images", "images_4"))
    doc = json.loads((tmp_path / "s" / "transforms.json").read_text())
    doc["frames"][0]["file_path"] = "rgb/frame_00001.png"
    (tmp_path / "s" / "transforms.json").write_text(json.dumps(doc))
    (scene,) = nerfstudio_scenes(str(tmp_path / "s"), images="images_4")
    assert scene.error.startswith("BadSceneFile: ") and "not under images/" in scene.error


def test_blender_style_angle_without_size_reads_the_image_header(tmp_path):
    folder = tmp_path / "lego"
    gl = _orbit_gl(3)
    frames = []
    for i in (2, 0, 10):  # natural order: r_0, r_2, r_10
        _png(folder / "train" / f"r_{i}.png", (80, 60))
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": gl[i % 3].tolist()})
    (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.8, "frames": frames}))
    (scene,) = nerfstudio_scenes(str(tmp_path))
    assert [Path(f.uri).name for f in scene.frames] == ["r_0.png", "r_2.png", "r_10.png"]
    frame = scene.frames[0]
    assert frame.size == (80, 60) and frame.error is None
    assert np.isclose(frame.K[0, 0], 40 / np.tan(0.4)) and np.isclose(frame.K[1, 1], frame.K[0, 0])
    assert np.allclose(frame.K[:2, 2], [40, 30])


def test_per_frame_intrinsics_override_the_top_level(tmp_path):
    _ns_scene(tmp_path / "s", _orbit_gl(2))
    doc = json.loads((tmp_path / "s" / "transforms.json").read_text())
    doc["frames"][1].update({"fl_x": 77.0, "fl_y": 78.0, "caption": "the back"})
    (tmp_path / "s" / "transforms.json").write_text(json.dumps(doc))
    (scene,) = nerfstudio_scenes(str(tmp_path / "s"))
    assert scene.frames[0].K[0, 0] == 100.0 and scene.frames[1].K[:2, :2].diagonal().tolist() == [
        77.0,
        78.0,
    ]
    assert [f.caption for f in scene.frames] == [None, "the back"]


# --- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 3])
def test_sample_frames_bounds_stride_and_spread(stride):
    for seed in range(20):
        picks = sample_frames("scene-x", 40, (2, 6), 4, stride, seed)
        assert len(picks) == 4
        for idx in picks:
            assert 2 <= len(idx) <= 6
            assert all(b - a == stride for a, b in zip(idx, idx[1:], strict=False))
            assert idx[0] >= 0 and idx[-1] < 40
        for k, idx in enumerate(picks):  # sample k starts in the k-th quarter of its range
            starts = 40 - (len(idx) - 1) * stride
            assert k * starts // 4 <= idx[0] <= (k + 1) * starts // 4
    assert sample_frames("scene-x", 40, (2, 6), 4, stride, 0) == sample_frames(
        "scene-x", 40, (2, 6), 4, stride, 0
    )
    assert sample_frames("scene-x", 40, (2, 6), 4, stride, 0) != sample_frames(
        "scene-x", 40, (2, 6), 4, stride, 1
    )


def test_sample_frames_short_scenes():
    assert sample_frames("s", 1, (2, 4), 2, 1, 0) == []
    # 5 frames cannot hold 3 views 4 apart: the stride shrinks to 2
    for idx in sample_frames("s", 5, (3, 8), 3, 4, 0):
        assert idx == [0, 2, 4]
    counts = {len(i) for seed in range(40) for i in sample_frames("s", 9, (2, 30), 1, 1, seed)}
    assert max(counts) <= 9 and min(counts) >= 2 and len(counts) > 3


def _dataset(root: Path) -> Path:
    _ns_scene(root / "hall", _orbit_gl(10), caption="a long hall")
    _ns_scene(root / "deep" / "garden", _orbit_gl(7))
    _ns_scene(root / "tiny", _orbit_gl(1))
    return root


def test_manifest_rows_are_deterministic_bounded_and_keyed(tmp_path):
    root = _dataset(tmp_path / "data")
    spec = {"kind": "scenes", "path": str(root), "views": [2, 4], "samples_per_scene": 3}
    table = scene_manifest(spec, str(tmp_path), seed=0)
    assert table.schema == GROUP_MANIFEST_SCHEMA
    rows = table.to_pylist()
    assert table.equals(scene_manifest(spec, str(tmp_path), seed=0))
    assert table.column("frames") != scene_manifest(spec, str(tmp_path), seed=1).column("frames")
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys) and all(KEY_PATTERN.match(k) for k in keys)
    groups = [r["group"] for r in rows]
    assert groups.count("hall") == 3 and groups.count("deep/garden") == 3
    assert groups.count("tiny") == 1
    for row in rows:
        if row["group"] == "tiny":
            continue
        assert 2 <= row["views"] <= 4 and row["group_filter"] is None
        assert row["key"].startswith(("hall-", "deep_garden-")) and row["key"][-3:-1] == "-s"
        c2w, K, wh = row_cameras(row)
        assert np.allclose(K[0], [[100, 0, 64.5], [0, 100, 48.5], [0, 0, 1]])
        assert wh.tolist() == [[128, 96]] * row["views"]
        # the cameras are the frames' OpenCV cameras as read, not normalised
        expected = np.stack(
            [_orbit_gl(10 if row["group"] == "hall" else 7)[i] for i in row["frames"]]
        )
        assert np.allclose(c2w, expected @ FLIP)
        names = [Path(u).name for u in row["uri"]]
        assert names == [f"frame_{i + 1:05d}.png" for i in row["frames"]]
        assert row["source"].endswith(f"{row['group']}/transforms.json")
        assert row["group_caption"] == ("a long hall" if row["group"] == "hall" else None)


def test_too_short_scene_is_one_filter_row(tmp_path):
    root = _dataset(tmp_path / "data")
    rows = scene_manifest({"kind": "scenes", "path": str(root)}, str(tmp_path)).to_pylist()
    (tiny,) = [r for r in rows if r["group"] == "tiny"]
    assert tiny["group_filter"] == "TooFewViews: scene tiny has 1 frame, fewer than views[0]=2"
    failure = group_failure({"group_filter": [tiny["group_filter"]]}, 0)
    assert (failure.kind, failure.error) == (FILTERED, "TooFewViews")


def test_key_is_stable_when_the_dataset_moves(tmp_path):
    a = scene_manifest({"kind": "scenes", "path": str(_dataset(tmp_path / "x" / "data"))}, ".")
    b = scene_manifest({"kind": "scenes", "path": str(_dataset(tmp_path / "y" / "data"))}, ".")
    assert a.column("key").equals(b.column("key"))
    assert a.column("frames").equals(b.column("frames"))


# --- broken inputs -----------------------------------------------------------------------


def _rows(tmp_path: Path, **spec) -> list[dict]:
    return scene_manifest(
        {"kind": "scenes", "path": str(tmp_path / "data"), **spec}, "."
    ).to_pylist()


def test_broken_json_is_one_error_row(tmp_path):
    _ns_scene(tmp_path / "data" / "ok", _orbit_gl(3))
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    (bad / "transforms.json").write_text('{"frames": [')
    rows = _rows(tmp_path, samples_per_scene=2)
    (row,) = [r for r in rows if r["group"] == "bad"]
    assert row["group_error"].startswith(f"BadSceneFile: {bad / 'transforms.json'}: not valid JSON")
    assert row["views"] == 1 and row["uri"] == [""] and row["key"].endswith("-s0")
    failure = group_failure({"group_error": [row["group_error"]]}, 0)
    assert (failure.kind, failure.error) == (ERROR, "BadSceneFile")
    assert len([r for r in rows if r["group"] == "ok"]) == 2


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d["frames"][1].update(transform_matrix=[[float("nan")] * 4] * 4), "BadCamera"),
        (
            lambda d: d["frames"][0].update(transform_matrix=np.diag([2.0, 1, 1, 1]).tolist()),
            "BadCamera",
        ),
        (lambda d: d.update(fl_x=0.0), "BadCamera"),
        (lambda d: d.update(fl_x="wide"), "BadSceneFile"),
        (lambda d: d["frames"][0].update(transform_matrix=[[1, 0], [0, 1]]), "BadSceneFile"),
        (lambda d: d.pop("fl_x"), "BadSceneFile"),
        (lambda d: d.update(frames=[]), "BadSceneFile"),
        (lambda d: d.update(caption=["x"]), "BadSceneFile"),
        (lambda d: d["frames"][0].pop("file_path"), "BadSceneFile"),
    ],
)
def test_bad_cameras_and_fields_are_named_errors(tmp_path, change, error):
    folder = _ns_scene(tmp_path / "data" / "s", _orbit_gl(3))
    doc = json.loads((folder / "transforms.json").read_text())
    change(doc)
    (folder / "transforms.json").write_text(json.dumps(doc))
    (row,) = _rows(tmp_path)
    assert row["group_error"].startswith(f"{error}: "), row["group_error"]
    assert "\n" not in row["group_error"]


def test_unreadable_scene_files_are_error_rows(tmp_path):
    folder = _ns_scene(tmp_path / "data" / "s", _orbit_gl(3))
    (folder / "transforms.json").write_bytes(b"\xff\xfe not text")
    (row,) = _rows(tmp_path)
    assert row["group_error"].startswith("BadSceneFile: ")
    (folder / "transforms.json").write_bytes(b"[1, 2]")
    (row,) = _rows(tmp_path)
    assert "top level is not an object" in row["group_error"]


def test_missing_image_and_escaping_path_are_per_view_errors(tmp_path):
    folder = _ns_scene(tmp_path / "data" / "s", _orbit_gl(3))
    (folder / "images" / "frame_00002.png").unlink()
    doc = json.loads((folder / "transforms.json").read_text())
    doc["frames"][2]["file_path"] = "images/../../../etc/passwd.png"
    (folder / "transforms.json").write_text(json.dumps(doc))
    (row,) = _rows(tmp_path, views=[3, 3])
    missing = folder / "images" / "frame_00002.png"
    errors = row["source_error"]  # frames sorted by file name: ../ first
    assert errors[0] == f"BadPath: images/../../../etc/passwd.png points outside {folder}"
    assert row["uri"][0] == ""
    assert errors[1] is None
    assert errors[2] == f"MissingFile: {missing} does not exist"
    assert row["group_error"] is None  # decode quarantines the sample naming the view


def test_co3d_broken_annotations(tmp_path):
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "frame_annotations.jgz").write_bytes(b"not gzip")
    (row,) = scene_manifest(
        {"kind": "scenes", "path": str(tmp_path), "format": "co3d"}, "."
    ).to_pylist()
    assert row["group_error"].startswith("BadSceneFile: ") and "gzip" in row["group_error"]
    entries = [_co3d_entry("s", n, np.eye(3), (0, 0, 5)) for n in (1, 2)]
    entries[1]["viewpoint"]["R"] = [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    entries.append(_co3d_entry("t", 1, np.eye(3), (0, 0, 5), fmt="screen"))
    _co3d(tmp_path, "cars", entries)
    rows = scene_manifest(
        {"kind": "scenes", "path": str(tmp_path), "format": "co3d"}, "."
    ).to_pylist()
    assert [r["group_error"].split(":")[0] for r in rows] == ["BadCamera", "BadSceneFile"]


def test_missing_path_and_bad_params(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        scene_manifest({"kind": "scenes", "path": str(tmp_path / "nope")}, ".")
    for spec, key in [
        ({"views": [1, 4]}, "views"),
        ({"views": [5, 4]}, "views"),
        ({"samples_per_scene": 0}, "samples_per_scene"),
        ({"stride": 0}, "stride"),
        ({"images": "images_3"}, "images"),
        ({"vews": [2, 4]}, "vews"),
    ]:
        with pytest.raises(ParamError, match=key):
            build(ScenesSource.Params, {"kind": "scenes", "path": "x", **spec}, "source")
    for spec, key in [({"n": 0}, "n"), ({"size": 4}, "size"), ({"frames": 0}, "frames")]:
        with pytest.raises(ParamError, match=key):
            build(ProceduralScenesSource.Params, {"kind": "procedural_scenes", **spec}, "source")


# --- the procedural source end to end ------------------------------------------------------


def test_resolve_procedural_scenes_gives_a_group_table(tmp_path):
    spec = {"kind": "procedural_scenes", "n": 2, "frames": 5, "size": 32, "samples_per_scene": 2}
    table = resolve(spec, str(tmp_path), seed=7)
    assert table.schema == GROUP_MANIFEST_SCHEMA and table.num_rows == 4
    assert (tmp_path / "procedural_scenes" / "scene_0001" / "transforms.json").is_file()
    for row in table.to_pylist():
        assert row["group"] in ("scene_0000", "scene_0001")
        assert row["group_caption"] and " on a" in row["group_caption"]
        assert all(Path(u).is_file() for u in row["uri"]) and set(row["source_error"]) == {None}
        c2w, K, wh = row_cameras(row)
        assert wh.tolist() == [[32, 32]] * row["views"]
        render = render_scene(int(row["group"][-1]), 5, 32)
        assert np.allclose(c2w, render.c2w[row["frames"]], atol=1e-6)
        assert np.allclose(K, render.K[row["frames"]], atol=1e-6)
    assert resolve(spec, str(tmp_path), seed=7).equals(table)


def test_scenes_on_an_fsspec_filesystem(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/scenes-{tmp_path.name}"
    frames = []
    for i, m in enumerate(_orbit_gl(3)):
        image = tmp_path / f"{i}.png"
        _png(image)
        if i != 1:
            fs.pipe(f"{root}/a/images/f{i}.png", image.read_bytes())
        frames.append({"file_path": f"images/f{i}.png", "transform_matrix": m.tolist()})
    doc = {"fl_x": 10.0, "w": 16, "h": 12, "frames": frames}
    fs.pipe(f"{root}/a/transforms.json", json.dumps(doc).encode())
    try:
        (row,) = scene_manifest(
            {"kind": "scenes", "path": f"memory://{root}", "views": [3, 3]}, "."
        ).to_pylist()
    finally:
        fs.rm(root, recursive=True)
    assert row["source"] == f"memory://{root}/a/transforms.json"
    assert row["uri"][0] == f"memory://{root}/a/images/f0.png"
    assert row["source_error"] == [
        None,
        f"MissingFile: memory://{root}/a/images/f1.png does not exist",
        None,
    ]


def test_symlink_loops_and_fifos_do_not_hang_the_driver(tmp_path):
    import os

    _ns_scene(tmp_path / "data" / "a", _orbit_gl(2))
    (tmp_path / "data" / "loop").mkdir()
    (tmp_path / "data" / "loop" / "up").symlink_to(tmp_path / "data")
    fifo = tmp_path / "data" / "b"
    fifo.mkdir()
    os.mkfifo(fifo / "transforms.json")
    rows = _rows(tmp_path)
    assert [r["group"] for r in rows] == ["a", "b"]
    assert rows[1]["group_error"].startswith(
        f"BadSceneFile: {fifo / 'transforms.json'}: NotARegularFile"
    )
