"""``onegen eval`` on the camera benchmarks: GSO30 renders written exactly as EscherNet's
``render_mvs_25/model`` (RGBA PNG + Blender world-to-camera ``.npy``, lens 35 mm / sensor
32 mm) and CO3D v2 in RayDiffusion's ``co3d_v2_annotations/<category>_test.jgz`` (PyTorch3D
cameras, NDC intrinsics), from known OpenCV cameras: the readers must give those cameras back
(normalised as the trainer saw them), the cases must hold Table 2's layouts, and the
benchmarks run end to end with the tiny fit's checkpoint."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.cameras import CAMERA0, normalize_cameras, opencv_to_opengl, orbit_cameras
from tests.helpers.eval_cli import eval_cli
from training.evaluation import scene_benchmarks as SB

SIDE = 64  # the renders (EscherNet's are 512; the reader takes any size)
GEO = SB.RayGeometry(8, 16)


def _orbit(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return orbit_cameras(
        rng.uniform(0, 360, n), rng.uniform(-10, 40, n), 1.5 + rng.uniform(0, 0.5, n)
    )


def _image(seed: int, side: int, alpha: bool) -> Image.Image:
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, np.full_like(x, seed * 37 % 256)], -1)
    if not alpha:
        return Image.fromarray(rgb.astype(np.uint8))
    a = (((x - side / 2) ** 2 + (y - side / 2) ** 2) < (side / 3) ** 2) * 255
    return Image.fromarray(np.dstack([rgb, a]).astype(np.uint8), "RGBA")


@pytest.fixture(scope="module")
def gso(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Two objects; each view's ``NNN.npy`` is what Blender's get_3x4_RT_matrix_from_blender
    writes: the world-to-camera of the OpenGL-axes camera, 3 x 4."""
    root = tmp_path_factory.mktemp("gso")
    truth = {}
    for o, name in enumerate(("alarm", "backpack")):
        folder = root / name / SB.GSO_RENDERS
        folder.mkdir(parents=True)
        c2w = _orbit(SB.GSO_VIEWS, o)
        truth[name] = c2w
        for v in range(SB.GSO_VIEWS):
            _image(v + 7 * o, SIDE, alpha=True).save(folder / f"{v:03d}.png")
            np.save(folder / f"{v:03d}.npy", np.linalg.inv(opencv_to_opengl(c2w[v]))[:3])
    return root, truth


def _pytorch3d(c2w: np.ndarray, K: np.ndarray, hw: tuple[int, int]) -> dict:
    """An OpenCV camera as a CO3D / RayDiffusion annotation: X_view = X_world @ R + T with
    view axes (-x, -y, z), focal length and principal point in NDC (scale min(H, W) / 2)."""
    F = np.diag([-1.0, -1.0, 1.0])
    w2c = np.linalg.inv(c2w)
    s = min(hw) / 2
    return {
        "R": (w2c[:3, :3].T @ F).tolist(),
        "T": (F @ w2c[:3, 3]).tolist(),
        "focal_length": [K[0, 0] / s, K[1, 1] / s],
        "principal_point": [(hw[1] / 2 - K[0, 2]) / s, (hw[0] / 2 - K[1, 2]) / s],
    }


@pytest.fixture(scope="module")
def co3d(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("co3d")
    hw = (48, 64)
    K = np.array([[50.0, 0, 33.0], [0, 50.0, 23.0], [0, 0, 1]])
    doc, truth = {}, {}
    for s, seq in enumerate(("110_13051_23361", "189_20393_38136")):
        c2w = _orbit(9, 10 + s)
        frames = []
        for f in range(9):
            rel = f"apple/{seq}/images/frame{f + 1:06d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(_image(f, 64, alpha=False))[:48]).save(root / rel)
            frames.append({"filepath": rel, "bbox": [4, 4, 40, 40], **_pytorch3d(c2w[f], K, hw)})
        doc[seq] = frames
        truth[f"apple/{seq}"] = c2w[SB.spaced(9, SB.POSE_VIEWS)]
    (root / SB.CO3D_ANNOTATIONS).mkdir()
    with gzip.open(root / SB.CO3D_ANNOTATIONS / "apple_test.jgz", "wt") as fh:
        json.dump(doc, fh)
    return root, truth


def test_gso_views_come_back_as_the_cameras_rendered(gso):
    root, truth = gso
    objects = SB.gso_objects(root)
    assert [o.name for o in objects] == ["alarm", "backpack"]
    views = [0, 5, 11]
    pixels, c2w, K = SB.load_views([objects[1].views[i] for i in views], 32)
    expect, _ = normalize_cameras(truth["backpack"][views])
    np.testing.assert_allclose(c2w, expect, atol=1e-9)
    np.testing.assert_allclose(c2w[0], CAMERA0, atol=1e-12)
    f = 35.0 / 32.0 * 32  # Blender's lens on the 32 px crop
    np.testing.assert_allclose(K[0], [[f, 0, 16], [0, f, 16], [0, 0, 1]])
    assert pixels.shape == (3, 3, 32, 32)
    assert torch.all(pixels[:, :, 0, 0] == 1.0)  # transparent corners composited on white


def test_co3d_annotations_come_back_as_the_cameras_recorded(co3d):
    root, truth = co3d
    items = SB.co3d_sequences(root)
    assert [i.name for i in items] == list(truth) and len(items[0].views) == SB.POSE_VIEWS
    _, c2w, K = SB.load_views(items[0].views, 32)
    expect, _ = normalize_cameras(truth[items[0].name])
    np.testing.assert_allclose(c2w, expect, atol=1e-9)
    # K of the 48 x 64 frame (f 50, pp (33, 23)) after its centre 48 x 48 crop and 32 px resize
    np.testing.assert_allclose(
        K[0], [[50 * 32 / 48, 0, (33 - 8) * 32 / 48], [0, 50 * 32 / 48, 23 * 32 / 48], [0, 0, 1]]
    )


def test_nvs_cases_hold_table_2s_layouts(gso):
    objects = SB.gso_objects(gso[0])[:1]
    cases = SB.nvs_cases(objects, 32, 4, GEO)
    rows = {}
    for case in cases:
        rows.setdefault(case.row, []).append(case)
    assert list(rows) == [r for r, _, _ in SB.NVS_ROWS]
    for row, n, known in SB.NVS_ROWS:
        covered = []
        for case in rows[row]:
            kw = case.inputs()
            mask = kw["cond_mask"][0]
            images, rays = mask[0::2].tolist(), mask[1::2].tolist()
            views = len(images)
            assert views <= max(4, n + 1)
            assert images == [i < n for i in range(views)]
            assert rays == [known or i == 0 or i >= n for i in range(views)]
            ray_norm = kw["cond_rays"][0].flatten(1).abs().sum(1)
            assert [bool(x > 0) for x in ray_norm] == rays  # unknown poses: no rays given
            covered += [int(t) for t in case.id.rsplit("/", 1)[1].split("-")]
        assert covered[0] == 10 and covered[-1] == 24  # every target, in chunks
    assert len(rows["nvs_3view_known"]) == 15 and len(rows["nvs_1view"]) == 5


def _args(run, bench: str, path: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", run["run"], "--benchmark", bench, "--path", str(path),
            "--out", str(out), "--steps", "2", "--size", "32", "--device", "cpu", *extra]  # fmt: skip


def test_gso_nvs_end_to_end(run, gso, tmp_path, capsys):
    from tests.helpers.tiny_lpips import save_lpips_folder

    save_lpips_folder(tmp_path / "lpips", "alex")
    out = tmp_path / "nvs"
    extra = ("--num", "1", "--lpips", str(tmp_path / "lpips"))
    code, stdout, err = eval_cli(capsys, *_args(run, "gso-nvs", gso[0], out, *extra))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["tasks"]) == [r for r, _, _ in SB.NVS_ROWS]
    for per in metrics["tasks"].values():
        assert 0 < per["psnr"] <= 100 and -1 <= per["ssim"] <= 1 and per["lpips"] > 0
    assert metrics["tasks"]["nvs_1view"]["n"] == 15  # one target per call (max 2 images)
    report = (out / "report.md").read_text()
    assert "| nvs_2view_known | psnr |" in report and "| 20.22 |" in report
    assert (out / "grid.png").is_file() and "Table 2" in report


def test_pose_benchmarks_end_to_end(run, gso, co3d, tmp_path, capsys):
    for bench, path, n in (("gso-pose", gso[0], 2), ("co3d-pose", co3d[0], 2)):
        out = tmp_path / bench
        code, _, err = eval_cli(capsys, *_args(run, bench, path, out))
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        pose = metrics["tasks"]["camera_pose"]
        assert pose["n"] == n and 0 <= pose["center_acc_0.3"] <= 1
        assert 0 <= pose["rotation_acc_15"] <= 1
    assert metrics["paper"] == {}
    assert json.loads((tmp_path / "gso-pose" / "metrics.json").read_text())["paper"] == {
        "center_acc_0.3": 0.32
    }


def test_bad_camera_benchmark_folders_are_one_line(run, gso, co3d, tmp_path, capsys):
    def fails(bench: str, path: Path, expect: str) -> None:
        code, _, err = eval_cli(capsys, *_args(run, bench, path, tmp_path / "o"))
        lines = err.strip().splitlines()
        assert code == 2 and expect in lines[-1], lines

    fails("gso-nvs", tmp_path, "no <object>/render_mvs_25/model/NNN.png + NNN.npy")
    bad = Path(shutil.copytree(gso[0], tmp_path / "gso"))
    (bad / "alarm" / SB.GSO_RENDERS / "024.npy").unlink()
    fails("gso-pose", bad, "024.png has no 024.npy camera")
    (bad / "alarm" / SB.GSO_RENDERS / "024.png").unlink()
    fails("gso-nvs", bad, "expected the 25 views 000..024")
    fails("co3d-pose", gso[0], "no <category>_test.jgz (RayDiffusion's co3d_v2_annotations")
    cbad = Path(shutil.copytree(co3d[0], tmp_path / "co3d"))
    shutil.rmtree(cbad / "apple" / "189_20393_38136")
    fails("co3d-pose", cbad, "frame000001.jpg does not exist")
    with gzip.open(cbad / SB.CO3D_ANNOTATIONS / "apple_test.jgz", "wt") as fh:
        json.dump(
            {"x": [{"filepath": "apple/110_13051_23361/images/frame000001.jpg", "R": [1]}] * 2}, fh
        )
    fails("co3d-pose", cbad, "R is not a finite 3x3 array")
