"""``onegen sample --task multiview | camera_pose`` and the multiview sample grids.

One real tiny fit on tiny multiview shards (``tests/depth_pose_shards.py``: 3 square 32 px
views on an orbit, with cameras) trains both tasks and renders their grids every step; its
checkpoint then samples. The tiny model's outputs mean nothing, so the geometry is checked
with an oracle denoiser that knows the true ray views: sampling must then return exactly the
ground-truth cameras, through the crop, the rays, the sampler and the recovery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.cameras import (
    CAMERA0,
    cameras_to_plucker,
    intrinsics_from_focal,
    normalize_cameras,
    opencv_to_opengl,
    orbit_cameras,
    rotation_angle_deg,
)
from tests.helpers import REPO
from tests.helpers import depth_pose_shards as dps

PREFIX = "onegen sample: error: "
CELL = 32
FRAME = (40, 32)  # (W, H) of the given images: centre-cropped to 32 x 32


@pytest.fixture(scope="module")
def mv_fit(tmp_path_factory):
    from training.config import load_config
    from training.fit import fit

    tmp = tmp_path_factory.mktemp("mv-fit")
    dps.write(str(tmp / "shards"), "multiview", [4])
    cfg = load_config(None, [
        "data.kind=onegen", f"data.paths={{multiview: {tmp / 'shards'}}}",
        "data.buckets=[[32,32]]", "data.batch_size=2", "data.camera_pose_prob=0.5",
        "trainer.max_steps=2", "checkpoint.every_n_steps=2", f"runs_dir={tmp}/runs",
        "mlflow.enabled=false", "encoders.text_max_length=24", "samples.every_n_steps=1",
        "samples.tasks=[multiview,camera_pose]", "samples.resolution=32", "samples.steps=1",
        f"samples.cell={CELL}",
    ])  # fmt: skip
    result = fit(cfg)
    ckpt = Path(result.checkpoint_dir) / "step00000002.ckpt"
    assert ckpt.exists(), ckpt
    return {"ckpt": ckpt, "run_dir": Path(result.run_dir)}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """3 photos of FRAME size and their true cameras as a nerfstudio transforms.json (K for
    the FRAME, OpenGL c2w, an un-normalised orbit)."""
    import cv2

    tmp = tmp_path_factory.mktemp("mv-scene")
    paths = []
    for v in range(3):
        path = tmp / f"view{v}.png"
        Image.fromarray(cv2.resize(dps.image(v), FRAME)).save(path)
        paths.append(path)
    c2w = orbit_cameras([20.0, 50.0, 95.0], [10.0, 25.0, 5.0], [3.0, 3.2, 2.8])
    K = intrinsics_from_focal((44.0, 46.0), FRAME[::-1])
    K[0, 2] += 1.5  # an off-centre principal point survives the crop and its inverse
    doc = {
        "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2],
        "w": FRAME[0], "h": FRAME[1],
        "frames": [
            {"file_path": p.name, "transform_matrix": opencv_to_opengl(c2w[v]).tolist()}
            for v, p in enumerate(paths)
        ],
    }  # fmt: skip
    gt = tmp / "transforms.json"
    gt.write_text(json.dumps(doc))
    return {"images": paths, "c2w": c2w, "K": K, "transforms": gt}


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    from orchestration.cli import main

    try:
        rc = main(["sample", *args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0]


def _images(scene: dict, n: int) -> list[str]:
    return [a for p in scene["images"][:n] for a in ("--image", str(p))]


# --------------------------------------------------------------------------- sampling


def test_camera_pose_writes_cameras_nerfstudio_reads_back(mv_fit, scene, tmp_path, capsys):
    from training.inference.multiview import read_transforms

    out = tmp_path / "pose"
    rc, stdout, err = _main([
        "--checkpoint", str(mv_fit["ckpt"]), "--task", "camera_pose", *_images(scene, 3),
        "--cameras", str(scene["transforms"]), "--out", str(out), "--steps", "2",
        "--device", "cpu",
    ], capsys)  # fmt: skip
    assert rc == 0, err
    wrote = [ln.removeprefix("wrote ") for ln in stdout.splitlines() if ln.startswith("wrote ")]
    assert sorted(os.listdir(out)) == sorted(Path(p).name for p in wrote)
    assert sorted(os.listdir(out)) == ["camera_pose_grid.png", "metrics.json", "transforms.json"]
    # The cameras, printed and written: V x 4 x 4, camera 0 CAMERA0, all finite.
    assert [ln.split(":")[0] for ln in stdout.splitlines() if ln.startswith("camera ")] == [
        "camera 0",
        "camera 1",
        "camera 2",
    ]
    got = read_transforms(out / "transforms.json")
    assert got.c2w.shape == (3, 4, 4) and np.isfinite(got.c2w).all() and np.isfinite(got.K).all()
    np.testing.assert_allclose(got.c2w[0], CAMERA0, atol=1e-12)
    assert got.frames == [FRAME] * 3
    assert got.file_paths == [str(p.resolve()) for p in scene["images"]]
    doc = json.loads((out / "transforms.json").read_text())
    gl = np.array([f["transform_matrix"] for f in doc["frames"]])
    np.testing.assert_allclose(gl[0], np.diag([-1.0, 1.0, -1.0, 1.0]))  # CAMERA0, OpenGL axes
    np.testing.assert_allclose(opencv_to_opengl(got.c2w), gl)
    # Metrics: on stdout and in metrics.json, the three keys of pose_metrics.
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == ["center_acc@0.1", "center_acc@0.3", "rotation_acc@15"]
    for key, value in metrics.items():
        assert 0.0 <= value <= 1.0
        assert f"{key}: {value:.3f}" in stdout
    assert Image.open(out / "camera_pose_grid.png").size[0] >= 5 * CELL


def test_camera_pose_without_ground_truth_writes_no_metrics(mv_fit, scene, tmp_path):
    from training.inference.multiview import sample_multiview_from_checkpoint

    out = tmp_path / "pose"
    res = sample_multiview_from_checkpoint(
        mv_fit["ckpt"], "camera_pose", out, images=scene["images"][:2], steps=1
    )
    assert res.metrics is None and res.c2w.shape == (2, 4, 4) and res.K.shape == (2, 3, 3)
    assert sorted(os.listdir(out)) == ["camera_pose_grid.png", "transforms.json"]


def _oracle(truth: dict, monkeypatch, seen: list | None = None) -> None:
    """Replace the checkpoint's network by a denoiser that knows the true ray views of
    ``truth`` (c2w, K of the 32 px crop): v = (x_t - x) / t ends every Euler run on x."""
    import training.inference.multiview as sm

    real = sm.load_model

    def oracle_model(*args, **kwargs):
        _, frozen = real(*args, **kwargs)

        def net(x, t, text, mask):
            if seen is not None:
                seen.append((x.clone(), t.clone()))
            h, w = x.shape[-2:]
            rays = cameras_to_plucker(truth["c2w"], truth["K"], (32, 32), (h, w), x.shape[2])
            target = x.clone()
            target[:, 1::2] = torch.from_numpy(rays).to(x)
            tt = t.reshape(*t.shape, 1, 1, 1)
            return torch.where(tt > 0, (x - target) / tt.clamp_min(1e-6), torch.zeros_like(x))

        return net, frozen

    monkeypatch.setattr(sm, "load_model", oracle_model)


def test_camera_pose_returns_the_true_cameras_from_the_true_rays(
    mv_fit, scene, tmp_path, monkeypatch
):
    """Crop -> rays -> sampler -> plucker_to_cameras -> frame intrinsics, exactly."""
    from training.inference.multiview import read_transforms, sample_multiview_from_checkpoint
    from training.inference.multiview import square_intrinsics as square

    gt, _ = normalize_cameras(scene["c2w"])
    k_crop = square(scene["K"], FRAME, 32)
    _oracle({"c2w": gt, "K": np.stack([k_crop] * 3)}, monkeypatch)
    out = tmp_path / "pose"
    res = sample_multiview_from_checkpoint(
        mv_fit["ckpt"], "camera_pose", out, images=scene["images"], cameras=scene["transforms"],
        steps=3,
    )  # fmt: skip
    np.testing.assert_allclose(res.c2w, gt, atol=1e-4)
    assert res.metrics == {"rotation_acc@15": 1.0, "center_acc@0.1": 1.0, "center_acc@0.3": 1.0}
    np.testing.assert_allclose(res.K[1:], np.stack([k_crop] * 2), rtol=1e-4)
    written = read_transforms(out / "transforms.json")
    np.testing.assert_allclose(written.K[1:], np.stack([scene["K"]] * 2), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(written.c2w, gt, atol=1e-4)


def test_multiview_writes_views_and_the_cameras_used(mv_fit, scene, tmp_path, capsys):
    from training.inference.multiview import DEFAULT_FOCAL, read_transforms

    out = tmp_path / "mv"
    rc, stdout, err = _main([
        "--checkpoint", str(mv_fit["ckpt"]), "--task", "multiview", *_images(scene, 1),
        "--azimuths", "0,30,60", "--elevations", "0,0,10", "--out", str(out), "--steps", "1",
    ], capsys)  # fmt: skip
    assert rc == 0, err
    names = ["multiview_grid.png", "multiview_view0_condition.png",
             "multiview_view1_generated.png", "multiview_view2_generated.png",
             "transforms.json"]  # fmt: skip
    assert sorted(os.listdir(out)) == names
    for name in names[1:4]:
        assert Image.open(out / name).size == (32, 32)
    got = read_transforms(out / "transforms.json")
    assert got.file_paths == names[1:4] and got.frames == [(32, 32)] * 3
    np.testing.assert_allclose(got.c2w[0], CAMERA0, atol=1e-12)
    angles = rotation_angle_deg(got.c2w[:1, :3, :3], got.c2w[:, :3, :3])
    assert abs(angles[1] - 30.0) < 1e-6 and angles[2] > 60.0
    np.testing.assert_allclose(got.K[:, 0, 0], DEFAULT_FOCAL * 32)
    # Camera 0 sits 1.7 from the orbit's centre, on its optical axis.
    np.testing.assert_allclose(np.linalg.norm(got.c2w[1, :3, 3]), 2 * 1.7 * np.sin(np.pi / 12))


def test_multiview_feeds_the_rays_training_would(mv_fit, scene, tmp_path, monkeypatch):
    """--cameras: the ray views the model sees are ``bucket_rays`` of the normalised rig, the
    trainer's own function, and they stay clean while the images 1.. are generated."""
    from training.data.views import bucket_rays
    from training.inference.multiview import sample_multiview_from_checkpoint

    gt, _ = normalize_cameras(scene["c2w"])
    seen: list = []
    _oracle(
        {"c2w": gt, "K": np.stack([intrinsics_from_focal(40.0, (32, 32))] * 3)}, monkeypatch, seen
    )
    res = sample_multiview_from_checkpoint(
        mv_fit["ckpt"], "multiview", tmp_path / "mv", images=scene["images"][:1],
        cameras=scene["transforms"], steps=2,
    )  # fmt: skip
    x, t = seen[0]
    assert x.shape[1] == 6 and t.tolist()[0] == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    want = bucket_rays(
        gt, np.stack([scene["K"]] * 3), FRAME, (32, 32), 32 // x.shape[-1], x.shape[2]
    )
    for x, _ in seen:
        np.testing.assert_allclose(x[0, 1::2].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(res.c2w, gt, atol=1e-12)


# --------------------------------------------------------------------------- usage errors


@pytest.fixture
def no_weights(monkeypatch):
    import training.inference.sample

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(training.inference.sample, "load_weights", refuse)


def _bad_json(tmp: Path, text: str) -> str:
    path = tmp / "bad.json"
    path.write_text(text)
    return str(path)


_ROT = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize(
    ("task", "n", "extra", "message"),
    [
        ("camera_pose", 1, [], "--task camera_pose needs at least 2 --image"),
        ("camera_pose", 2, ["--azimuths", "0,30"], "camera_pose estimates the cameras: drop "
         "--azimuths"),
        ("camera_pose", 2, ["--cameras", "GT3"], "has 3 frames for 2 --image"),
        ("multiview", 3, ["--azimuths", "0,30"], "got 3 --image for 2 cameras"),
        ("multiview", 3, ["--azimuths", "0,30,60"], "at least one camera more than images"),
        ("multiview", 0, ["--azimuths", "0,30"], "needs at least one --image"),
        ("multiview", 1, [], "--task multiview needs the cameras: --azimuths"),
        ("multiview", 1, ["--azimuths", "0,x"], "--azimuths '0,x' is not a comma-separated"),
        ("multiview", 1, ["--azimuths", "0,30", "--elevations", "0"], "--elevations has 1 "
         "values for 2 --azimuths"),
        ("multiview", 1, ["--azimuths", "0,30", "--cameras", "GT3"], "give the cameras once"),
        ("multiview", 1, ["--azimuths", "0,30", "--distance", "0"], "--distance must be"),
        ("multiview", 1, ["--cameras", "nope.json"], "nope.json is not a readable file"),
        ("multiview", 1, ["--cameras", "BAD:{"], "is not JSON"),
        ("multiview", 1, ["--cameras", "BAD:[1, 2]"], "expected an object with a 'frames'"),
        ("multiview", 1, ["--cameras", 'BAD:{"frames": [{"w": 4, "h": 4, "fl_x": 2, '
         f'"transform_matrix": {_ROT}}}]}}'], "frame 0: transform_matrix: rotation part is "
         "not a proper rotation"),
        ("multiview", 1, ["--cameras", 'BAD:{"frames": [{"w": 4, "h": 4}]}'],
         "frame 0: fl_x must be a finite number"),
        ("multiview", 1, ["--azimuths", "0,30", "--size", "40"], "--size 40 is not a multiple"),
        ("depth2image", 1, ["--azimuths", "0,30"], "--azimuths is for --task multiview or "
         "camera_pose, not depth2image"),
        ("depth2image", 2, [], "--task depth2image takes one --image, got 2"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_before_the_weights(
    mv_fit, scene, tmp_path, capsys, no_weights, task, n, extra, message
):
    extra = [
        str(scene["transforms"]) if a == "GT3" else _bad_json(tmp_path, a[4:])
        if a.startswith("BAD:") else str(tmp_path / a) if a == "nope.json" else a
        for a in extra
    ]  # fmt: skip
    out = tmp_path / "out"
    rc, _, err = _main(
        ["--checkpoint", str(mv_fit["ckpt"]), "--task", task, "--out", str(out),
         *_images(scene, n), *extra], capsys,
    )  # fmt: skip
    line = _error_line(err)
    assert rc == 2 and message in line, line
    assert not out.exists()


def test_a_task_the_checkpoint_never_trained_is_refused(
    mv_fit, scene, tmp_path, capsys, no_weights, monkeypatch
):
    """The same checkpoint, its config saying it trained the depth subset only."""
    import training.inference.sample
    from training.checkpoint_io import checkpoint_meta

    meta = checkpoint_meta(mv_fit["ckpt"])
    meta["config"] = meta["config"].replace("multiview:", "depth:")
    monkeypatch.setattr(training.inference.sample, "checkpoint_meta", lambda path: meta)
    out = tmp_path / "out"
    rc, _, err = _main(
        ["--checkpoint", str(mv_fit["ckpt"]), "--task", "camera_pose", "--out", str(out),
         *_images(scene, 2)], capsys,
    )  # fmt: skip
    line = _error_line(err)
    assert rc == 2 and "--task camera_pose was never trained by" in line, line
    assert "image2depth" in line and not out.exists()


@pytest.mark.slow
def test_subprocess_usage_error_is_one_line_exit_2(mv_fit, scene, tmp_path):
    """``python -m orchestration.cli sample`` end to end (the other errors run in process)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "orchestration.cli", "sample", "--checkpoint",
           str(mv_fit["ckpt"]), "--out", str(tmp_path / "out"), "--task", "camera_pose",
           *_images(scene, 1)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs at least 2 --image" in _error_line(proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- transforms.json


def test_transforms_round_trip_and_per_frame_intrinsics(tmp_path):
    from training.inference.multiview import read_transforms, write_transforms

    c2w, _ = normalize_cameras(orbit_cameras([0, 40], [0, 20], 2.0))
    K = np.stack([intrinsics_from_focal(30.0, (32, 48)), intrinsics_from_focal(50.0, (64, 64))])
    path = write_transforms(tmp_path / "t.json", c2w, K, [(48, 32), (64, 64)], ["a.png", "b.png"])
    doc = json.loads(path.read_text())
    assert "fl_x" not in doc and doc["frames"][1]["w"] == 64  # not shared: per frame only
    got = read_transforms(path)
    np.testing.assert_allclose(got.c2w, c2w, atol=1e-12)
    np.testing.assert_allclose(got.K, K)
    assert got.frames == [(48, 32), (64, 64)] and got.file_paths == ["a.png", "b.png"]
    same = write_transforms(tmp_path / "s.json", c2w, K[[0, 0]], [(48, 32)] * 2, ["a", "b"])
    assert json.loads(same.read_text())["fl_x"] == 30.0  # shared: at the top too


def test_transforms_reader_refuses_oversized_and_odd_files(tmp_path, monkeypatch):
    import training.inference.multiview as sm

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"frames": []}))
    with pytest.raises(sm.SampleUsageError, match="expected 1 to 16 frames, got 0"):
        sm.read_transforms(path)
    monkeypatch.setattr(sm, "MAX_TRANSFORMS_BYTES", 8)
    with pytest.raises(sm.SampleUsageError, match="is over"):
        sm.read_transforms(path)
    with pytest.raises(sm.SampleUsageError, match="not a readable file"):
        sm.read_transforms(tmp_path)  # a folder


def test_square_intrinsics_inverts_and_matches_training_crop():
    from training.inference.multiview import frame_intrinsics, square_intrinsics

    K = intrinsics_from_focal((44.0, 46.0), (300, 500))
    sq = square_intrinsics(K, (500, 300), 64)
    np.testing.assert_allclose(frame_intrinsics(sq, (500, 300), 64), K, atol=1e-9)
    assert abs(sq[0, 2] - 32.0) < 1e-9 and abs(sq[1, 2] - 32.0) < 1e-9


# --------------------------------------------------------------------------- sample grids


def test_fit_renders_multiview_and_camera_pose_grids(mv_fit):
    from training.inference.grid import Layout

    lay = Layout(CELL)
    samples = mv_fit["run_dir"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_00000001", "step_00000002"]
    # A task's grid starts at the first step after a batch held one; by step 2 both have.
    first = {p.name for p in (samples / "step_00000001").iterdir()}
    assert first and first <= {"camera_pose.png", "multiview.png"}, first
    last = {p.name for p in (samples / "step_00000002").iterdir()}
    assert last == {"camera_pose.png", "multiview.png"}, last
    # camera_pose: 3 images, 2 estimated and 2 true ray panels; multiview: 1 or 2 given
    # images, then the others generated and their targets
    sizes = {"camera_pose.png": [lay.size(1, 7)], "multiview.png": [lay.size(1, 4), lay.size(1, 5)]}
    for path in samples.glob("step_*/*.png"):
        assert Image.open(path).size in sizes[path.name], path


def test_ray_panels_show_the_directions():
    from training.inference.grid import camera_pose_row, ray_pixels, render_grid

    K = intrinsics_from_focal(40.0, (32, 32))
    rays = torch.from_numpy(cameras_to_plucker(np.eye(4)[None].repeat(2, 0), K, (32, 32), (4, 4)))
    d = ray_pixels(rays[0])
    assert d.shape == (3, 4, 4)
    np.testing.assert_allclose(d.norm(dim=0).numpy(), 1.0, atol=1e-6)
    assert (d[2] > 0).all() and d[0, 0, 0] < 0 < d[0, 0, -1]  # forward, left to right
    row = camera_pose_row(
        "camera_pose", "[[multiview]] a cube", torch.zeros(2, 3, 32, 32), rays, rays
    )
    assert [p.caption for p in row.panels] == ["image 0", "image 1", "rays 1", "true rays 1"]
    assert row.prompt == "a cube"
    assert render_grid([row], CELL).size[0] >= 4 * CELL
