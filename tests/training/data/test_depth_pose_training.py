"""Training on the depth and pose subsets, end to end on tiny real shards.

The shards (``tests/depth_pose_shards.py``) are written with the sink's own helpers:
16-bit depth PNGs, RGB pose renderings, t2i and i2i samples beside them. The tests
prove the DataModule mixes the four subsets and trains all four depth / pose tasks,
that 16-bit depth keeps its precision into the [-1, 1] pixels, that the reverse
direction puts the map in view 0 (the target), that a short real CPU fit over the
four subsets logs per-task metrics to MLflow, and that ``onegen sample`` runs the
new tasks in both directions from the fit's checkpoint.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from tests.helpers import depth_pose_shards as S

SUBSETS = ("t2i", "i2i", "depth", "pose")
DEPTH_POSE_TASKS = {"depth2image", "image2depth", "pose2image", "image2pose"}


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    return S.write_all(str(tmp_path_factory.mktemp("dp") / "out"))


def _datamodule(out: str, **kw):
    from training.data.datamodule import OneGenDataModule

    cfg = {
        "paths": {s: out for s in SUBSETS},
        "batch_size": 4,
        "num_workers": 0,
        "seed": 1,
        "buckets": [[S.H, S.W]],
        "caption_dropout": 0.0,
        "reads_per_batch": 2,
    }
    cfg.update(kw)
    return OneGenDataModule(cfg)


def _expected_unit(v: np.ndarray) -> np.ndarray:
    """What a 16-bit value must become: linear over 0..65535 into [-1, 1]."""
    return (v.astype(np.float64) - 32767.5) / 32767.5


def _sample_index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


# --------------------------------------------------------------------------- data


def test_datamodule_mixes_the_four_subsets_and_all_depth_pose_tasks(shards_dir):
    dm = _datamodule(shards_dir)
    dm.setup()
    assert set(dm.probs) == set(SUBSETS)
    # The paper's equal budget per family: t2i one half, i2i / depth / pose a sixth each.
    assert dm.probs["t2i"] == pytest.approx(0.5)
    assert all(dm.probs[s] == pytest.approx(1 / 6) for s in ("i2i", "depth", "pose"))
    subsets: collections.Counter[str] = collections.Counter()
    tasks: collections.Counter[str] = collections.Counter()
    for batch in _take(dm.loader(start_batch=0, rank=0), 40):
        assert batch["skipped"] == 0, batch["skip_last"]
        assert len(set(batch["subsets"])) == 1  # one subset per batch
        subsets[batch["subsets"][0]] += 1
        tasks.update(batch["tasks"])
        b, v = batch["pixels"].shape[:2]
        assert batch["pixels"].shape == (b, v, 3, S.H, S.W)
        assert batch["pixels"].dtype == torch.float32 and batch["pixels"].abs().max() <= 1
        if batch["subsets"][0] in ("depth", "pose"):
            assert v == 2 and batch["cond_mask"].tolist() == [[False, True]] * b
            for prompt, task in zip(batch["prompts"], batch["tasks"], strict=True):
                token = "[[depth2image]]" if "depth" in task else "[[pose2image]]"
                assert prompt.startswith(f"{token} a {batch['subsets'][0]} photo number ")
    assert set(subsets) == set(SUBSETS), subsets
    assert set(tasks) >= DEPTH_POSE_TASKS, tasks
    assert tasks["text2image"] > 0 and {"canny2image", "deblurring"} & set(tasks)


def _take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("task", ["depth2image", "image2depth"])
def test_16bit_depth_keeps_its_precision_and_reverse_targets_the_map(shards_dir, task):
    dm = _datamodule(shards_dir, paths={"depth": shards_dir}, tasks=[task])
    stream = dm.stream(start_batch=0, rank=0)
    map_view = 0 if task == "image2depth" else 1  # reverse: the depth map is the target
    seen = 0
    for k in range(3):
        batch = stream.make_batch(k)
        assert batch["tasks"] == [task] * 4
        mask = [False, True]
        assert batch["cond_mask"].tolist() == [mask] * 4
        for b, key in enumerate(batch["keys"]):
            v = S.depth_value(_sample_index(key))
            got = batch["pixels"][b, map_view].numpy()
            for c in range(3):  # gray map: the same plane in all three channels
                np.testing.assert_allclose(got[c], _expected_unit(v), rtol=0, atol=2e-7)
            # The two ends of the min-max range are exact, far = -1 and near = +1.
            assert got[0, 0, 0] == -1.0 and got[0, -1, -1] == 1.0
            # Values one 16-bit step apart stay apart (8 bits would merge 257 of them).
            assert v[0, 1] + 37 == v[0, 2]
            np.testing.assert_allclose(got[0, 0, 2] - got[0, 0, 1], 37 / 32767.5, atol=2e-7)
            assert np.unique(got[0]).size == np.unique(v).size == S.H * S.W
            # The other view is the photo (JPEG, so only roughly): colour, not gray.
            photo = batch["pixels"][b, 1 - map_view]
            assert (photo[0] - photo[1]).abs().max() > 0.05
            seen += 1
    assert seen == 12


@pytest.mark.parametrize("task", ["pose2image", "image2pose"])
def test_pose_map_keeps_its_rgb_colours_and_reverse_targets_the_map(shards_dir, task):
    dm = _datamodule(shards_dir, paths={"pose": shards_dir}, tasks=[task])
    batch = dm.stream(start_batch=0, rank=0).make_batch(0)
    assert batch["tasks"] == [task] * 4
    map_view = 0 if task == "image2pose" else 1
    rgb = S.pose_map().transpose(2, 0, 1).astype(np.float64)
    expected = torch.from_numpy(((rgb - 127.5) / 127.5).astype(np.float32))
    for b in range(4):
        got = batch["pixels"][b, map_view]
        assert torch.equal(got, expected)  # 8-bit PNG at bucket size: exact, RGB order kept
        x, y = S.POSE_LIMB[0][0] + 10, S.POSE_LIMB[0][1]
        assert got[:, y, x].tolist() == [1.0, -1.0, -1.0]  # the red limb is red
        assert got[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]  # black background
    assert not batch["cond_mask"][:, 0].any() and batch["cond_mask"][:, 1].all()


# --------------------------------------------------------------------------- fit and sample

FIT_YAML = """
name: depth-pose-test
run_dir: WORK/run
seed: 5
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 24}
optim: {lr: 5.0e-4, warmup_steps: 2, grad_clip: 1.0}
ema: {decay: 0.9}
trainer: {accelerator: cpu, devices: 1, max_steps: 12, log_every_n_steps: 4}
checkpoint: {every_n_steps: 12, keep: -1}
data:
  kind: onegen
  paths: {t2i: OUT, i2i: OUT, depth: OUT, pose: OUT}
  mix: {t2i: 1.0, i2i: 1.0, depth: 2.0, pose: 2.0}
  batch_size: 4
  num_workers: 0
  buckets: [[32, 48]]
  seed: 2
samples:
  every_n_steps: 12
  tasks: [text2image, image2depth, pose2image]
  prompts: ["a photo of a cat"]
  resolution: 32
  steps: 2
experiment: onegen-depth-pose-test
mlflow: {tracking_uri: "sqlite:///WORK/mlflow.db",
         synchronous: true, system_metrics: false}
"""


@pytest.fixture(scope="module")
def fitted(shards_dir, tmp_path_factory):
    """One short single-device CPU fit over the four subsets, through ``onegen train fit``."""
    from orchestration.cli import main

    work = tmp_path_factory.mktemp("dpfit")
    cfg = work / "fit.yaml"
    # The run folder and the MLflow store are in tmp, written into the file itself.
    cfg.write_text(FIT_YAML.replace("OUT", shards_dir).replace("WORK", str(work)))
    rc = main(["train", "fit", "--config", str(cfg)])
    assert rc == 0
    run_info = json.loads((work / "run" / "mlflow_run.json").read_text())
    return {
        "work": work,
        "ckpt": work / "run" / "checkpoints" / "step00000012.ckpt",
        "run_id": run_info["run_id"],
    }


def test_fit_over_the_four_subsets_logs_per_task_metrics(fitted):
    from mlflow.tracking import MlflowClient

    assert fitted["ckpt"].is_file()
    client = MlflowClient(f"sqlite:///{fitted['work'] / 'mlflow.db'}")
    run = client.get_run(fitted["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for task in DEPTH_POSE_TASKS | {"text2image"}:
        assert f"train/loss/{task}" in metrics, sorted(metrics)
        assert np.isfinite(metrics[f"train/loss/{task}"]) and metrics[f"train/samples/{task}"] > 0
    assert "train/loss" in metrics and np.isfinite(metrics["train/loss"])
    # Every subset was read, none skipped anything.
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == set(SUBSETS)  # manifests
    skipped = {k: v for k, v in metrics.items() if k.startswith("data/skipped") and v}
    assert not skipped, skipped
    # The sample grids of the new tasks were drawn from captured training samples.
    grids = fitted["work"] / "run" / "samples" / "step_00000012"
    assert {p.name for p in grids.glob("*.png")} == {
        "text2image.png",
        "image2depth.png",
        "pose2image.png",
    }


def test_load_image_keeps_16bit_depth_precision(tmp_path):
    from training.inference.images import load_image

    depth = S.depth_value(3)
    path = tmp_path / "depth.png"
    path.write_bytes(S.png(depth))
    x = load_image(path, None)  # 32 x 48 already multiples of 16: no resize
    assert x.shape == (3, S.H, S.W) and x.dtype == torch.float32
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), _expected_unit(depth), rtol=0, atol=2e-6)
    assert x[0, 0, 0] == -1.0 and x[0, -1, -1] == 1.0  # not clipped to white at 255
    # 8-bit images keep the training mapping as before.
    photo = tmp_path / "photo.png"
    photo.write_bytes(S.png(S.pose_map()))
    y = load_image(photo, None)
    assert y[:, S.POSE_LIMB[0][1], S.POSE_LIMB[0][0] + 10].tolist() == [1.0, -1.0, -1.0]


@pytest.mark.parametrize(
    ("task", "cond", "formats"),
    [
        ("depth2image", "depth", {0: "RGB", 1: "I;16"}),  # forward: a 16-bit map in
        ("image2depth", "photo", {0: "I;16", 1: "RGB"}),  # reverse: a 16-bit map out
        ("pose2image", "pose", {0: "RGB", 1: "RGB"}),
        ("image2pose", "photo", {0: "RGB", 1: "RGB"}),
    ],
)
def test_onegen_sample_runs_the_depth_and_pose_tasks(fitted, tmp_path, capsys, task, cond, formats):
    from PIL import Image

    from orchestration.cli import main

    sources = {
        "depth": S.png(S.depth_value(0)),
        "pose": S.png(S.pose_map()),
        "photo": S.jpg(S.image(0)),
    }
    image = tmp_path / f"cond-{cond}.{'jpg' if cond == 'photo' else 'png'}"
    image.write_bytes(sources[cond])
    out = tmp_path / "samples"
    rc = main([
        "sample", "--checkpoint", str(fitted["ckpt"]), "--task", task, "--image", str(image),
        "--out", str(out), "--steps", "2", "--size", "32", "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    names = [f"{task}_view0_generated.png", f"{task}_view1_condition.png", f"{task}_grid.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    assert capsys.readouterr().out.split() == [w for n in names for w in ("wrote", str(out / n))]
    for view, mode in formats.items():
        with Image.open(out / names[view]) as im:
            assert im.size == (32, 32) and im.mode == mode, (names[view], im.mode)
            if mode == "I;16":  # the depth map written as the depth subset stores it
                arr = np.asarray(im)
                assert arr.dtype == np.uint16 and arr.max() > 255  # not an 8-bit map widened


def test_onegen_sample_checks_the_task_and_image_before_loading(tmp_path, capsys):
    from orchestration.cli import main

    missing = tmp_path / "nope.ckpt"  # never read: the arguments are wrong first
    cases = [
        (["--task", "depth2image"], "--task depth2image needs --image: the depth.png condition"),
        (["--task", "image2pose"], "--task image2pose needs --image: the jpg condition (a photo"),
        (["--task", "text2image", "--image", "x.jpg"], "from the prompt alone: drop --image"),
        (["--task", "image2sketch"], "argument --task: invalid choice: 'image2sketch'"),
    ]
    for extra, message in cases:
        args = ["sample", "--checkpoint", str(missing), "--out", str(tmp_path / "o"), *extra]
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse: an unknown task is not one of --task's choices
            rc = exc.code
        assert rc == 2  # a usage error
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "".join(err) and err[-1].startswith("onegen sample: error: ")
        assert sum("error" in line for line in err) == 1, err
        assert message in err[-1], err[-1]
        assert not (tmp_path / "o").exists()
    assert "image2depth" in err[-1] and "image2pose" in err[-1]
