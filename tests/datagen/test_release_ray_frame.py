"""Our rays and cameras against the released OneDiffusion loader's own math.

The release (``onediffusion/dataset/multitask/multiview.py`` and ``raydiff_utils.py``)
converts OpenCV cameras to PyTorch3D ones (``_cameras_from_opencv_projection``), normalises
them (``normalize_cameras``, ``first_camera_transform``) and unprojects an NDC grid
(``cameras_to_rays``). Its code is transcribed below, line for line, on a minimal stand-in
for the few PyTorch3D pieces it calls (``PerspectiveCameras`` in NDC, ``Rotate``,
``Translate``, ``Transform3d.compose/inverse/get_matrix``, row-vector convention as in
PyTorch3D: ``X_view = X_world @ R + T``), so the test needs no PyTorch3D install. Before the
fix the direction/moment x and y channels had the opposite sign (max difference ~4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen import cameras as C

# --------------------------------------------------------------------------- PyTorch3D stand-in


class Transform3d:
    """Row-vector 4x4 transforms, batched [N, 4, 4]: ``a.compose(b)`` applies a, then b."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.m = matrix

    def compose(self, other: Transform3d) -> Transform3d:
        return Transform3d(self.m @ other.m)

    def inverse(self) -> Transform3d:
        return Transform3d(torch.linalg.inv(self.m))

    def get_matrix(self) -> torch.Tensor:
        return self.m


def Rotate(R: torch.Tensor) -> Transform3d:  # noqa: N802 - PyTorch3D's name
    m = torch.eye(4, dtype=R.dtype).repeat(R.shape[0], 1, 1)
    m[:, :3, :3] = R
    return Transform3d(m)


def Translate(T: torch.Tensor) -> Transform3d:  # noqa: N802 - PyTorch3D's name
    m = torch.eye(4, dtype=T.dtype).repeat(T.shape[0], 1, 1)
    m[:, 3, :3] = T
    return Transform3d(m)


class PerspectiveCameras:
    """NDC cameras (``in_ndc=True``): x_ndc = f X / Z + p, +x left, +y up."""

    def __init__(self, R, T, focal_length, principal_point, image_size=None, device=None):
        self.R, self.T = R.clone(), T.clone()
        self.focal_length, self.principal_point = focal_length, principal_point

    def __len__(self) -> int:
        return self.R.shape[0]

    def clone(self) -> PerspectiveCameras:
        return PerspectiveCameras(self.R, self.T, self.focal_length, self.principal_point)

    def __iter__(self):
        for i in range(len(self)):
            yield PerspectiveCameras(
                self.R[i : i + 1],
                self.T[i : i + 1],
                self.focal_length[i : i + 1],
                self.principal_point[i : i + 1],
            )

    def get_world_to_view_transform(self) -> Transform3d:
        return Rotate(self.R).compose(Translate(self.T))

    def get_camera_center(self) -> torch.Tensor:
        return -torch.einsum("nb,nab->na", self.T, self.R)  # C = -T R^T

    def unproject_points(self, xy_depth, world_coordinates=True, from_ndc=True):
        """[P, 3] points (x_ndc, y_ndc, depth), the same for every camera -> [N, P, 3]."""
        assert world_coordinates and from_ndc
        xy = xy_depth[None, :, :2].expand(len(self), -1, -1)
        z = xy_depth[None, :, 2:3].expand(len(self), -1, -1)
        f, p = self.focal_length[:, None], self.principal_point[:, None]
        view = torch.cat([(xy - p) / f * z, z], dim=-1)
        return torch.einsum("npb,nab->npa", view - self.T[:, None], self.R)  # (X - T) R^T


# --------------------------------------------------------------------------- the release's code


def intersect_skew_lines_high_dim(p, r):
    dim = p.shape[-1]
    r = torch.nn.functional.normalize(r, dim=-1)
    eye = torch.eye(dim, dtype=p.dtype)[None, None]
    i_min_cov = eye - (r[..., None] * r[..., None, :])
    sum_proj = i_min_cov.matmul(p[..., None]).sum(dim=-3)
    return torch.linalg.lstsq(i_min_cov.sum(dim=-3), sum_proj).solution[..., 0]


def compute_optical_axis_intersection(cameras):
    centers = cameras.get_camera_center()
    optical_axis = torch.cat(
        (cameras.principal_point, torch.ones((len(cameras), 1), dtype=centers.dtype)), -1
    )
    pp = cameras.unproject_points(optical_axis, from_ndc=True, world_coordinates=True)
    pp = torch.diagonal(pp, dim1=0, dim2=1).T
    directions = pp - centers
    p_intersect = intersect_skew_lines_high_dim(centers[None, None], directions[None, None])
    p_intersect = p_intersect.squeeze().unsqueeze(0)
    return p_intersect, (p_intersect - centers[None, None]).norm(dim=-1)


def release_normalize_cameras(cameras, scale):
    new_cameras = cameras.clone()
    new_transform = new_cameras.get_world_to_view_transform()
    p_intersect, dist = compute_optical_axis_intersection(cameras)
    d = dist.squeeze(dim=1).squeeze(dim=0)[0]
    t = Rotate(new_cameras.R[0].unsqueeze(0)).inverse().compose(Translate(p_intersect))
    new_transform = t.compose(new_transform)
    new_cameras.R = new_transform.get_matrix()[:, :3, :3]
    new_cameras.T = new_transform.get_matrix()[:, 3, :3] / d * scale
    return new_cameras


def first_camera_transform(cameras):
    new_cameras = cameras.clone()
    new_transform = new_cameras.get_world_to_view_transform()
    t = (
        Rotate(new_cameras.R[0].unsqueeze(0))
        .compose(Translate(new_cameras.T[0].unsqueeze(0)))
        .inverse()
    )
    new_transform = t.compose(new_transform)
    new_cameras.R = new_transform.get_matrix()[:, :3, :3]
    new_cameras.T = new_transform.get_matrix()[:, 3, :3]
    return new_cameras


def cameras_from_opencv_projection(R, tvec, camera_matrix, image_size, normalize, scale):
    focal_length = torch.stack([camera_matrix[:, 0, 0], camera_matrix[:, 1, 1]], dim=-1)
    principal_point = camera_matrix[:, :2, 2]
    image_size_wh = image_size.to(R).flip(dims=(1,))
    s = image_size_wh.to(R).min(dim=1, keepdim=True)[0] / 2.0
    s = s.expand(-1, 2)
    c0 = image_size_wh / 2.0
    focal_pytorch3d = focal_length / s
    p0_pytorch3d = -(principal_point - c0) / s
    R_pytorch3d = R.clone().permute(0, 2, 1)  # noqa: N806 - the release's names
    T_pytorch3d = tvec.clone()  # noqa: N806
    R_pytorch3d[:, :, :2] *= -1
    T_pytorch3d[:, :2] *= -1
    cams = PerspectiveCameras(R_pytorch3d, T_pytorch3d, focal_pytorch3d, p0_pytorch3d)
    if normalize:
        cams = release_normalize_cameras(cams, scale)
    return first_camera_transform(cams)


def compute_ndc_coordinates(num_patches_x, num_patches_y):
    dx, dy = 1 / num_patches_x, 1 / num_patches_y
    min_y, min_x = 1 - dy, 1 - dx
    y, x = torch.meshgrid(
        torch.linspace(min_y, -min_y, num_patches_y, dtype=torch.float64),
        torch.linspace(min_x, -min_x, num_patches_x, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def cameras_to_rays(cameras, num_patches):
    grid = compute_ndc_coordinates(num_patches, num_patches).reshape(-1, 3)
    unprojected = torch.stack([c.unproject_points(grid)[0] for c in cameras])  # (N, P, 3)
    origins = cameras.get_camera_center().unsqueeze(1).repeat(1, num_patches**2, 1)
    directions = unprojected - origins
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return torch.cat([directions, torch.cross(origins, directions, dim=-1)], dim=-1)


def release_rays(c2w, K, side, grid, normalize=True, scale=C.DEFAULT_DISTANCE):
    """``calculate_rays`` + the dataset's latent form ``cat([r, r, r[..., :4]]) * 1.658``,
    as [V, 16, grid, grid] (the dataset's [V, g, g, 16], channels first)."""
    w2c = torch.linalg.inv(torch.as_tensor(c2w, dtype=torch.float64))
    Ks = torch.as_tensor(np.broadcast_to(K, (len(c2w), 3, 3)).copy(), dtype=torch.float64)
    sizes = torch.tensor([[side, side]] * len(c2w))
    cams = cameras_from_opencv_projection(
        w2c[:, :3, :3], w2c[:, :3, 3], Ks, sizes, normalize, scale
    )
    rays = cameras_to_rays(cams, grid).reshape(len(c2w), grid, grid, 6)
    rays = torch.cat([rays, rays, rays[..., :4]], dim=-1) * 1.658
    return rays.permute(0, 3, 1, 2).numpy()


# --------------------------------------------------------------------------- the checks


def _rig(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    views = 4
    rig = C.orbit_cameras(
        rng.uniform(0, 360, views), rng.uniform(-20, 50, views), rng.uniform(2, 5, views),
        rng.normal(size=3),
    )  # fmt: skip
    world = np.eye(4)  # an arbitrary world: the result must not depend on it
    world[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * np.array([1, 1, 1])
    if np.linalg.det(world[:3, :3]) < 0:
        world[:3, 0] *= -1
    world[:3, 3] = rng.normal(size=3) * 3
    return world @ rig, C.intrinsics_from_focal(1.3887 * 64, (64, 64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rays_equal_the_released_loaders(seed):
    c2w, K = _rig(seed)
    want = release_rays(c2w, K, 64, 8)
    ours = C.cameras_to_plucker(C.normalize_cameras(c2w)[0], K, (64, 64), (8, 8))
    np.testing.assert_allclose(ours, want, atol=2e-5)


def test_camera0_is_the_identity_of_the_releases_pytorch3d_frame():
    c2w, K = _rig(3)
    w2c = torch.linalg.inv(torch.as_tensor(c2w, dtype=torch.float64))
    Ks = torch.as_tensor(np.broadcast_to(K, (4, 3, 3)).copy(), dtype=torch.float64)
    cams = cameras_from_opencv_projection(
        w2c[:, :3, :3], w2c[:, :3, 3], Ks, torch.tensor([[64, 64]] * 4), True, C.DEFAULT_DISTANCE
    )
    np.testing.assert_allclose(cams.R[0].numpy(), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(cams.T[0].numpy(), np.zeros(3), atol=1e-9)
    # our stored cameras are those PyTorch3D cameras, as OpenCV c2w
    ours = C.normalize_cameras(c2w)[0]
    flip = np.diag([-1.0, -1.0, 1.0])  # PyTorch3D view axes -> OpenCV's
    for v in range(4):
        R, T = cams.R[v].numpy(), cams.T[v].numpy()
        np.testing.assert_allclose(ours[v, :3, :3], (R @ flip), atol=1e-9)  # cam -> world
        np.testing.assert_allclose(ours[v, :3, 3], -T @ R.T, atol=1e-9)  # the centre


def test_cameras_recovered_from_release_rays_are_the_normalised_rig():
    c2w, K = _rig(4)
    got, _ = C.plucker_to_cameras(release_rays(c2w, K, 64, 8), (64, 64), K)
    want = C.normalize_cameras(c2w)[0]
    for v in range(4):
        assert C.rotation_angle_deg(got[v, :3, :3], want[v, :3, :3]) < 0.01
    np.testing.assert_allclose(got[:, :3, 3], want[:, :3, 3], atol=1e-4)
