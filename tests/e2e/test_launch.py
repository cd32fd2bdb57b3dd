"""Multi-node launch: the launcher environments (``training.run.cluster``), the launch scripts
(``orchestration/launch/``), and a real two-"node" torchrun fit on this machine.

The unit tests check ``launch_shape`` against the rules of Lightning's own
``TorchElasticEnvironment`` / ``SLURMEnvironment`` (so the trainer built from it always passes
Lightning's checks) and what the scripts hand to torchrun / srun (fake executables).

The slow test starts ``orchestration/launch/torchrun.sh`` twice, as node 0 and node 1 of a
2-node job (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on 127.0.0.1), each running
``onegen train fit`` on CPU/gloo with a config that says ``devices: 1, num_nodes: 1``: the
fit still runs as world size 2 (FSDP2), both nodes write into one run folder, a sharded
checkpoint appears, and a second 2-node job with ``resume=last`` continues that run folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from training.config import ConfigError
from training.run.cluster import agree, global_rank, launch_shape

TORCHRUN_SH = REPO / "orchestration" / "launch" / "torchrun.sh"
SBATCH = REPO / "orchestration" / "launch" / "slurm.sbatch"
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- launch_shape


def _torchrun_env(world: int, local: int, rank: int, **extra: str) -> dict[str, str]:
    env = {
        "TORCHELASTIC_RUN_ID": "job7",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local),
        "GROUP_WORLD_SIZE": str(world // local),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local),
        "GROUP_RANK": str(rank // local),
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    env.update(extra)
    return env


def _slurm_env(tasks: int, nodes: int, per_node: str | None, rank: int, **extra: str):
    env = {
        "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_PROCID": str(rank),
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "onegen-2.8b",
    }
    if per_node is not None:
        env["SLURM_NTASKS_PER_NODE"] = per_node
    env.update(extra)
    return env


def test_no_launcher():
    assert launch_shape({}) is None
    assert launch_shape({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}) is None
    assert global_rank({}) == 0


def test_torchrun_shape():
    shape = launch_shape(_torchrun_env(16, 8, 9))
    assert (shape.launcher, shape.num_nodes, shape.devices, shape.rank) == ("torchrun", 2, 8, 9)
    assert shape.job_id == "job7" and shape.world_size == 16
    assert global_rank(_torchrun_env(16, 8, 9)) == 9
    # torchrun's default --rdzv-id ("none") is no job id: the run name is agreed instead.
    assert launch_shape(_torchrun_env(2, 1, 1, TORCHELASTIC_RUN_ID="none")).job_id is None
    # Without GROUP_WORLD_SIZE (another launcher setting the torchelastic variables).
    env = _torchrun_env(4, 2, 3)
    del env["GROUP_WORLD_SIZE"]
    assert launch_shape(env).num_nodes == 2


def test_torchrun_wins_inside_slurm():
    """srun -> torchrun.sh: SLURM's variables describe the agents (one task per node); the
    trainers are torchrun's. Lightning tries TorchElasticEnvironment first, so do we."""
    env = _slurm_env(2, 2, "1", 1) | _torchrun_env(16, 8, 12)
    shape = launch_shape(env)
    assert (shape.launcher, shape.num_nodes, shape.devices, shape.rank) == ("torchrun", 2, 8, 12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"WORLD_SIZE": "3", "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "same --nproc"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"LOCAL_WORLD_SIZE": "0"}, "must be >= 1"),
        ({"RANK": "4"}, "RANK=4 is outside"),
        ({"RANK": None}, "RANK is missing"),
        ({"LOCAL_WORLD_SIZE": None}, "LOCAL_WORLD_SIZE is missing"),
    ],
)
def test_torchrun_errors(change, message):
    env = _torchrun_env(4, 2, 0)
    for key, value in change.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    with pytest.raises(ConfigError, match=message):
        launch_shape(env)


def test_slurm_shape():
    shape = launch_shape(_slurm_env(16, 2, "8", 9))
    assert (shape.launcher, shape.num_nodes, shape.devices, shape.rank) == ("slurm", 2, 8, 9)
    assert shape.job_id == "123456"
    # One task (an sbatch script running the fit itself): one process.
    shape = launch_shape(_slurm_env(1, 1, None, 0))
    assert (shape.num_nodes, shape.devices) == (1, 1)
    # SLURM_NNODES is the step's node count (what Lightning compares num_nodes with); the
    # allocation may be larger.
    shape = launch_shape(_slurm_env(8, 1, "8", 0, SLURM_JOB_NUM_NODES="4"))
    assert (shape.num_nodes, shape.devices) == (1, 8)


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_slurm_interactive_shell_is_no_launcher(name):
    """Lightning's rule: a job named bash / interactive is an allocation's shell, not tasks
    SLURM launched; Lightning (or torchrun) starts the processes there."""
    assert launch_shape(_slurm_env(8, 1, "8", 0, SLURM_JOB_NAME=name)) is None
    torchrun = _slurm_env(8, 1, "8", 0, SLURM_JOB_NAME=name) | _torchrun_env(2, 2, 1)
    assert launch_shape(torchrun).launcher == "torchrun"


@pytest.mark.parametrize(
    "env, message",
    [
        (_slurm_env(16, 2, None, 0), "without --ntasks-per-node"),
        (_slurm_env(16, 2, "8(x2)", 0), "not one number"),
        (_slurm_env(12, 2, "8", 0), "not 2 node"),
        (_slurm_env(2, 2, None, 0), "without --ntasks-per-node"),
        (_slurm_env(16, 2, "8", 16), "SLURM_PROCID=16 is outside"),
        (_slurm_env(16, 2, "8", 0, SLURM_NNODES="two"), "SLURM_NNODES='two'"),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}, "SLURM_PROCID is missing"),
    ],
)
def test_slurm_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        launch_shape(env)


def test_global_rank_without_launcher():
    """Processes Lightning launches itself: rank 0 only on node 0's first process; the main
    process of node 1 of a hand-made multi-node job is not rank 0."""
    assert global_rank({"LOCAL_RANK": "0", "NODE_RANK": "0"}) == 0
    assert global_rank({"LOCAL_RANK": "1"}) == 1
    assert global_rank({"NODE_RANK": "1"}) != 0
    assert global_rank({"LOCAL_RANK": "1", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}) == 5


def test_agree_needs_no_store_outside_multiprocess_torchrun():
    assert agree("k", "v", {}) == "v"
    assert agree("k", "v", _slurm_env(16, 2, "8", 3)) == "v"
    assert agree("k", "v", _torchrun_env(1, 1, 0, TORCHELASTIC_RUN_ID="none")) == "v"
    env = _torchrun_env(2, 1, 1, TORCHELASTIC_RUN_ID="none", TORCHELASTIC_USE_AGENT_STORE="False")
    with pytest.raises(ConfigError, match="run_name"):
        agree("k", "v", env)


def test_fit_takes_the_shape_from_the_launcher(monkeypatch):
    from training.config import load_config
    from training.fit import apply_launcher, use_fsdp, world_size

    cfg = load_config(None, ["trainer.devices=1", "trainer.num_nodes=1"])
    for key, value in _torchrun_env(16, 8, 3).items():
        monkeypatch.setenv(key, value)
    apply_launcher(cfg)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 8)
    assert world_size(cfg) == 16 and use_fsdp(cfg)


def test_fit_refuses_a_launch_lightning_would_refuse(monkeypatch, tmp_path, capsys):
    """``onegen train fit`` in a SLURM job of 16 tasks without --ntasks-per-node: exit 2
    with one line, before anything is built or written."""
    from orchestration.cli import main

    for key, value in _slurm_env(16, 2, None, 0).items():
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("name: t\nmlflow: {enabled: false}\n")
    runs = tmp_path / "runs"
    assert main(["train", "fit", "--config", str(cfg), f"runs_dir={runs}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "onegen train fit: error: SLURM: 16 tasks without --ntasks-per-node; launch with "
        "--ntasks-per-node=<GPUs per node> (one task per GPU) so every node runs the same "
        "number of processes"
    ]
    assert not runs.exists()


# --------------------------------------------------------------------------- scripts


def _fake_bin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


# A torchrun that writes its arguments (one a line) and the knobs it was given.
FAKE_TORCHRUN = """printf '%s\\n' "$@" > "$OUT/torchrun.args"
env | grep -E '^(OMP_NUM_THREADS|NCCL_DEBUG|MLFLOW_TRACKING_URI|HF_HUB_OFFLINE)=' \
  | sort > "$OUT/torchrun.env"
"""


def _script_env(tmp_path: Path, **knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RDZV_"))}
    env.update(
        OUT=str(tmp_path), TORCHRUN=str(_fake_bin(tmp_path / "bin", "torchrun", FAKE_TORCHRUN))
    )
    env.update(ONEGEN="/opt/onegen", **knobs)
    return env


def _args(tmp_path: Path) -> list[str]:
    return (tmp_path / "torchrun.args").read_text().splitlines()


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_torchrun_script_builds_the_command(tmp_path):
    env = _script_env(
        tmp_path,
        NNODES="2",
        NPROC_PER_NODE="8",
        RDZV_ENDPOINT="node0:29400",
        RDZV_ID="job99",
        RUNS_DIR="/shared/runs",
        DATA_PATHS="/shared/data",
        WEIGHTS="/shared/w",
        MLFLOW_TRACKING_URI="http://mlflow:5000",
    )
    proc = subprocess.run(
        ["bash", str(TORCHRUN_SH), "trainer.max_steps=7", "runs_dir=/elsewhere"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = _args(tmp_path)
    assert _after(args, "--nnodes") == "2" and _after(args, "--nproc-per-node") == "8"
    assert _after(args, "--rdzv-backend") == "c10d"
    assert _after(args, "--rdzv-endpoint") == "node0:29400"
    assert _after(args, "--rdzv-id") == "job99"
    fit = args[args.index("--no-python") + 1 :]
    assert fit[:5] == [
        "/opt/onegen",
        "train",
        "fit",
        "--config",
        str(REPO / "training/configs/onediffusion-2.8b.yaml"),
    ]
    # The knobs' overrides first, the script's arguments after them (they win).
    assert fit[5:] == [
        "runs_dir=/shared/runs",
        "data.paths=/shared/data",
        "encoders.vae_path=/shared/w",
        "encoders.text_path=/shared/w",
        "trainer.max_steps=7",
        "runs_dir=/elsewhere",
    ]
    seen = (tmp_path / "torchrun.env").read_text()
    assert "MLFLOW_TRACKING_URI=http://mlflow:5000" in seen and "OMP_NUM_THREADS=1" in seen


def test_torchrun_script_static_and_single_node(tmp_path):
    env = _script_env(
        tmp_path,
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_BACKEND="static",
        RDZV_ENDPOINT="10.0.0.1:29500",
        RDZV_ID="j1",
        NODE_RANK="1",
    )
    subprocess.run(["bash", str(TORCHRUN_SH)], env=env, check=True, timeout=60)
    args = _args(tmp_path)
    assert _after(args, "--master-addr") == "10.0.0.1"
    assert _after(args, "--master-port") == "29500" and _after(args, "--node-rank") == "1"
    assert "--rdzv-backend" not in args and _after(args, "--rdzv-id") == "j1"

    env = _script_env(tmp_path, NPROC_PER_NODE="2")  # one node: a free port, a clock id
    subprocess.run(["bash", str(TORCHRUN_SH)], env=env, check=True, timeout=60)
    args = _args(tmp_path)
    assert _after(args, "--rdzv-endpoint") == "localhost:0" and _after(args, "--nnodes") == "1"
    assert _after(args, "--rdzv-id").startswith(time.strftime("%Y"))


@pytest.mark.parametrize("missing", ["RDZV_ENDPOINT", "RDZV_ID"])
def test_torchrun_script_refuses_a_multinode_job_without_rendezvous(tmp_path, missing):
    knobs = {"NNODES": "2", "RDZV_ENDPOINT": "node0:1", "RDZV_ID": "j"}
    del knobs[missing]
    proc = subprocess.run(
        ["bash", str(TORCHRUN_SH)],
        env=_script_env(tmp_path, **knobs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and missing in proc.stderr
    assert not (tmp_path / "torchrun.args").exists()


def test_sbatch_rendezvous_on_the_first_node(tmp_path):
    """The sbatch template under fake ``scontrol`` / ``srun``: the rendezvous on the first
    host of the allocation, the job id as rendezvous id, resume=auto, arguments passed on."""
    fake = tmp_path / "bin"
    # A long node list: the first line must be taken without a pipe that SIGPIPEs scontrol.
    _fake_bin(fake, "scontrol", "printf 'gpu-a17\\ngpu-a18\\n'; seq 1 20000 | sed s/^/gpu-b/\n")
    # srun: note its options, run the command once (as one node would).
    _fake_bin(
        fake,
        "srun",
        'while [ "${1#--}" != "$1" ]; do echo "$1" >> "$OUT/srun.args"; shift; done\nexec "$@"\n',
    )
    env = _script_env(
        tmp_path,
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4321987",
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="96",
        SLURM_SUBMIT_DIR=str(REPO),
        MLFLOW_TRACKING_URI="http://mlflow:5000",
    )
    proc = subprocess.run(
        ["bash", str(SBATCH), "trainer.max_steps=9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = _args(tmp_path)
    assert _after(args, "--rdzv-endpoint") == "gpu-a17:16987"  # 15000 + 1987
    assert _after(args, "--rdzv-id") == "4321987"
    assert _after(args, "--nnodes") == "2" and _after(args, "--nproc-per-node") == "8"
    assert args[-4:] == [
        "runs_dir=/checkpoints/onegen",
        "data.paths=/data/onegen",
        "resume=auto",
        "trainer.max_steps=9",
    ]
    srun = (tmp_path / "srun.args").read_text().split()
    assert "--ntasks-per-node=1" in srun and "--cpus-per-task=96" in srun

    del env["MLFLOW_TRACKING_URI"]
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "MLFLOW_TRACKING_URI" in proc.stderr


# --------------------------------------------------------------------------- 2 nodes, for real

FIT_YAML = """
name: launch-test
experiment: launch-test
seed: 1
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 16}
optim: {lr: 5.0e-4, warmup_steps: 1}
ema: {decay: 0.9}
trainer: {accelerator: cpu, devices: 1, num_nodes: 1, max_steps: 2, log_every_n_steps: 1}
checkpoint: {every_n_steps: 2, keep: -1}
data:
  kind: synthetic
  batch_size: 1
  synthetic: {resolution: 32, max_views: 1, tasks: [text2image]}
debug: {save_state: false}
mlflow: {system_metrics: false}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(none)"


def _db(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def _launch_two_nodes(work: Path, job: str, *overrides: str, timeout: float = 420) -> list[str]:
    """``torchrun.sh`` as node 0 and node 1 of one job; the nodes' stdout + stderr."""
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("SLURM_", "MASTER_", "RDZV_", "TORCHELASTIC_"))]:
        del env[key]
    env.update(
        CONFIG=str(work / "fit.yaml"),
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
        RDZV_ID=job,
        RDZV_TIMEOUT="300",
        RUNS_DIR=str(work / "runs"),
        MLFLOW_TRACKING_URI=_db(work),
        TORCHRUN=str(BIN / "torchrun"),
        ONEGEN=str(BIN / "onegen"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    logs = [work / f"{job}.node{i}.log" for i in range(2)]
    procs = []
    try:
        for log in logs:
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        ["bash", str(TORCHRUN_SH), *overrides],
                        cwd=work,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # torchrun's workers die with the group
                    )
                )
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    texts = [_tail(log, 10**6) for log in logs]
    shown = "\n".join(
        f"--- node {i} (exit {p.returncode})\n{t[-4000:]}"
        for i, (p, t) in enumerate(zip(procs, texts, strict=False))
    )
    assert all(p.returncode == 0 for p in procs), f"2-node launch {job} failed:\n{shown}"
    return texts


def _mlflow_run(texts: list[str]) -> str:
    lines = [ln for t in texts for ln in t.splitlines() if ln.startswith("mlflow run: ")]
    assert len(lines) == 1, lines  # printed by global rank 0 only
    return lines[0].split()[2]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("launch")
    (work / "fit.yaml").write_text(FIT_YAML)
    # A new sqlite store that every rank opens at the same moment: ranks take turns
    # (training.run.tracking.sqlite_store_lock), or MLflow's schema migration races.
    t0 = time.monotonic()
    first = _launch_two_nodes(work, "job1", f"debug.report_dir={work / 'report1'}")
    t1 = time.monotonic()
    # A second job (another rendezvous id) continues the run folder of the first.
    second = _launch_two_nodes(
        work, "job2", "resume=last", "trainer.max_steps=4", f"debug.report_dir={work / 'report2'}"
    )
    t2 = time.monotonic()
    return {"work": work, "first": first, "second": second, "seconds": (t1 - t0, t2 - t1)}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_node_torchrun_fit(two_nodes):
    work = two_nodes["work"]
    start = _json(work / "report1" / "start.json")
    # The config says devices=1 num_nodes=1: torchrun's 2 nodes x 1 process win.
    assert start["world_size"] == 2 and len(start["ranks"]) == 2
    assert start["strategy"] == "SafeModelParallelStrategy"
    log = "\n".join(two_nodes["first"])
    assert "torchrun: 2 node(s) x 1 process(es)" in log and "are replaced" in log
    assert _json(work / "report1" / "end.json")["global_step"] == 2

    runs = sorted((work / "runs" / "launch-test").iterdir())
    assert [p.name for p in runs] == ["launch-test-job1"]  # <name>-<rendezvous id>, one
    run = runs[0]
    assert (run / "config.yaml").is_file() and (run / "logs" / "fit.log").is_file()
    ckpt = run / "checkpoints" / "step00000002.ckpt"
    assert ckpt.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_two_node_resume_continues_the_run(two_nodes):
    work = two_nodes["work"]
    start = _json(work / "report2" / "start.json")
    assert start["world_size"] == 2 and start["global_step"] == 2
    assert _json(work / "report2" / "end.json")["global_step"] == 4
    runs = sorted((work / "runs" / "launch-test").iterdir())
    assert [p.name for p in runs] == ["launch-test-job1"]  # no folder for job2
    run = runs[0]
    ckpt = run / "checkpoints" / "step00000004.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    assert (run / "config.resume-step00000002.yaml").is_file()
    record = _json(run / "run.json")
    assert [r["from"] for r in record["resumes"]] == [
        str(run / "checkpoints" / "step00000002.ckpt")
    ]
    # Rank 0 (whichever node it landed on) logged both jobs to one MLflow run.
    assert _mlflow_run(two_nodes["first"]) == _mlflow_run(two_nodes["second"])
    first, second = two_nodes["seconds"]
    print(f"2-node fits took {first:.0f} s and {second:.0f} s")
