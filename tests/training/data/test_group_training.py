"""Training reads the group subsets: multiview samples as alternating image and Plücker ray
views (rays recomputed from the stored cameras at the latent grid of the batch's bucket),
faceid samples as ``[[faceid]] [[img0]] cap0 [[img1]] cap1 ...``, mixed with the paper's
equal budget over the three task families, and a real 2-process FSDP2 fit on CPU draws
both. The shards are written with the contract's helpers (``tests/depth_pose_shards.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datagen.cameras import CAMERA0, cameras_to_plucker, resize_intrinsics
from tests.helpers import REPO, depth_pose_shards as S

SUBSETS = ("t2i", "depth", "multiview", "faceid")


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("groups") / "out")
    S.write(out, "t2i", [6])
    S.write(out, "depth", [6])
    S.write(out, "multiview", [4])
    S.write(out, "faceid", [4])
    return out


def _stream(out: str, **kw):
    from training.data.datamodule import OneGenDataModule

    cfg = {
        "paths": {s: out for s in SUBSETS},
        "batch_size": 2,
        "num_workers": 0,
        "seed": 0,
        "buckets": [[32, 32]],
        "caption_dropout": 0.0,
        "latent_stride": 8,
        "latent_channels": 16,
        **kw,
    }
    dm = OneGenDataModule(cfg)
    dm.setup()
    return dm.stream(start_batch=0, rank=0)


def test_equal_budget_over_the_three_families(shards_dir):
    stream = _stream(shards_dir)
    counts = Counter(stream.plan_subset(k) for k in range(3000))
    families = {
        "text2image": counts["t2i"],
        "image2image": counts["depth"],
        "multiview_id": counts["multiview"] + counts["faceid"],
    }
    for family, n in families.items():
        assert abs(n / 3000 - 1 / 3) < 0.04, (family, families)
    assert abs(counts["multiview"] - counts["faceid"]) / 3000 < 0.04, counts


def test_multiview_batches_alternate_images_and_ray_views(shards_dir):
    stream = _stream(shards_dir, paths={"multiview": shards_dir}, multiview_max_views=3)
    seen = set()
    for k in range(8):
        batch = stream.make_batch(k)
        b, v = batch["pixels"].shape[:2]
        assert batch["pixels"].shape == (2, S.MV_VIEWS, 3, 32, 32)
        assert batch["rays"].shape == (b, v, 16, 4, 4)  # latent grid of the 32 px bucket
        assert batch["cond_mask"].shape == (b, 2 * v)
        for task, mask, prompt in zip(
            batch["tasks"], batch["cond_mask"].tolist(), batch["prompts"], strict=True
        ):
            seen.add(task)
            images, rays = mask[0::2], mask[1::2]
            assert prompt.startswith("[[multiview]]")
            if task == "multiview":  # novel views: every camera given, >= 1 image generated
                assert all(rays) and images[0] and not all(images)
                assert images == sorted(images, reverse=True)  # the first k images clean
            else:  # camera_pose: every image given, the cameras of views 1.. generated
                assert task == "camera_pose"
                assert all(images) and rays == [True] + [False] * (v - 1)
    assert seen == {"multiview", "camera_pose"}


def test_ray_views_are_the_stored_cameras_at_the_bucket_grid(shards_dir):
    """At a 64 px bucket the 32 px views are doubled, so the intrinsics double and the ray
    views are the cameras' rays on the 8 x 8 latent grid; view 0 is camera 0 (CAMERA0)."""
    stream = _stream(
        shards_dir, paths={"multiview": shards_dir}, buckets=[[64, 64]], multiview_max_views=3
    )
    batch = stream.make_batch(0)
    key = batch["keys"][0]
    i = int(key.rsplit("_", 1)[1])
    c2w, K = S.multiview_cameras(i)
    want = cameras_to_plucker(c2w, resize_intrinsics(K, 2.0, 2.0), (64, 64), (8, 8))
    got = batch["rays"][0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(c2w[0], CAMERA0, atol=1e-6)
    # camera 0 at the origin: the moments of its rays vanish
    assert np.abs(got[0, 3:6]).max() < 1e-5


def test_faceid_prompts_mark_each_view_with_its_caption(shards_dir):
    stream = _stream(shards_dir, paths={"faceid": shards_dir}, faceid_max_views=3)
    batch = stream.make_batch(0)
    assert batch["pixels"].shape == (2, S.FACE_VIEWS, 3, 32, 32)
    for key, prompt, mask in zip(
        batch["keys"], batch["prompts"], batch["cond_mask"].tolist(), strict=True
    ):
        i = int(key.rsplit("_", 1)[1])
        want = " ".join(f"[[img{v}]] person {i} photo {v}" for v in range(S.FACE_VIEWS))
        assert prompt == f"[[faceid]] {want}"
        assert mask == [False, True, True]  # img0 the target, the others references


def test_a_broken_camera_file_is_skipped_by_name(tmp_path):
    from datagen import shards

    key = "multiview_0000"
    files = S.group_files("multiview", key, 0)
    files["cameras.npy"] = files["cameras.npy"][:40]  # cut short
    out = str(tmp_path / "out")
    shards.commit_shard(out, "multiview", [(key, files), S.sample("multiview", 1)])
    shards.write_manifest(out, "multiview", {})
    stream = _stream(out, paths={"multiview": out}, batch_size=1)
    reasons: Counter = Counter()
    for k in range(6):
        batch = stream.make_batch(k)
        reasons.update(batch["skip_reasons"])
        if batch["skipped"]:
            assert "cameras.npy" in batch["skip_last"], batch["skip_last"]
        assert batch["keys"] == ["multiview_0001"]
    assert reasons["schema"] >= 1


FIT_YAML = """
name: group-fit
seed: 1
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 32}
optim: {lr: 5.0e-4, warmup_steps: 2}
trainer: {accelerator: cpu, devices: 2, max_steps: 6, log_every_n_steps: 2}
checkpoint: {every_n_steps: 6, keep: -1}
data:
  kind: onegen
  paths: {t2i: OUT, multiview: OUT, faceid: OUT}
  batch_size: 2
  num_workers: 0
  buckets: [[32, 32]]
  multiview_max_views: 3
  faceid_max_views: 3
  camera_pose_prob: 0.5
  seed: 4
samples: {every_n_steps: 0}
experiment: onegen-group-test
mlflow: {tracking_uri: "sqlite:///WORK/mlflow.db", synchronous: true, system_metrics: false}
"""


@pytest.mark.slow
def test_fsdp_fit_draws_multiview_and_faceid_batches(shards_dir, tmp_path):
    """Two gloo processes under ModelParallelStrategy (FSDP2), 6 steps: the per-task losses
    of the three families reach MLflow, finite, and a sharded checkpoint is written."""
    from mlflow.tracking import MlflowClient

    cfg = tmp_path / "fit.yaml"
    cfg.write_text(FIT_YAML.replace("OUT", shards_dir).replace("WORK", str(tmp_path)))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    proc = subprocess.run(
        [sys.executable, "-m", "training.fit", "--config", str(cfg), f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "run" / "checkpoints" / "step00000006.ckpt").is_dir()  # sharded
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics
    for task in ("text2image", "multiview", "camera_pose", "faceid"):
        assert np.isfinite(metrics[f"train/loss/{task}"]), sorted(metrics)
        assert metrics[f"train/samples/{task}"] > 0
