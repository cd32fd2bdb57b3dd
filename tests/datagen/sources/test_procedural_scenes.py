"""datagen.sources.scenes.procedural: the pictures agree with the cameras datagen.cameras defines, and
the nerfstudio files it writes read back as the same cameras."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from datagen.cameras import plucker_rays
from datagen.sources.scenes.formats import nerfstudio_scenes
from datagen.sources.scenes.procedural import (
    GROUND,
    SKY,
    SceneRender,
    procedural_scenes,
    render_scene,
    visible_points,
    write_nerfstudio_scene,
)


@pytest.fixture(scope="module")
def render() -> SceneRender:
    return render_scene(seed=3, frames=4, size=96)


def test_render_is_a_pure_function_of_the_seed(render):
    again = render_scene(seed=3, frames=4, size=96)
    other = render_scene(seed=4, frames=4, size=96)
    assert np.array_equal(render.images, again.images)
    assert np.array_equal(render.c2w, again.c2w)
    assert render.caption == again.caption
    assert not np.array_equal(render.images, other.images)
    assert render.images.shape == (4, 96, 96, 3) and render.images.dtype == np.uint8


def test_cameras_orbit_the_scene_with_a_plausible_field_of_view(render):
    r = render.c2w[:, :3, :3]
    assert np.allclose(np.swapaxes(r, 1, 2) @ r, np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(r), 1.0)
    fov = np.degrees(2 * np.arctan(0.5 * 96 / render.K[:, 0, 0]))
    assert np.all((fov >= 40) & (fov <= 60))
    assert np.allclose(render.K[:, :2, 2], 48.0)
    # every camera above the ground, looking down towards the centre, at a sane distance
    centres = render.c2w[:, :3, 3]
    assert np.all(centres[:, 2] > 0.3)
    assert np.all(render.c2w[:, 2, 2] < 0)  # optical axis points down
    dist = np.linalg.norm(centres - [0, 0, 0.3], axis=1)
    assert np.all((dist > 3.0) & (dist < 4.6))
    # the azimuth sweeps: consecutive cameras are distinct viewpoints
    assert np.all(np.linalg.norm(np.diff(centres, axis=0), axis=1) > 0.3)


def test_caption_names_every_shape(render):
    for shape in render.shapes:
        assert f"{shape.colour}" in render.caption and shape.kind in render.caption
    assert render.caption.endswith(f"on a {render.floor} floor") or render.caption.endswith(
        f"on an {render.floor} floor"
    )
    assert 2 <= len(render.shapes) <= 4


def test_every_frame_shows_objects_ground_and_sky(render):
    for f in range(render.frames):
        ids = render.shape_id[f]
        assert (ids >= 1).mean() > 0.02, f"frame {f} shows almost no object"
        assert (ids == GROUND).any() and (ids == SKY).any()
        assert render.images[f].std() > 10  # textured, not a flat picture


def test_a_scene_point_lies_on_the_plucker_ray_of_the_pixel_it_renders_to(render):
    """The renderer's pixels follow datagen.cameras' conventions (half-pixel centres, OpenCV
    axes, d = R K^-1 [u, v, 1]): |p x d - m| is the distance from p to the ray line."""
    H, W = render.size
    for f in range(render.frames):
        pts = visible_points(render, f, n=300, seed=f)
        assert len(pts.points) == 300
        rays = plucker_rays(render.c2w[f], render.K[f], (H, W), grid=(H, W))[0]
        rows, cols = pts.pixels[:, 0], pts.pixels[:, 1]
        d = rays[:3, rows, cols].T.astype(np.float64)
        m = rays[3:, rows, cols].T.astype(np.float64)
        off = np.linalg.norm(np.cross(pts.points, d) - m, axis=1)
        # float32 rays: relative to the point's and the camera's distance from the origin
        # (ground points near the horizon are hundreds of units away)
        scale = np.linalg.norm(pts.points, axis=1) + np.linalg.norm(render.c2w[f, :3, 3])
        assert (off / scale).max() < 1e-6
        # ...and not on the ray of the next pixel: the check can fail
        nxt = np.minimum(cols + 1, W - 1)
        d2 = rays[:3, rows, nxt].T.astype(np.float64)
        m2 = rays[3:, rows, nxt].T.astype(np.float64)
        off2 = np.linalg.norm(np.cross(pts.points, d2) - m2, axis=1)
        assert np.median((off2 / scale)[nxt != cols]) > 100 * (off / scale).max()


def test_visible_points_lie_on_their_shapes_surface(render):
    for f in range(render.frames):
        pts = visible_points(render, f, n=300, seed=10 + f)
        for p, sid in zip(pts.points, pts.shape_id, strict=True):
            if sid == GROUND:
                assert abs(p[2]) < 1e-9
                continue
            shape = render.shapes[sid - 1]
            local = p - np.asarray(shape.centre)
            if shape.kind == "sphere":
                assert abs(np.linalg.norm(local) - shape.radius) < 1e-9
            else:
                c, s = np.cos(shape.yaw), np.sin(shape.yaw)
                box = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) @ local
                assert abs(np.max(np.abs(box) / np.asarray(shape.size)) - 1) < 1e-9


def test_a_shape_centre_projects_onto_that_shape_or_one_in_front_of_it(render):
    """Pinhole projection (K R^T (X - C)) and the picture agree: the pixel a shape's centre
    projects to shows a shape at most as far as that centre (never ground or sky)."""
    H, W = render.size
    checked = 0
    for f in range(render.frames):
        rot, eye = render.c2w[f, :3, :3], render.c2w[f, :3, 3]
        for shape in render.shapes:
            x = render.K[f] @ (rot.T @ (np.asarray(shape.centre) - eye))
            u, v = x[0] / x[2], x[1] / x[2]
            if x[2] <= 0 or not (1 <= u < W - 1 and 1 <= v < H - 1):
                continue
            i, j = int(v), int(u)
            assert render.shape_id[f, i, j] >= 1
            assert render.depth[f, i, j] <= np.linalg.norm(np.asarray(shape.centre) - eye)
            checked += 1
    assert checked >= render.frames  # most centres are in view


def test_a_256_frame_renders_well_under_a_second():
    render_scene(seed=0, frames=1, size=32)  # warm numpy up
    start = time.perf_counter()
    render_scene(seed=1, frames=2, size=256)
    assert (time.perf_counter() - start) / 2 < 1.0


def test_written_scene_reads_back_as_the_generator_cameras(tmp_path, render):
    folder = write_nerfstudio_scene(tmp_path / "s", render, caption=render.caption)
    doc = json.loads((folder / "transforms.json").read_text())
    assert doc["frames"][0]["file_path"] == "images/frame_00001.png"
    assert (doc["w"], doc["h"]) == (96, 96)
    # OpenGL on disk: the camera's z column points away from what it looks at
    assert np.allclose(
        np.asarray(doc["frames"][0]["transform_matrix"])[:3, 2], -render.c2w[0, :3, 2]
    )
    (scene,) = nerfstudio_scenes(str(folder))
    assert scene.error is None and scene.caption == render.caption
    assert len(scene.frames) == render.frames
    for f, frame in enumerate(scene.frames):
        assert np.abs(frame.c2w - render.c2w[f]).max() < 1e-6
        assert np.abs(frame.K - render.K[f]).max() < 1e-6
        assert frame.size == (96, 96) and frame.error is None
        assert np.array_equal(np.asarray(Image.open(frame.uri)), render.images[f])


def test_half_size_images_are_box_averages(tmp_path, render):
    folder = write_nerfstudio_scene(tmp_path / "s", render)
    half = np.asarray(Image.open(folder / "images_2" / "frame_00002.png")).astype(float)
    full = render.images[1].astype(float)
    box = full.reshape(48, 2, 48, 2, 3).mean(axis=(1, 3))
    assert half.shape == (48, 48, 3) and np.abs(half - box).max() <= 1.0


def test_cache_regenerates_only_what_is_missing_or_stale(tmp_path):
    cache = tmp_path / "cache"
    first = procedural_scenes(cache, n=2, frames=3, size=32)
    assert [p.name for p in first] == ["scene_0000", "scene_0001"]
    stamps = {p: (p / "transforms.json").stat().st_mtime_ns for p in first}
    again = procedural_scenes(cache, n=2, frames=3, size=32)
    assert again == first
    assert all((p / "transforms.json").stat().st_mtime_ns == stamps[p] for p in first)
    (first[1] / "images_2" / "frame_00002.png").unlink()  # a file gone: redrawn
    procedural_scenes(cache, n=2, frames=3, size=32)
    assert (first[1] / "images_2" / "frame_00002.png").is_file()
    assert (first[0] / "transforms.json").stat().st_mtime_ns == stamps[first[0]]
    procedural_scenes(cache, n=2, frames=3, size=40)  # other size: stale, redrawn
    assert Image.open(first[0] / "images" / "frame_00001.png").size == (40, 40)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folders left
