"""datagen.cameras: rays both ways, convention converters, normalisation, pose metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datagen import cameras as C


def rotation(axis: str, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    return q * np.sign(np.linalg.det(q))[:, None, None]


def random_rig(
    rng: np.random.Generator, views: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    H, W = size
    c2w = np.tile(np.eye(4), (views, 1, 1))
    c2w[:, :3, :3] = random_rotations(rng, views)
    c2w[:, :3, 3] = rng.normal(size=(views, 3)) * 2.0
    K = np.tile(np.eye(3), (views, 1, 1))
    K[:, 0, 0] = rng.uniform(0.6, 2.0, views) * W
    K[:, 1, 1] = K[:, 0, 0] * rng.uniform(0.9, 1.1, views)
    K[:, 0, 2] = W / 2 + rng.uniform(-0.1, 0.1, views) * W
    K[:, 1, 2] = H / 2 + rng.uniform(-0.1, 0.1, views) * H
    return c2w, K


def project(c2w: np.ndarray, K: np.ndarray, point: np.ndarray) -> np.ndarray:
    x = np.linalg.inv(c2w) @ np.append(point, 1.0)
    uvw = K @ x[:3]
    return uvw[:2] / uvw[2]


# --------------------------------------------------------------------------- round trips

CASES = [
    (3, (512, 512), None),  # the latent grid, 64x64
    (5, (480, 640), (5, 7)),
    (2, (100, 60), (7, 5)),
    (4, (256, 384), (2, 2)),
    (1, (64, 64), (8, 8)),
]


@pytest.mark.parametrize("recover_k", [False, True])
@pytest.mark.parametrize(("views", "size", "grid"), CASES)
def test_cameras_rays_cameras_round_trip(views, size, grid, recover_k):
    rng = np.random.default_rng(views * 1000 + size[0])
    c2w, K = random_rig(rng, views, size)
    rays = C.plucker_rays(c2w, K, size, grid)
    h, w = grid or (size[0] // 8, size[1] // 8)
    assert rays.shape == (views, 6, h, w) and rays.dtype == np.float32
    got_c2w, got_K = C.plucker_to_cameras(rays, size, None if recover_k else K)
    assert got_c2w.shape == (views, 4, 4) and got_K.shape == (views, 3, 3)
    np.testing.assert_allclose(got_c2w, c2w, atol=1e-4)
    np.testing.assert_allclose(np.linalg.det(got_c2w[:, :3, :3]), 1.0, atol=1e-9)
    # float32 rays: K compared in units of the image size (1e-4 of it)
    np.testing.assert_allclose(got_K / max(size), K / max(size), atol=1e-4)


def test_round_trip_through_the_latent_form():
    rng = np.random.default_rng(7)
    c2w, K = random_rig(rng, 4, (512, 512))
    latent = C.cameras_to_plucker(c2w, K, (512, 512))
    assert latent.shape == (4, 16, 64, 64) and latent.dtype == np.float32
    got_c2w, got_K = C.plucker_to_cameras(latent, (512, 512))
    np.testing.assert_allclose(got_c2w, c2w, atol=1e-4)
    np.testing.assert_allclose(got_K / 512, K / 512, atol=1e-4)


def test_single_camera_inputs_and_a_shared_K():
    rng = np.random.default_rng(3)
    c2w, K = random_rig(rng, 3, (64, 96))
    one = C.plucker_rays(c2w[1], K[1], (64, 96))
    assert one.shape == (1, 6, 8, 12)
    shared = C.plucker_rays(c2w, K[0], (64, 96))
    np.testing.assert_array_equal(shared[2], C.plucker_rays(c2w[2], K[0], (64, 96))[0])


# --------------------------------------------------------------------------- hand-computed rays


def test_rays_of_hand_built_cameras():
    K = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    n = np.sqrt(0.25**2 * 2 + 1)
    # pixel centres u, v in {0.5, 1.5}: K^-1 [u, v, 1] = [(u - 1) / 2, (v - 1) / 2, 1]
    want_d = (
        np.array(
            [[[-0.25, -0.25, 1], [0.25, -0.25, 1]], [[-0.25, 0.25, 1], [0.25, 0.25, 1]]]
        ).transpose(2, 0, 1)
        / n
    )  # [3, h=2, w=2]: row i is v, column j is u
    rays = C.plucker_rays(np.eye(4), K, (2, 2), (2, 2))[0]
    np.testing.assert_allclose(rays[:3], want_d, atol=1e-7)
    np.testing.assert_allclose(rays[3:], 0.0, atol=1e-7)

    moved = np.eye(4)
    moved[:3, 3] = [1.0, 2.0, 3.0]
    rays = C.plucker_rays(moved, K, (2, 2), (2, 2))[0]
    # pixel (0, 0): d = (-0.25, -0.25, 1) / n; o x d = (2*1 - 3*(-0.25), 3*(-0.25) - 1*1,
    # 1*(-0.25) - 2*(-0.25)) / n
    np.testing.assert_allclose(rays[:, 0, 0], np.r_[-0.25, -0.25, 1, 2.75, -1.75, 0.25] / n, 1e-6)

    turned = np.eye(4)
    turned[:3, :3] = rotation("y", 90.0)  # camera z (forward) -> world +x... and x -> -z
    rays = C.plucker_rays(turned, K, (2, 2), (2, 2))[0]
    # pixel (1, 1): camera dir (0.25, 0.25, 1) -> world (1, 0.25, -0.25)
    np.testing.assert_allclose(rays[:3, 1, 1], np.r_[1.0, 0.25, -0.25] / n, atol=1e-7)


def test_default_grid_is_the_latent_grid_and_cells_use_half_pixel_centres():
    K = C.intrinsics_from_focal(100.0, (64, 48))
    rays = C.plucker_rays(np.eye(4), K, (64, 48))
    assert rays.shape == (1, 6, 8, 6)
    # cell (0, 0) of 8x8-pixel cells: centre (4, 4)
    d = np.array([(4 - 24) / 100, (4 - 32) / 100, 1.0])
    np.testing.assert_allclose(rays[0, :3, 0, 0], d / np.linalg.norm(d), atol=1e-7)


# --------------------------------------------------------------------------- latent channels


def test_latent_layout_and_its_inverse():
    r = np.random.default_rng(0).normal(size=(2, 6, 3, 4)).astype(np.float32)
    x = C.to_latent_channels(r)
    want = np.concatenate([r, r, r[:, :4]], axis=1) * np.float32(1.658)
    np.testing.assert_array_equal(x, want)
    assert x.dtype == np.float32
    np.testing.assert_allclose(C.from_latent_channels(x), r, atol=1e-6)
    np.testing.assert_allclose(C.to_latent_channels(r, 9, 2.0)[:, 6:], r[:, :3] * 2.0)
    assert C.to_latent_channels(r[0], 6, 1.0).shape == (6, 3, 4)


def test_from_latent_channels_averages_the_copies():
    x = np.zeros((16, 1, 1))
    x[0], x[6], x[12] = 1.0, 2.0, 6.0  # three copies of channel 0
    x[5], x[11] = 3.0, 5.0  # two copies of channel 5
    got = C.from_latent_channels(x, scale=1.0)[:, 0, 0]
    np.testing.assert_allclose(got, [3.0, 0, 0, 0, 0, 4.0])


# --------------------------------------------------------------------------- conventions


def test_opengl_to_opencv_projects_a_known_point():
    gl = np.eye(4)
    gl[:3, 3] = [0.0, 0.0, 5.0]  # OpenGL: looks down -z (at the origin), y up
    cv = C.opengl_to_opencv(gl)
    K = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    # world (1, 2, 0): right of and above the origin -> right of and above the image centre
    np.testing.assert_allclose(project(cv, K, np.array([1.0, 2.0, 0.0])), [70.0, 10.0])
    np.testing.assert_allclose(cv[:3, 2], [0, 0, -1])
    np.testing.assert_allclose(C.opencv_to_opengl(cv), gl)
    batch = C.opengl_to_opencv(np.stack([gl, gl]))
    assert batch.shape == (2, 4, 4)


@pytest.mark.parametrize("size", [(300, 400), (400, 300)])
def test_pytorch3d_to_opencv_lands_on_the_same_pixel(size):
    H, W = size
    rng = np.random.default_rng(H)
    R = random_rotations(rng, 1)[0]
    T = np.array([0.1, -0.2, 4.0])
    f_ndc, p_ndc = np.array([1.8, 1.6]), np.array([0.05, -0.1])
    c2w, K = C.pytorch3d_to_opencv(R, T, f_ndc, p_ndc, size)
    s = min(H, W) / 2
    for point in rng.normal(size=(5, 3)) * 0.5:
        # PyTorch3D by hand: row-vector world-to-view, NDC +x left, +y up, isotropic scale s
        xv = point @ R + T
        x_ndc = f_ndc * xv[:2] / xv[2] + p_ndc
        want = np.array([W / 2 - x_ndc[0] * s, H / 2 - x_ndc[1] * s])
        np.testing.assert_allclose(project(c2w, K, point), want, atol=1e-9)
    # the camera centre is where X_view = 0
    np.testing.assert_allclose(c2w[:3, 3] @ R + T, 0.0, atol=1e-12)
    c2w_b, K_b = C.pytorch3d_to_opencv(R[None], T[None], 1.8, p_ndc, size)
    assert c2w_b.shape == (1, 4, 4) and K_b[0, 0, 0] == K_b[0, 1, 1] == 1.8 * s


def test_look_at_and_orbit():
    c2w = C.look_at([3.0, 0.0, 1.0], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(c2w[:3, 2], [-1, 0, 0], atol=1e-12)  # towards the target
    np.testing.assert_allclose(c2w[:3, 1], [0, 0, -1], atol=1e-12)  # down = -up
    np.testing.assert_allclose(c2w[:3, 0], [0, 1, 0], atol=1e-12)  # right (facing -x, z up)
    down = C.look_at([0.0, 0.0, 5.0], [0.0, 0.0, 0.0])  # up parallel to the view
    np.testing.assert_allclose(down[:3, :3].T @ down[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(down[:3, :3]), 1.0)
    np.testing.assert_allclose(down[:3, 2], [0, 0, -1])

    target = np.array([1.0, 2.0, 3.0])
    rig = C.orbit_cameras([0, 90, 200, 10], [10, 30, -20, 90], 4.0, target)
    K = C.intrinsics_from_focal(50.0, (40, 60))
    for cam in rig:
        np.testing.assert_allclose(np.linalg.norm(cam[:3, 3] - target), 4.0)
        np.testing.assert_allclose(project(cam, K, target), [30.0, 20.0], atol=1e-9)
    np.testing.assert_allclose(rig[1, :3, 3], target + 4 * np.r_[0, np.cos(np.pi / 6), 0.5])


def test_crop_and_resize_intrinsics_keep_the_rays():
    rng = np.random.default_rng(5)
    c2w, K = random_rig(rng, 2, (60, 80))
    full = C.plucker_rays(c2w, K, (60, 80), (60, 80))
    crop = C.plucker_rays(c2w, C.crop_intrinsics(K, 10, 20), (30, 40), (30, 40))
    np.testing.assert_allclose(crop, full[:, :, 20:50, 10:50], atol=1e-6)
    grid = (6, 8)
    base = C.plucker_rays(c2w, K, (60, 80), grid)
    resized = C.plucker_rays(c2w, C.resize_intrinsics(K, 1.5, 0.5), (30, 120), grid)
    np.testing.assert_allclose(resized, base, atol=1e-6)
    want = [[3.0, 0, 10], [0, 4.0, 5], [0, 0, 1]]
    np.testing.assert_allclose(C.intrinsics_from_focal((3.0, 4.0), (10, 20)), want)


# --------------------------------------------------------------------------- normalisation


def test_normalize_puts_camera_0_at_camera0_and_the_look_at_point_at_the_distance():
    target = np.array([0.5, -1.0, 2.0])
    rig = C.orbit_cameras([30, 100, 170, 250], [20, 10, 40, -5], [4.0, 5.0, 3.0, 6.0], target)
    out, scale = C.normalize_cameras(rig)
    np.testing.assert_allclose(out[0], C.CAMERA0, atol=1e-12)
    np.testing.assert_allclose(scale, C.DEFAULT_DISTANCE / 4.0)
    moved = scale * (C.CAMERA0 @ np.linalg.inv(rig[0]) @ np.append(target, 1.0))[:3]
    np.testing.assert_allclose(np.linalg.norm(moved), 1.7)
    np.testing.assert_allclose(moved, [0, 0, 1.7], atol=1e-12)  # on camera 0's axis
    for cam in out:  # every camera still looks at the (moved) target
        K = C.intrinsics_from_focal(10.0, (20, 20))
        np.testing.assert_allclose(project(cam, K, moved), [10.0, 10.0], atol=1e-9)


def test_normalize_is_a_similarity_of_the_rays():
    rng = np.random.default_rng(11)
    rig = C.orbit_cameras(rng.uniform(0, 360, 3), rng.uniform(-30, 60, 3), 3.0, [1, 1, 0])
    K = C.intrinsics_from_focal(40.0, (32, 32))
    out, s = C.normalize_cameras(rig, distance=2.5)
    r0, t0 = rig[0, :3, :3] @ C.CAMERA0[:3, :3], rig[0, :3, 3]
    before = C.plucker_rays(rig, K, (32, 32)).astype(np.float64)
    after = C.plucker_rays(out, K, (32, 32)).astype(np.float64)
    d, m = before[:, :3], before[:, 3:]
    # X' = s F R0^T (X - t0), F = CAMERA0's rotation: d' = F R0^T d, m' = s F R0^T (m - t0 x d)
    d_want = np.einsum("ba,vbhw->vahw", r0, d)
    m_new = m - np.cross(t0[None, :, None, None], d, axis=1)
    m_want = s * np.einsum("ba,vbhw->vahw", r0, m_new)
    np.testing.assert_allclose(after[:, :3], d_want, atol=1e-6)
    np.testing.assert_allclose(after[:, 3:], m_want, atol=1e-5)


def test_normalize_fallbacks():
    # parallel axes: mean distance from camera 0 to the others
    rig = np.tile(np.eye(4), (3, 1, 1))
    rig[:, :3, 3] = [[0, 0, 0], [1, 0, 0], [3, 0, 0]]
    out, scale = C.normalize_cameras(rig)
    np.testing.assert_allclose(scale, 1.7 / 2.0)
    np.testing.assert_allclose(out[2, :3, 3], [-3 * 0.85, 0, 0])  # x left in CAMERA0's world
    # axes meeting behind camera 0: the same fallback
    behind = np.stack([C.look_at([0, 0, 0], [0, 0, 1]), C.look_at([2, 0, -2], [0, 0, -4])])
    _, scale = C.normalize_cameras(behind)
    np.testing.assert_allclose(scale, 1.7 / np.sqrt(8.0))
    # one camera, or all centres equal: scale 1
    one = C.look_at([1, 2, 3], [0, 0, 0])
    out, scale = C.normalize_cameras(one)
    assert scale == 1.0 and out.shape == (1, 4, 4)
    np.testing.assert_allclose(out[0], C.CAMERA0, atol=1e-12)
    spin = np.stack([np.eye(4), np.eye(4)])
    spin[1, :3, :3] = rotation("z", 40.0)
    assert C.normalize_cameras(spin)[1] == 1.0


# --------------------------------------------------------------------------- metrics


def test_rotation_angle_and_umeyama():
    np.testing.assert_allclose(C.rotation_angle_deg(np.eye(3), rotation("x", 20.0)), 20.0)
    np.testing.assert_allclose(C.rotation_angle_deg(np.eye(3), rotation("y", 1e-5)), 1e-5, 1e-6)
    np.testing.assert_allclose(C.rotation_angle_deg(np.eye(3), rotation("z", 180.0)), 180.0)
    rng = np.random.default_rng(2)
    src = rng.normal(size=(6, 3))
    R = random_rotations(rng, 1)[0]
    s, r, t = C.umeyama(src, 2.5 * src @ R.T + [1, 2, 3])
    np.testing.assert_allclose([s, *t], [2.5, 1, 2, 3], atol=1e-9)
    np.testing.assert_allclose(r, R, atol=1e-9)


def test_metrics_of_perfect_and_similar_predictions():
    rig = C.orbit_cameras([0, 70, 150, 220, 300], [10, 20, 0, 30, 15], [3, 4, 3.5, 5, 4])
    want = {"rotation_acc@15": 1.0, "center_acc@0.1": 1.0, "center_acc@0.3": 1.0}
    assert C.pose_metrics(rig, rig) == want
    Q = random_rotations(np.random.default_rng(4), 1)[0]
    moved = rig.copy()
    moved[:, :3, :3] = Q @ rig[:, :3, :3]
    moved[:, :3, 3] = 0.3 * rig[:, :3, 3] @ Q.T + [5, -1, 2]
    assert C.pose_metrics(moved, rig) == want


def test_metrics_of_known_perturbations():
    rig = C.orbit_cameras([0, 120, 240], [10, 20, 30], 4.0)
    bad = rig.copy()
    bad[1, :3, :3] = rig[1, :3, :3] @ rotation("z", 20.0)  # about its own optical axis
    # the 4 ordered pairs (of 6) that involve camera 1 fail
    np.testing.assert_allclose(C.relative_rotation_accuracy(bad[:, :3, :3], rig[:, :3, :3]), 2 / 6)
    assert C.relative_rotation_accuracy(bad[:, :3, :3], rig[:, :3, :3], 25.0) == 1.0

    # 8 cameras on a circle of radius 4 (scene scale 4); camera 3 moved by 0.2 x scale: after
    # the similarity alignment its error is still > 0.1 x scale (~0.16) but < 0.3 x scale, the
    # others' < 0.1 x scale
    ring = C.orbit_cameras(np.arange(8) * 45.0, 0.0, 4.0)
    off = ring.copy()
    off[3, :3, 3] += [0.0, 0.0, 0.8]
    got = C.pose_metrics(off, ring)
    assert got == {"rotation_acc@15": 1.0, "center_acc@0.1": 7 / 8, "center_acc@0.3": 1.0}
    assert set(C.pose_metrics(ring, ring, 5, (0.05,))) == {"rotation_acc@5", "center_acc@0.05"}


# --------------------------------------------------------------------------- nerfstudio

# OpenGL camera at (5, 0, 0) looking at the origin, up +z: x_cam = +y, y_cam = +z, back = +x.
_GL = [[0, 0, 1, 5], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
_TOP = {"fl_x": 100.0, "cx": 64.5, "cy": 48.5, "w": 128, "h": 96}


def test_nerfstudio_camera_of_a_hand_built_frame():
    c2w, K, size = C.nerfstudio_camera({"transform_matrix": _GL}, _TOP, "f0")
    assert size == (128, 96)
    np.testing.assert_array_equal(K, [[100.0, 0, 64.5], [0, 100.0, 48.5], [0, 0, 1]])
    np.testing.assert_array_equal(c2w[:3, 2], [-1, 0, 0])  # OpenCV z looks at the origin
    # (0, 1, 0.5) is OpenCV (1, -0.5, 5) in the camera: u = 64.5 + 20, v = 48.5 - 10
    np.testing.assert_allclose(project(c2w, K, np.array([0.0, 1.0, 0.5])), [84.5, 38.5])
    three_by_four, _, _ = C.nerfstudio_camera({"transform_matrix": _GL[:3]}, _TOP, "f0")
    np.testing.assert_array_equal(three_by_four, c2w)


def test_nerfstudio_frame_keys_beat_the_top_level_and_defaults_fill_in():
    frame = {"transform_matrix": _GL, "fl_x": 80.0, "fl_y": 81.0, "w": 64, "h": 32, "cx": None}
    _, K, size = C.nerfstudio_camera(frame, _TOP, "f")
    assert size == (64, 32)
    np.testing.assert_array_equal(K[:2], [[80.0, 0, 64.5], [0, 81.0, 48.5]])  # null: the top's
    top = {"fl_x": 50.0}
    _, K, size = C.nerfstudio_camera({"transform_matrix": _GL}, top, "f", size=(40, 30))
    assert size == (40, 30)  # no w / h in the file: the given size
    np.testing.assert_array_equal(K[:2], [[50.0, 0, 20.0], [0, 50.0, 15.0]])  # fy = fx, centre
    _, _, size = C.nerfstudio_camera({"transform_matrix": _GL}, _TOP, "f", size=(40, 30))
    assert size == (128, 96)  # w / h in the file win over the given size
    with pytest.raises(ValueError, match=r"^f: w is missing"):
        C.nerfstudio_camera({"transform_matrix": _GL}, top, "f")


def test_nerfstudio_camera_angles_give_focal_lengths():
    top = {"camera_angle_x": 0.8, "w": 80, "h": 60}
    _, K, _ = C.nerfstudio_camera({"transform_matrix": _GL}, top, "f")
    np.testing.assert_allclose([K[0, 0], K[1, 1]], [40 / np.tan(0.4)] * 2)  # fy = fx
    _, K, _ = C.nerfstudio_camera({"transform_matrix": _GL, "camera_angle_y": 0.6}, top, "f")
    np.testing.assert_allclose([K[0, 0], K[1, 1]], [40 / np.tan(0.4), 30 / np.tan(0.3)])
    _, K, _ = C.nerfstudio_camera({"transform_matrix": _GL, "fl_x": 7.0}, top, "f")
    assert K[0, 0] == 7.0  # fl_x beats camera_angle_x


_SCALED = np.diag([2.0, 1, 1, 1]).tolist()
_MIRRORED = np.diag([-1.0, 1, 1, 1]).tolist()


@pytest.mark.parametrize(
    ("change", "key", "camera"),
    [
        ({"fl_x": "wide"}, "fl_x", False),
        ({"fl_x": True}, "fl_x", False),
        ({"fl_x": None}, "fl_x", False),  # missing
        ({"fl_x": 0.0}, "fl_x", True),
        ({"fl_x": float("nan")}, "fl_x", True),
        ({"fl_y": -1.0}, "fl_y", True),
        ({"cx": float("inf")}, "cx", True),
        ({"cy": 10**400}, "cy", True),  # a json integer too big for a float
        ({"w": 12.5}, "w", False),
        ({"h": 0}, "h", False),
        ({"w": 1 << 17}, "w", False),
        ({"w": "128"}, "w", False),
        ({"fl_x": None, "camera_angle_x": 4.0}, "camera_angle_x", True),
        ({"transform_matrix": None}, "transform_matrix", False),
        ({"transform_matrix": [[1, 0], [0, 1]]}, "transform_matrix", False),
        ({"transform_matrix": [["a"] * 4] * 4}, "transform_matrix", False),
        ({"transform_matrix": [[float("nan")] * 4] * 4}, "transform_matrix", True),
        ({"transform_matrix": _SCALED}, "transform_matrix", True),
        ({"transform_matrix": _MIRRORED}, "transform_matrix", True),
        ({"transform_matrix": [*_GL[:3], [0, 0, 1, 1]]}, "transform_matrix", True),
    ],
)
def test_nerfstudio_camera_bad_values_are_one_value_error_naming_the_key(change, key, camera):
    frame = {"transform_matrix": _GL, **change}
    top = {**_TOP, **{k: None for k in change if k in _TOP}}  # the frame's value or nothing
    with pytest.raises(ValueError, match=rf"^frame 3: {key}\b") as info:
        C.nerfstudio_camera(frame, top, "frame 3")
    assert isinstance(info.value, C.CameraValueError) == camera, info.value
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^frame 3: not an object"):
        C.nerfstudio_camera([1, 2], _TOP, "frame 3")  # type: ignore[arg-type]


def _read_back(doc: dict) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    doc = json.loads(json.dumps(doc))  # through the file format
    cams = [C.nerfstudio_camera(f, doc, f"frame {i}") for i, f in enumerate(doc["frames"])]
    return np.stack([c[0] for c in cams]), np.stack([c[1] for c in cams]), [c[2] for c in cams]


def test_nerfstudio_transforms_round_trip_and_shared_intrinsics_at_the_top():
    rng = np.random.default_rng(5)
    c2w, K = random_rig(rng, 3, (48, 64))
    sizes = [(64, 48), (64, 48), (50, 40)]
    doc = C.nerfstudio_transforms(c2w, K, sizes, ["a.png", "b.png", "c.png"], caption="x")
    assert doc["camera_model"] == "OPENCV" and doc["caption"] == "x" and "fl_x" not in doc
    assert [f["file_path"] for f in doc["frames"]] == ["a.png", "b.png", "c.png"]
    assert doc["frames"][2]["w"] == 50 and doc["frames"][2]["fl_y"] == K[2, 1, 1]
    got_c2w, got_K, got_sizes = _read_back(doc)
    np.testing.assert_allclose(got_c2w, c2w, atol=1e-9)
    np.testing.assert_allclose(got_K, K, atol=1e-9)
    assert got_sizes == sizes
    np.testing.assert_array_equal(C.opengl_to_opencv(doc["frames"][0]["transform_matrix"]), c2w[0])
    # One K and size for every frame: written once, at the top level only.
    shared = C.nerfstudio_transforms(c2w, K[0], [(64, 48)] * 3, ["a", "b", "c"], generator={})
    assert shared["fl_x"] == K[0, 0, 0] and (shared["w"], shared["h"]) == (64, 48)
    assert all(set(f) == {"file_path", "transform_matrix"} for f in shared["frames"])
    assert shared["generator"] == {}
    got_c2w, got_K, got_sizes = _read_back(shared)
    np.testing.assert_allclose(got_c2w, c2w, atol=1e-9)
    np.testing.assert_allclose(got_K, np.stack([K[0]] * 3), atol=1e-9)
    assert got_sizes == [(64, 48)] * 3
    with pytest.raises(ValueError, match="fl_x"):
        C.nerfstudio_transforms(c2w, K, sizes, ["a", "b", "c"], fl_x=1.0)
    with pytest.raises(ValueError, match="file_paths"):
        C.nerfstudio_transforms(c2w, K, sizes, ["a", "b"])
    with pytest.raises(ValueError, match=r"sizes\[1\]: h"):
        C.nerfstudio_transforms(c2w, K, [(64, 48), (64, 0), (1, 1)], ["a", "b", "c"])


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_value_errors_naming_the_argument():
    K = C.intrinsics_from_focal(10.0, (8, 8))
    nan = np.eye(4)
    nan[0, 3] = np.nan
    inf = K.copy()
    inf[0, 0] = np.inf
    bad = [
        (lambda: C.plucker_rays(np.eye(3), K, (8, 8)), "c2w"),
        (lambda: C.plucker_rays(nan, K, (8, 8)), "c2w"),
        (lambda: C.plucker_rays(np.eye(4) * 2, K, (8, 8)), "c2w"),
        (lambda: C.plucker_rays(np.eye(4), K[:2], (8, 8)), "K"),
        (lambda: C.plucker_rays(np.eye(4), inf, (8, 8)), "K"),
        (lambda: C.plucker_rays(np.stack([np.eye(4)] * 2), np.stack([K] * 3), (8, 8)), "K"),
        (lambda: C.plucker_rays(np.eye(4), K, (8, -8)), "image_size"),
        (lambda: C.plucker_rays(np.eye(4), K, (8, 8), (0, 2)), "grid"),
        (lambda: C.plucker_rays(np.eye(4), K, "big"), "image_size"),
        (lambda: C.to_latent_channels(np.zeros((5, 2, 2))), "rays6"),
        (lambda: C.from_latent_channels(np.zeros((5, 2, 2))), "x"),
        (lambda: C.plucker_to_cameras(np.zeros((1, 5, 4, 4)), (8, 8)), "rays"),
        (lambda: C.plucker_to_cameras(np.full((1, 6, 4, 4), np.nan), (8, 8)), "rays"),
        (lambda: C.plucker_to_cameras(np.zeros((6, 4, 4)), (8, 8)), "rays"),
        (lambda: C.plucker_to_cameras(np.zeros((1, 6, 4, 4)), (8, 8)), "rays"),
        (lambda: C.normalize_cameras(np.zeros((0, 4, 4))), "c2w"),
        (lambda: C.pytorch3d_to_opencv(np.eye(3), [0, 0, np.nan], 1.0, [0, 0], (8, 8)), "T"),
        (lambda: C.pytorch3d_to_opencv(np.eye(3), [0, 0, 1], [1, 2, 3], [0, 0], (8, 8)), "focal"),
        (lambda: C.look_at([1, 1, 1], [1, 1, 1]), "look_at"),
        (lambda: C.pose_metrics(np.eye(4)[None], np.eye(4)[None]), "R_pred"),
        (lambda: C.pose_metrics(np.stack([np.eye(4)] * 2), np.stack([np.eye(4)] * 3)), "c2w"),
        (lambda: C.orbit_cameras([0, 1], [0, 1, 2], 1.0), "azimuths"),
    ]
    for call, name in bad:
        with pytest.raises(ValueError, match=name):
            call()
