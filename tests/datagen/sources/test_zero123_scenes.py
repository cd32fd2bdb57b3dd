"""Zero123 / allenai objaverse-rendering render folders (``NNN.png`` + ``NNN.npy``, a 3x4
Blender world-to-camera matrix) read by ``format: objaverse``, and a source that yields no
scene being a one-line error naming what was looked for (issue 21, item 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datagen.cameras import orbit_cameras
from datagen.params import ParamError, build
from datagen.sources.base import SourceError
from datagen.sources.scenes.manifest import ScenesSource, scene_manifest

FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def blender_rt(c2w_cv: np.ndarray) -> np.ndarray:
    """The 3x4 ``get_3x4_RT_matrix_from_blender`` writes for a camera whose OpenCV c2w is
    ``c2w_cv``: Blender's camera axes are OpenGL's, so matrix_world = c2w_cv @ FLIP, and
    R_world2bcam = rotation.T, T_world2bcam = -R_world2bcam @ location."""
    world = c2w_cv @ FLIP
    r = world[:3, :3].T
    return np.hstack([r, (-r @ world[:3, 3])[:, None]])


def _render(folder: Path, cams: np.ndarray, size: tuple[int, int] = (32, 32)) -> Path:
    """A Zero123 render folder: RGBA NNN.png (transparent background) + NNN.npy per view."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, cam in enumerate(cams):
        Image.new("RGBA", size, (200, 40, 40, 0)).save(folder / f"{i:03d}.png")
        rt = blender_rt(cam)
        np.save(folder / f"{i:03d}.npy", rt.astype(np.float32) if i == 0 else rt)
    return folder


def _cams(n: int = 4) -> np.ndarray:
    return orbit_cameras(np.linspace(0, 270, n), np.linspace(-10, 40, n), [1.5, 2.0, 2.5, 3.0][:n])


def _rows(root: Path, **spec: Any) -> list[dict]:
    spec = {"kind": "scenes", "path": str(root), "format": "objaverse", **spec}
    return scene_manifest(spec, ".").to_pylist()


def _row_cameras(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = int(row["views"])
    c2w = np.asarray(row["cameras"], np.float64).reshape(v, 4, 4)
    k = np.asarray(row["intrinsics"], np.float64).reshape(v, 3, 3)
    return c2w, k, np.asarray(row["sizes"], np.int64).reshape(v, 2)


# --- reading ------------------------------------------------------------------------------


def test_zero123_render_folder_gives_the_original_cameras(tmp_path):
    cams = _cams(4)
    _render(tmp_path / "views_release" / "0a1b2c", cams)
    (row,) = _rows(tmp_path / "views_release", views=[4, 4])
    assert row["group"] == "0a1b2c" and row["group_error"] is None
    assert row["frames"] == [0, 1, 2, 3]
    assert [Path(u).name for u in row["uri"]] == ["000.png", "001.png", "002.png", "003.png"]
    assert row["source_error"] == [None] * 4
    c2w, K, wh = _row_cameras(row)
    assert np.allclose(c2w, cams, atol=1e-5)
    # lens 35 mm on a 32 mm sensor: fx = fy = 35 / 32 * W, principal point at the centre
    assert np.allclose(K, [[35.0, 0, 16.0], [0, 35.0, 16.0], [0, 0, 1]])
    assert wh.tolist() == [[32, 32]] * 4


def test_zero123_camera_projects_like_blender(tmp_path):
    """Independent of the conversion: Blender's camera looks down -z with y up, so a point
    at Blender camera coordinates p lands at u = cx + f px / -pz, v = cy - f py / -pz."""
    cams = _cams(2)
    folder = _render(tmp_path / "objs" / "o", cams, size=(64, 48))
    (row,) = _rows(tmp_path / "objs")
    c2w, K, wh = _row_cameras(row)
    f = 35.0 / 32.0 * 64  # Blender's AUTO sensor fit spans the larger side
    assert wh.tolist() == [[64, 48], [64, 48]]
    point = np.array([0.1, -0.2, 0.15])
    for v in range(2):
        rt = np.load(folder / f"{v:03d}.npy").astype(np.float64)
        p = rt[:, :3] @ point + rt[:, 3]
        expected = [32 + f * p[0] / -p[2], 24 - f * p[1] / -p[2]]
        x = K[v] @ (c2w[v, :3, :3].T @ (point - c2w[v, :3, 3]))
        assert x[2] > 0 and np.allclose(x[:2] / x[2], expected)


def test_focal_and_sensor_are_params(tmp_path):
    _render(tmp_path / "objs" / "o", _cams(2), size=(48, 48))
    (row,) = _rows(tmp_path / "objs", focal_mm=50, sensor_mm=36.0)
    _, K, _ = _row_cameras(row)
    assert np.allclose(K[:, 0, 0], 50 / 36 * 48) and np.allclose(K[:, 1, 1], 50 / 36 * 48)
    for spec, key in [
        ({"focal_mm": 0}, "focal_mm"),
        ({"focal_mm": "35"}, "focal_mm"),
        ({"sensor_mm": -1.0}, "sensor_mm"),
        ({"sensor_mm": float("inf")}, "sensor_mm"),
        ({"layout": "zero123"}, "layout"),  # the layout is detected, not a key
    ]:
        with pytest.raises(ParamError, match=key):
            build(ScenesSource.Params, {"kind": "scenes", "path": "x", **spec}, "source")


def test_a_4x4_world_to_camera_is_read_too(tmp_path):
    cams = _cams(2)
    folder = _render(tmp_path / "objs" / "o", cams)
    rt = np.load(folder / "001.npy")
    np.save(folder / "001.npy", np.vstack([rt, [0, 0, 0, 1]]))
    (row,) = _rows(tmp_path / "objs")
    assert np.allclose(_row_cameras(row)[0], cams, atol=1e-5)


def test_json_views_keep_their_reader_beside_npy_renders(tmp_path):
    """A folder with NNN.json views is read as before (the json carries the intrinsics);
    the npy layout applies only to folders without them."""
    cams = _cams(2)
    _render(tmp_path / "objs" / "npy", cams)
    folder = _render(tmp_path / "objs" / "json", cams)
    for i, cam in enumerate(cams):
        view = {"c2w": cam.tolist(), "convention": "opencv", "fx": 20.0}
        (folder / f"{i:03d}.json").write_text(json.dumps(view))
    rows = {r["group"]: r for r in _rows(tmp_path / "objs")}
    assert np.allclose(_row_cameras(rows["json"])[1][:, 0, 0], 20.0)
    assert np.allclose(_row_cameras(rows["npy"])[1][:, 0, 0], 35.0)
    for row in rows.values():
        assert np.allclose(_row_cameras(row)[0], cams, atol=1e-5)


# --- broken renders -------------------------------------------------------------------------


def _save_raw(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("change", "error", "detail"),
    [
        (lambda f: (f / "002.npy").unlink(), "BadSceneFile", "002.png has no 002.npy"),
        (lambda f: np.save(f / "001.npy", np.eye(3)), "BadSceneFile", "shape (3, 3)"),
        (lambda f: np.save(f / "001.npy", np.full((3, 4), np.nan)), "BadCamera", "NaN"),
        (
            lambda f: np.save(f / "001.npy", np.hstack([np.diag([2.0, 1, 1]), np.zeros((3, 1))])),
            "BadCamera",
            "proper rotation",
        ),
        (
            lambda f: np.save(f / "001.npy", np.hstack([np.diag([1.0, 1, -1]), np.ones((3, 1))])),
            "BadCamera",
            "proper rotation",
        ),
        (lambda f: _save_raw(f / "001.npy", b"not an array"), "BadSceneFile", "not a .npy"),
        (
            lambda f: np.save(f / "001.npy", np.array([[{}] * 4] * 3, dtype=object)),
            "BadSceneFile",
            "object",
        ),
        (lambda f: np.save(f / "001.npy", np.array([["a"] * 4] * 3)), "BadSceneFile", "dtype"),
        (
            lambda f: _save_raw(f / "001.npy", b"\x93NUMPY" + b"x" * 9000),
            "BadSceneFile",
            "TooLarge",
        ),
        (
            lambda f: _save_raw(f / "001.npy", (f / "000.npy").read_bytes()[:-8]),
            "BadSceneFile",
            "truncated",
        ),
    ],
)
def test_bad_render_files_are_named_scene_errors(tmp_path, change, error, detail):
    folder = _render(tmp_path / "objs" / "o", _cams(3))
    change(folder)
    (row,) = _rows(tmp_path / "objs")
    message = row["group_error"]
    assert message is not None and message.startswith(f"{error}: "), message
    assert detail in message and str(folder) in message and "\n" not in message


def test_a_camera_without_its_image_is_a_per_view_error(tmp_path):
    folder = _render(tmp_path / "objs" / "o", _cams(3))
    (folder / "001.png").unlink()
    (row,) = _rows(tmp_path / "objs", views=[3, 3])
    assert row["group_error"] is None
    assert row["source_error"] == [None, f"MissingFile: {folder / '001.png'} does not exist", None]


def test_cameras_without_any_image_are_one_error_row(tmp_path):
    folder = _render(tmp_path / "objs" / "o", _cams(2))
    for png in folder.glob("*.png"):
        png.unlink()
    (row,) = _rows(tmp_path / "objs")
    assert row["group_error"].startswith(f"BadSceneFile: {folder}: ")
    assert "NNN.png" in row["group_error"]


# --- a source that yields no scene ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "looked_for"),
    [
        ("objaverse", "NNN.png + NNN.npy"),
        ("objaverse", "NNN.json"),
        ("nerfstudio", "transforms.json"),
        ("co3d", "frame_annotations.jgz"),
    ],
)
@pytest.mark.parametrize("contents", ["empty", "unrelated"])
def test_a_source_without_scenes_is_an_error_naming_what_was_looked_for(
    tmp_path, fmt, looked_for, contents
):
    root = tmp_path / "data"
    root.mkdir()
    if contents == "unrelated":
        (root / "notes.txt").write_text("hello")
        Image.new("RGB", (8, 8)).save(root / "000.png")  # an image without a camera
        (root / "sub").mkdir()
        (root / "sub" / "cameras.npy").write_bytes(b"")
    with pytest.raises(SourceError) as info:
        scene_manifest({"kind": "scenes", "path": str(root), "format": fmt}, ".")
    message = str(info.value)
    assert str(root) in message and looked_for in message and fmt in message
    assert "no scene" in message and "\n" not in message


def test_a_co3d_category_without_sequences_is_an_error(tmp_path):
    import gzip

    (tmp_path / "cars").mkdir()
    with gzip.open(tmp_path / "cars" / "frame_annotations.jgz", "wt") as fh:
        json.dump([], fh)
    with pytest.raises(SourceError, match="no scene"):
        scene_manifest({"kind": "scenes", "path": str(tmp_path), "format": "co3d"}, ".")
