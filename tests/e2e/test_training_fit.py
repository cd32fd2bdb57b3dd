"""Lightning + FSDP2 fit on CPU: sharding, zero-init survival, exact resume, MLflow, sampling.

The FSDP2 runs are real 2-process fits (gloo): ``python -m training.fit`` in a subprocess,
Lightning's ModelParallelStrategy launching the second rank itself. The data is the
synthetic source of the training batch contract (``training.fit.SyntheticDataModule``):
batch k of rank r is a pure function of (seed, r, k), so an interrupted-and-resumed run can
be compared with an uninterrupted one exactly. Ranks write what they see through the
``StateReport`` callback (``debug.report_dir``): layout at train start, full gathered
model/EMA/optimizer state at train end.

Three FSDP fits run once per module (about 40 s each on 2 CPUs):
  A   steps 0 -> 6 uninterrupted
  B1  steps 0 -> 3, stops (checkpoint at 3)
  B2  resume=last -> 6, same run dir, same MLflow run
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import REPO
from tests.helpers.fit_states import assert_restored

FIT_YAML = """
name: fsdp-test
seed: 3
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 24}
optim: {lr: 5.0e-4, warmup_steps: 2, grad_clip: 1.0}
ema: {decay: 0.9}
trainer: {accelerator: cpu, devices: 2, max_steps: 6, log_every_n_steps: 2}
checkpoint: {every_n_steps: 3, keep: -1}
data:
  kind: synthetic
  batch_size: 2
  synthetic: {resolution: 32, max_views: 2, tasks: [text2image, canny2image, depth2image]}
samples:
  every_n_steps: 3
  tasks: [text2image, canny2image, depth2image]
  prompts: ["a photo of a cat"]
  resolution: 32
  steps: 2
experiment: onegen-test
mlflow: {synchronous: false, system_metrics: true,
         system_metrics_interval: 1}
"""


NOISE_OF_A_FIT = (
    "GPU available",  # Lightning's rank_zero_info
    "TPU available",
    "litlogger",
    "`Trainer.fit` stopped",
    "INFO mlflow",  # MLflow's own INFO lines (database tables, system metrics)
    "Experiment with name",  # Lightning's MLflow logger creating the experiment
    "LeafSpec",  # Lightning's pytree deprecation
)


def _fit(workdir: Path, name: str, *overrides: str, timeout: int = 300) -> str:
    """One ``python -m training.fit`` (every rank), from ``workdir``; returns its console
    (stdout, then stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "fit.yaml"
    cfg.write_text(FIT_YAML)
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "training.fit",
        "--config",
        str(cfg),
        f"run_dir={workdir / name}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _run_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("mlflow run: "))
    return line.split()[2]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("fsdp")
    out_a = _fit(work, "A", f"debug.report_dir={work / 'report_A'}", "mlflow.enabled=false")
    out_b1 = _fit(work, "B", "trainer.max_steps=3", f"debug.report_dir={work / 'report_B1'}")
    out_b2 = _fit(
        work, "B", "trainer.max_steps=6", "resume=last", f"debug.report_dir={work / 'report_B2'}"
    )
    # Another process count: 2 -> 1 (B's sharded step-3 checkpoint read whole by one
    # process) and 1 -> 2 (a single-device file checkpoint resharded over two).
    (work / "C" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        work / "B" / "checkpoints" / "step00000003.ckpt",
        work / "C" / "checkpoints" / "step00000003.ckpt",
    )
    quiet = ("mlflow.enabled=false", "samples.every_n_steps=0", "checkpoint.every_n_steps=100")
    out_c = _fit(work, "C", "trainer.devices=1", "trainer.max_steps=4", "resume=last",
                 f"debug.report_dir={work / 'report_C'}", *quiet)  # fmt: skip
    out_d1 = _fit(work, "D", "trainer.devices=1", "trainer.max_steps=3", "mlflow.enabled=false",
                  "samples.every_n_steps=0", f"debug.report_dir={work / 'report_D1'}")  # fmt: skip
    out_d2 = _fit(work, "D", "--verbose", "trainer.devices=2", "trainer.max_steps=4",
                  "resume=last", f"debug.report_dir={work / 'report_D2'}", *quiet)  # fmt: skip
    outs = {"A": out_a, "B1": out_b1, "B2": out_b2, "C": out_c, "D1": out_d1, "D2": out_d2}
    return {"work": work, "out": outs}


def _report(runs: dict, name: str, part: str) -> dict:
    return json.loads((runs["work"] / f"report_{name}" / f"{part}.json").read_text())


def _state(runs: dict, name: str) -> dict:
    return torch.load(runs["work"] / f"report_{name}" / "end_state.pt", weights_only=True)


# --------------------------------------------------------------------------- FSDP2 fit


@pytest.mark.slow
def test_fsdp_fit_shards_parameters_and_writes_sharded_checkpoints(fsdp_runs):
    start = _report(fsdp_runs, "A", "start")
    assert start["strategy"] == "SafeModelParallelStrategy" and start["world_size"] == 2
    rank0, rank1 = start["ranks"]
    assert set(rank0) == set(rank1) and any(k.startswith("ema.") for k in rank0)
    for key, info in rank0.items():
        assert info["type"] == "DTensor" and info["placements"] == ["S(0)"], key
        dim0 = info["local_shape"][0] + rank1[key]["local_shape"][0]
        assert dim0 == info["global_shape"][0], key  # two halves of dim 0
    # Shards are different slices, not two copies of one draw (the CPU DTensor RNG trap).
    w = "model.layers.0.ffn.w_up.weight"
    assert rank0[w]["local_sum"] != rank1[w]["local_sum"]
    # Frozen encoders: not in the module state, not in the optimizer (EMA neither).
    assert start["frozen_in_state_dict"] is False
    assert start["n_optimizer_params"] == start["n_model_params"]

    end = _report(fsdp_runs, "A", "end")
    assert end["global_step"] == 6 and len(end["losses"]) == 6
    assert all(math.isfinite(x) and 0 < x < 10 for x in end["losses"])
    assert math.isfinite(end["logged"]["train/grad_norm"]) and end["logged"]["train/grad_norm"] > 0

    from torch.distributed.checkpoint import FileSystemReader

    for step in (3, 6):
        ckpt = fsdp_runs["work"] / "A" / "checkpoints" / f"step{step:08d}.ckpt"
        assert ckpt.is_dir(), ckpt
        assert {p.name for p in ckpt.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt"}
        keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
        model_keys = [k for k in keys if k.startswith("state_dict.")]
        assert model_keys and all(
            k.startswith(("state_dict.model.", "state_dict.ema.")) for k in model_keys
        )
        assert any(k.startswith("optimizer_0.") for k in keys)


@pytest.mark.slow
def test_zero_inits_survive_meta_device_materialisation(fsdp_runs):
    start = _report(fsdp_runs, "A", "start")
    assert start["built_on_meta"] is True and start["global_step"] == 0
    zero = start["zero_init_max_abs"]
    assert len(zero) == 2 * (2 * 3 + 4)  # model + ema: per block gate/mod w/b, final mod + linear
    assert all(v == 0.0 for v in zero.values()), zero
    assert all(v == 0.0 for v in start["norm_weight_max_dev_from_1"].values())
    assert all(v > 0.0 for v in start["linear_max_abs"].values())
    assert start["ema_equals_model"] is True


def test_lightning_materialisation_breaks_zero_init_and_init_sharded_restores_it():
    """The trap itself, without processes: Lightning's to_empty + reset_parameters pass
    leaves Kaiming adaLN weights; ``init_sharded`` (what on_fit_start runs) restores them."""
    from lightning.fabric.utilities.init import _materialize_distributed_module

    from model import NextDiT, get_config
    from training.parallelize import init_sharded

    with torch.device("meta"):
        net = NextDiT(get_config("tiny"))
    _materialize_distributed_module(net, torch.device("cpu"))
    assert net.layers[0].modulation.weight.abs().max() > 0  # zero init lost
    init_sharded(net)
    for block in net.layers:
        assert block.modulation.weight.abs().max() == 0 and block.attn.text_gate.abs().max() == 0
    assert net.final.linear.weight.abs().max() == 0


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(fsdp_runs):
    assert _report(fsdp_runs, "B2", "start")["global_step"] == 3
    a, b = _state(fsdp_runs, "A"), _state(fsdp_runs, "B2")
    assert set(a["model"]) == set(b["model"])
    assert any(k.startswith("ema.") for k in a["model"])
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert worst <= 1e-6, f"model/EMA differ by {worst}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb) and sa
    worst_opt = max(
        (sa[k][s].float() - sb[k][s].float()).abs().max().item() for k in sa for s in sa[k]
    )
    assert worst_opt <= 1e-6, f"optimizer state differs by {worst_opt}"
    ema_moved = max(
        (a["model"][k] - a["model"]["ema." + k[len("model.") :]]).abs().max().item()
        for k in a["model"]
        if k.startswith("model.")
    )
    assert ema_moved > 0  # the EMA is a real average, not a copy
    losses_a = _report(fsdp_runs, "A", "end")["losses"]
    assert _report(fsdp_runs, "B1", "end")["losses"] == losses_a[:3]
    assert _report(fsdp_runs, "B2", "end")["losses"] == losses_a[3:]


@pytest.mark.slow
@pytest.mark.parametrize(("resumed", "saved"), [("C", "B1"), ("D2", "D1")], ids=["2to1", "1to2"])
def test_resume_on_another_process_count_restores_the_saved_state(fsdp_runs, resumed, saved):
    """Model, EMA and optimizer state right after the restore equal what the other process
    count saved (gathered whole, keyed by name on both sides)."""
    start = _report(fsdp_runs, resumed, "start")
    assert start["global_step"] == 3
    assert start["world_size"] == (1 if resumed == "C" else 2)
    assert _report(fsdp_runs, saved, "start")["world_size"] == (2 if saved == "B1" else 1)
    restored = torch.load(
        fsdp_runs["work"] / f"report_{resumed}" / "start_state.pt", weights_only=True
    )
    assert_restored(_state(fsdp_runs, saved), restored)
    assert _report(fsdp_runs, resumed, "end")["global_step"] == 4  # and it trains on


@pytest.mark.slow
def test_mlflow_run_records_and_resume_continues_it(fsdp_runs):
    from mlflow.tracking import MlflowClient

    run_id = _run_id(fsdp_runs["out"]["B1"])
    assert _run_id(fsdp_runs["out"]["B2"]) == run_id
    assert _report(fsdp_runs, "B2", "end")["mlflow_run_id"] == run_id
    client = MlflowClient(f"sqlite:///{fsdp_runs['work'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("onegen-test").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # run A had mlflow off; B is one run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.config"] == "tiny" and params["optim.lr"] == "0.0005"
    assert params["trainer.devices"] == "2"
    metrics = run.data.metrics
    tasks = [k for k in metrics if k.startswith("train/loss/")]
    assert len(tasks) >= 2, sorted(metrics)
    for key in (
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "perf/samples_per_s",
        "perf/tokens_per_s",
    ):
        assert key in metrics, sorted(metrics)
    assert any(k.startswith("system/") for k in metrics), "no system metrics"
    history = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [2, 4, 6]  # steps before and after the resume, one run

    def files(path=""):
        for f in client.list_artifacts(run_id, path):
            yield from files(f.path) if f.is_dir else [f.path]

    artifacts = set(files())
    assert "config/config.yaml" in artifacts and "config/resume_step00000003.yaml" in artifacts
    # Sample grids through log_image: one image per task and step, for the UI's step slider.
    assert any(a.startswith("images/samples~text2image+step+3+") for a in artifacts)
    assert any(a.startswith("images/samples~text2image+step+6+") for a in artifacts)
    assert any(
        a.startswith(("images/samples~canny2image+step+6+", "images/samples~depth2image+step+6+"))
        for a in artifacts
    )
    tags = run.data.tags
    assert tags["checkpoint.latest"].endswith("step00000006.ckpt")
    assert tags["checkpoint.step_00000003"].endswith("step00000003.ckpt")
    assert tags["onegen.resume_count"] == "1" and tags["onegen.system_metrics"] == "on"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic"]
    sidecar = json.loads((fsdp_runs["work"] / "B" / "mlflow_run.json").read_text())
    assert sidecar["run_id"] == run_id


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["A", "B1", "C", "D1"])
def test_console_holds_the_fits_lines_not_lightnings_or_mlflows(fsdp_runs, name):
    """Quiet by default: the fit's progress and result, not Lightning's INFO lines, MLflow's
    INFO lines or Lightning's pytree deprecation (``common.console``)."""
    console = fsdp_runs["out"][name]
    assert "done: step" in console and "| loss " in console
    for noise in NOISE_OF_A_FIT:
        assert noise not in console, noise


@pytest.mark.slow
def test_verbose_brings_lightnings_console_back(fsdp_runs):
    console = fsdp_runs["out"]["D2"]
    assert "GPU available: False" in console and "done: step 4" in console


def test_sample_from_sharded_checkpoint_loads_ema(fsdp_runs, tmp_path):
    from PIL import Image

    from training.inference.sample import sample_from_checkpoint

    ckpt = fsdp_runs["work"] / "B" / "checkpoints" / "step00000006.ckpt"
    paths = sample_from_checkpoint(ckpt, "text2image", tmp_path / "t2i", steps=2, size=32)
    assert [p.name for p in paths] == ["text2image_view0_generated.png", "text2image_grid.png"]
    assert Image.open(paths[0]).size == (32, 32)


# --------------------------------------------------------------------------- single device + CLI


def test_cli_single_device_fit_then_sample(tmp_path, capsys, monkeypatch):
    """``onegen train fit`` on one CPU device (plain strategy, a .ckpt file), then
    ``onegen sample`` from it with a condition image."""
    from PIL import Image

    from orchestration.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(FIT_YAML)
    rc = main([
        "train", "fit", "--config", str(cfg),
        "trainer.devices=1", "trainer.max_steps=4", "checkpoint.every_n_steps=4",
        "samples.every_n_steps=4", f"run_dir={tmp_path / 'run'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.system_metrics=false",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "mlflow run: " in out and "mlflow ui --backend-store-uri sqlite:///" in out
    ckpt = tmp_path / "run" / "checkpoints" / "step00000004.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith(("model.", "ema.")) for k in state["state_dict"])
    assert OmegaConf.create(state["onegen"]["config"]).model.config == "tiny"
    assert state["onegen"]["mlflow_run_id"] == _run_id(out)

    Image.new("RGB", (40, 36), (200, 30, 30)).save(tmp_path / "cond.png")
    rc = main([
        "sample", "--checkpoint", str(ckpt), "--task", "depth2image",
        "--image", str(tmp_path / "cond.png"), "--out", str(tmp_path / "samples"),
        "--steps", "2", "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == [
        "depth2image_grid.png",
        "depth2image_view0_generated.png",
        "depth2image_view1_condition.png",
    ]
    assert Image.open(tmp_path / "samples" / "depth2image_view0_generated.png").size == (32, 32)


def test_cli_keeps_datagen_commands_and_parses_training():
    from orchestration.cli import parser

    p = parser()
    args = p.parse_args(["datagen", "status", "out"])
    assert args.func.__name__ == "_datagen_status"
    args = p.parse_args(["train", "fit", "--config", "c.yaml", "a.b=1", "trainer.devices=2"])
    assert args.func.__name__ == "_train_fit" and args.overrides == ["a.b=1", "trainer.devices=2"]
    args = p.parse_args(["sample", "--checkpoint", "x.ckpt", "--task", "depth2image", "--out", "o"])
    assert args.func.__name__ == "_sample" and args.weights is None and args.ema is None


# --------------------------------------------------------------------------- configs and data


def test_configs_resolve_and_pick_strategies(monkeypatch):
    from training.config import load_config, model_config
    from training.fit import precision, use_fsdp

    # No tracking URI in the configs: MLflow's environment variable, else sqlite:///mlflow.db
    # (an earlier in-process fit may have set it: mlflow.set_tracking_uri exports it).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    demo = load_config(REPO / "training/configs/demo.yaml", ["trainer.max_steps=7"])
    assert demo.trainer.max_steps == 7 and demo.runs_dir == "runs" and demo.run_dir is None
    assert demo.experiment == "onegen-demo" and demo.mlflow.tracking_uri == "sqlite:///mlflow.db"
    assert not use_fsdp(demo) and use_fsdp(
        load_config(REPO / "training/configs/demo.yaml", ["trainer.devices=2"])
    )
    assert model_config(demo).name == "tiny"

    big = load_config(REPO / "training/configs/onediffusion-2.8b.yaml")
    assert use_fsdp(big) and precision(big) == "32-true"
    assert big.optim.lr == 5e-4 and big.model.activation_checkpointing and big.model.compile
    assert model_config(big).hidden_size == 3840 and model_config(big).caption_dim == 2048
    assert big.encoders.kind == "pretrained"


def test_configs_data_nodes_fit_the_datamodule():
    data = pytest.importorskip("training.data.datamodule")
    from training.config import load_config

    for name in ("demo", "onediffusion-2.8b"):
        node = load_config(REPO / f"training/configs/{name}.yaml").data
        data.DataConfig.from_any(node)  # raises on unknown keys or bad buckets


def test_synthetic_batches_follow_the_contract_and_are_pure():
    from training.data.synthetic import synthetic_batch

    kw = {"batch_size": 3, "resolution": 32, "max_views": 2, "tasks": ["text2image", "canny2image"]}
    seen_views = set()
    for k in range(8):
        b = synthetic_batch(5, 1, k, **kw)
        again = synthetic_batch(5, 1, k, **kw)
        assert torch.equal(b["pixels"], again["pixels"]) and b["prompts"] == again["prompts"]
        B, V, C, H, W = b["pixels"].shape
        assert (B, C, H, W) == (3, 3, 32, 32) and b["pixels"].abs().max() <= 1
        assert b["cond_mask"].dtype == torch.bool and b["cond_mask"].shape == (B, V)
        assert all(len(b[key]) == B for key in ("prompts", "tasks", "subsets", "keys"))
        assert (not b["cond_mask"][:, 0].any()) and (V == 1 or b["cond_mask"][:, 1:].all())
        seen_views.add(V)
    assert seen_views == {1, 2}
    assert not torch.equal(
        synthetic_batch(5, 0, 0, **kw)["pixels"], synthetic_batch(5, 1, 0, **kw)["pixels"]
    )
