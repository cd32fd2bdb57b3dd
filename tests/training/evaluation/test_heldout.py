"""Held-out evaluation on real shards (every subset, written as datagen writes them):
``data.holdout`` keeps its keys out of training for good, the items are the same wherever
they are built, an oracle generation scores perfectly, the ranks' shares add up to one
process's result, and a fit logs ``eval/<task>/<metric>`` and its table in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import depth_pose_shards as S
from training.data.datamodule import OneGenDataModule
from training.data.holdout import holdout_point, split_holdout
from training.evaluation.heldout import held_out_items, merge_totals, run_items, score_item

SUBSETS = ("t2i", "i2i", "semantic", "depth", "pose", "multiview", "faceid")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return S.write_all(str(tmp_path_factory.mktemp("heldout") / "out"))


def _dm(out: str, holdout: float = 0.4, **kw) -> OneGenDataModule:
    dm = OneGenDataModule({
        "paths": {s: out for s in SUBSETS}, "batch_size": 2, "num_workers": 0, "seed": 1,
        "buckets": [[32, 32]], "holdout": holdout, "faceid_max_views": S.FACE_VIEWS,
        "multiview_max_views": S.MV_VIEWS, **kw,
    })  # fmt: skip
    dm.setup()
    return dm


def test_the_split_is_by_key_hash_alone(shards):
    dm = _dm(shards)
    for subset, held in dm.held_out.items():
        train = dm.indexes[subset]
        held_keys, train_keys = set(held.keys.to_pylist()), set(train.keys.to_pylist())
        assert not held_keys & train_keys
        assert all(holdout_point(subset, k) < 0.4 for k in held_keys)
        assert all(holdout_point(subset, k) >= 0.4 for k in train_keys)
    assert sum(h.num_samples for h in dm.held_out.values()) > 0
    # another seed, another fraction's superset: the same keys stay held out
    more = _dm(shards, holdout=0.45, seed=9)
    for subset, held in dm.held_out.items():
        assert set(held.keys.to_pylist()) <= set(more.held_out[subset].keys.to_pylist())


def test_split_keeps_byte_ranges_and_shards():
    import pyarrow as pa

    from training.data.index import SubsetIndex

    keys = [f"k{i:04d}" for i in range(2000)]
    index = SubsetIndex(
        "t2i", ["a.tar", "b.tar"], np.array([0, 1200, 2000]), np.arange(2000) * 10,
        np.full(2000, 10), pa.array(keys),
    )  # fmt: skip
    train, held = split_holdout(index, 0.25)
    assert abs(held.num_samples / 2000 - 0.25) < 0.04
    assert train.num_samples + held.num_samples == 2000
    for part in (train, held):
        assert part.urls == ["a.tar", "b.tar"] and part.shard_start[-1] == part.num_samples
        for s in range(2):  # each sample keeps its own offset inside its own shard
            rows = range(int(part.shard_start[s]), int(part.shard_start[s + 1]))
            for i in rows:
                original = keys.index(part.key(i))
                assert part.offsets[i] == original * 10 and (original < 1200) == (s == 0)


def test_the_training_stream_never_reads_a_held_out_key(shards):
    dm = _dm(shards)
    held = {(s, k) for s, h in dm.held_out.items() for k in h.keys.to_pylist()}
    stream = dm.stream(start_batch=0, rank=0)
    seen = set()
    for k in range(60):
        batch = stream.make_batch(k)
        seen |= set(zip(batch["subsets"], batch["keys"], strict=True))
    assert seen and not seen & held


def test_items_are_a_pure_function_of_the_held_out_keys(shards):
    dm = _dm(shards)
    a, problems = held_out_items(dm.cfg, dm.held_out, None, 2)
    b, _ = held_out_items(_dm(shards, seed=5).cfg, _dm(shards, seed=5).held_out, None, 2)
    assert not problems
    assert [(i.task, i.key, i.prompt) for i in a] == [(i.task, i.key, i.prompt) for i in b]
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    tasks = {i.task for i in a}
    assert {"image2depth", "depth2image", "canny2image", "multiview", "camera_pose"} <= tasks
    assert "text2image" not in tasks and "faceid" not in tasks  # no metric without weights
    for task in tasks:
        assert sum(i.task == task for i in a) <= 2
    one, _ = held_out_items(dm.cfg, dm.held_out, ["image2depth"], 1)
    assert [i.task for i in one] == ["image2depth"] and "[[depth2image]]" in one[0].prompt


def _oracle(prompts, *, seed, cond_pixels, cond_mask, cond_rays=None, **_):
    """A generation that returns each item's own ground truth: every score is perfect."""
    from training.inference.generate import MultiviewSample

    if cond_rays is not None:
        return MultiviewSample(cond_pixels.clone(), cond_rays.clone())
    return cond_pixels.clone()


def test_an_oracle_scores_perfectly(shards):
    dm = _dm(shards)
    items, _ = held_out_items(dm.cfg, dm.held_out, None, 2)
    results = merge_totals([run_items(_oracle, items, 0, 1, seed=0)])
    assert results["image2depth"]["abs_rel"] < 1e-9 and results["image2depth"]["delta1"] == 1.0
    assert results["depth2image"]["psnr"] == 100.0 and results["depth2image"]["ssim"] == 1.0
    assert results["multiview"]["psnr"] == 100.0
    cam = results["camera_pose"]
    assert cam["rotation_acc_15"] == 1.0 and cam["center_acc_0.1"] == 1.0
    for task, per in results.items():
        assert per["n"] == sum(i.task == task for i in items)
    worse = items[0].pixels.clone()
    worse[:, 0] = -worse[:, 0]
    assert score_item(items[0], worse)["psnr"] < 100.0


def test_ranks_shares_add_up_to_one_process(shards):
    dm = _dm(shards)
    items, _ = held_out_items(dm.cfg, dm.held_out, None, 2)
    calls = []

    def counted(prompts, **kw):
        calls.append(prompts[0])
        out = kw["cond_pixels"] * 0.5  # a fixed, imperfect generation
        if kw.get("cond_rays") is not None:
            from training.inference.generate import MultiviewSample

            return MultiviewSample(out, kw["cond_rays"] * 0.9)
        return out

    whole = merge_totals([run_items(counted, items, 0, 1, seed=0)])
    n = len(calls)
    calls.clear()
    parts = [run_items(counted, items, r, 3, seed=0) for r in range(3)]
    assert len(calls) == 3 * -(-n // 3)  # every rank makes the same number of calls
    merged = merge_totals(parts)
    assert merged.keys() == whole.keys()
    for task in whole:
        for name, value in whole[task].items():
            assert merged[task][name] == pytest.approx(value, rel=1e-12), (task, name)


def test_bad_eval_settings_are_one_line(tmp_path, capsys):
    from orchestration.cli import main
    from tests.helpers import REPO

    def run(*args: str) -> tuple[int, str]:
        code = main(["train", "fit", "--config", str(REPO / "training/configs/demo.yaml"),
                     f"runs_dir={tmp_path}", *args, "--print-config"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    code, line = run("eval.every_n_steps=5", "data.holdout=0")
    assert code == 2 and "data.holdout > 0" in line, line
    code, line = run("eval.every_n_steps=5", "data.holdout=0", "data.kind=synthetic")
    assert code == 0, line  # nothing to hold out: the fit warns and runs without eval
    code, line = run("eval.tasks=[text2image]")
    assert code == 2 and "eval.tasks: 'text2image' has no held-out metric" in line, line
    assert "'text2image' has no held-out metric (with eval.clip_path)" in line
    code, line = run("eval.tasks=[faceid]")
    assert code == 2 and "'faceid' has no held-out metric (with eval.face_path)" in line, line
    code, line = run(f"eval.face_path={tmp_path}")
    assert code == 2 and f"eval.face_path {tmp_path}: no backbone.pth or detector.pt" in line
    code, line = run(f"eval.clip_path={tmp_path}")
    assert code == 2 and f"eval.clip_path {tmp_path}: not a CLIP folder" in line, line
    code, line = run(f"eval.lpips_path={tmp_path}")
    assert code == 2 and "expected vgg.pth + vgg16-397923af.pth" in line, line
    code, line = run("data.holdout=1.0")
    assert code == 2 and "data.holdout: a fraction in [0, 1)" in line, line
    code, line = run("eval.num_samples=0")
    assert code == 2 and "eval.num_samples: must be >= 1" in line, line


@pytest.fixture(scope="module")
def scorer_folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny CLIP, LPIPS and face weights, each saved in its published format (random)."""
    from tests.helpers.tiny_clip import save_tiny_clip
    from tests.helpers.tiny_face import save_face_folder
    from tests.helpers.tiny_lpips import save_lpips_folder

    root = tmp_path_factory.mktemp("scorers")
    save_lpips_folder(root / "lpips", "alex")
    return save_tiny_clip(root / "clip"), root / "lpips", save_face_folder(root / "face")


def test_scorers_add_clip_score_lpips_and_identity(shards, scorer_folders):
    from training.evaluation.scored import PHOTO_TASKS, scorable_tasks
    from training.evaluation.scorers import Scorers

    dm = _dm(shards)
    paths = dict(zip(("clip", "lpips", "face"), map(str, scorer_folders), strict=True))
    scorers = Scorers.load({k: (p, k) for k, p in paths.items()}, "cpu")
    items, _ = held_out_items(dm.cfg, dm.held_out, None, 1, scorable_tasks("x", "x"))
    assert {"text2image", "faceid"} <= {i.task for i in items}
    oracle = merge_totals([run_items(_oracle, items, 0, 1, seed=0, scorers=scorers)])
    assert 0 <= oracle["text2image"]["clip_score"] <= 100
    # the true target itself: its own face, found again (the random detector always finds one)
    assert oracle["faceid"]["id_sim"] == pytest.approx(1.0) and oracle["faceid"]["face_found"] == 1
    assert oracle["multiview"]["lpips"] < 1e-6  # the truth itself: no perceptual distance
    photo = [t for t in oracle if t in PHOTO_TASKS]
    assert photo and all(oracle[t]["lpips"] < 1e-6 for t in photo)
    assert "lpips" not in oracle["image2depth"]  # a map target: LPIPS is for photos
    worse = merge_totals([run_items(lambda p, **kw: -_oracle(p, **kw), [i for i in items if i.task in photo],
                                    0, 1, seed=0, scorers=scorers)])  # fmt: skip
    assert all(worse[t]["lpips"] > 0 for t in worse)


@pytest.mark.slow
def test_a_fit_logs_held_out_metrics_and_tables_in_mlflow(shards, scorer_folders, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.helpers import REPO
    from training.config import load_config
    from training.fit import fit

    paths = "{" + ",".join(f"{s}: {shards}" for s in SUBSETS) + "}"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(REPO / "training/configs/demo.yaml", [
        f"data.paths={paths}", "data.holdout=0.4", "eval.every_n_steps=2", "eval.num_samples=1",
        "eval.steps=2", "trainer.max_steps=4", "samples.every_n_steps=0", "data.num_workers=0",
        "data.batch_size=2", f"data.faceid_max_views={S.FACE_VIEWS}", f"runs_dir={tmp_path}/runs",
        f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false", "data.buckets=[[32,32]]",
        f"eval.clip_path={scorer_folders[0]}", f"eval.lpips_path={scorer_folders[1]}",
        f"eval.face_path={scorer_folders[2]}",
    ])  # fmt: skip
    result = fit(cfg)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert "eval/image2depth/abs_rel" in run.data.metrics
    assert "eval/text2image/clip_score" in run.data.metrics  # with the local CLIP
    assert (
        "eval/multiview/lpips" in run.data.metrics and "eval/depth2image/lpips" in run.data.metrics
    )
    assert "eval/faceid/id_sim" in run.data.metrics
    assert "eval/camera_pose/rotation_acc_15" in run.data.metrics
    history = client.get_metric_history(result.run_id, "eval/depth2image/psnr")
    assert [m.step for m in history] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert artifacts == {"eval/step00000002.json", "eval/step00000004.json"}
    table = json.loads((Path(result.run_dir) / "eval" / "step00000004.json").read_text())
    assert table["tasks"]["image2depth"]["n"] == 1 and table["keys"]["image2depth"]
    log = (Path(result.run_dir) / "logs" / "fit.log").read_text()
    assert "eval step 4 | " in log and "image2depth abs_rel" in log


@pytest.mark.slow
def test_two_process_fsdp_fit_evaluates_each_item_once(shards, tmp_path):
    """FSDP2 over 2 gloo processes: each rank samples its share (the same number of sampler
    calls on both, every forward all-gathers), the scores are gathered, rank 0 logs them."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    paths = "{" + ",".join(f"{s}: {shards}" for s in SUBSETS) + "}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.fit", "--config", str(REPO / "training/configs/demo.yaml"),
           f"data.paths={paths}", "data.holdout=0.4", "eval.every_n_steps=2", "eval.num_samples=1",
           "eval.steps=2", "eval.tasks=[image2depth,multiview,canny2image]", "trainer.max_steps=2",
           "trainer.devices=2", "samples.every_n_steps=0", "data.num_workers=0",
           "data.batch_size=2", f"data.faceid_max_views={S.FACE_VIEWS}", "data.buckets=[[32,32]]",
           f"runs_dir={tmp_path}/runs", "mlflow.enabled=false", "run_name=fsdp"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = json.loads((tmp_path / "runs/onegen-demo/fsdp/eval/step00000002.json").read_text())
    dm = _dm(shards)
    items, _ = held_out_items(dm.cfg, dm.held_out, ["image2depth", "multiview", "canny2image"], 1)
    assert len(items) == 3  # odd over 2 ranks: rank 1 makes a padded call that is not counted
    assert {t: int(v["n"]) for t, v in table["tasks"].items()} == {i.task: 1 for i in items}
    assert proc.stdout.count("eval step 2 | ") == 1  # rank 0 alone prints it
