"""``onegen datagen submit``: a real Ray head with its dashboard's job server, token auth on.

The head is started with ``ray start --head --block`` in its own process group and torn
down by signalling that group, never with ``ray stop`` (which would also kill the test
session's local Ray).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestration.cli import parser
from orchestration.submit import absolute_location, absolute_tracking_uri, prepare
from pipelines import dag
from tests.helpers import REPO

ROOT = REPO
ONEGEN = [sys.executable, "-m", "orchestration.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what the job is given -------------------------------------------------------------


def test_paths_become_absolute_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_location("out/demo") == str(tmp_path / "out" / "demo")
    assert absolute_location("s3://bucket/onegen") == "s3://bucket/onegen"
    assert absolute_location("shards/{000..009}.tar") == str(tmp_path / "shards" / "{000..009}.tar")
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")


def test_prepare_resolves_the_dag_for_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dag.load(
        ROOT / "pipelines" / "demo.yaml",
        ["output=data/x", "ray.address=auto", "ray.num_cpus=8", "weights=random-tiny"],
        source={"kind": "folder", "path": "images"},
    )
    job = prepare(cfg)
    assert job.output == str(tmp_path / "data" / "x")
    assert job.source.path == str(tmp_path / "images")
    assert job.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert job.ray.address is None and job.ray.num_cpus is None
    assert cfg.output == "data/x" and cfg.ray.address == "auto"  # the caller's copy is untouched
    dag.validate(job)


def test_verbose_reaches_the_jobs_driver():
    from orchestration.submit import STAGED_DAG, entrypoint

    assert entrypoint("python3") == f"python3 -m orchestration.cli datagen run {STAGED_DAG}"
    assert entrypoint("python3", verbose=True).endswith(f"run {STAGED_DAG} --verbose")
    args = parser().parse_args(["datagen", "run", STAGED_DAG, "--verbose"])
    assert args.verbose and args.overrides == []


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run(
        [
            *ONEGEN,
            "datagen",
            "submit",
            str(ROOT / "pipelines" / "demo.yaml"),
            "--address",
            f"http://127.0.0.1:{port}",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "onegen datagen submit: error:" in proc.stderr and str(port) in proc.stderr
    assert not (tmp_path / "out").exists()


# --- a real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with the dashboard (job server) and token auth."""
    temp_dir = Path(f"/tmp/ray_onegen_{secrets.token_hex(3)}")  # short: socket paths
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dash = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(_free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--num-cpus",
        "4",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp_dir),
    ]
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    request = urllib.request.Request(
        f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        subprocess.run(
            ["pkill", "-9", "-f", str(temp_dir)], check=False
        )  # stragglers of this head only
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(
    address: str, auth: dict[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *ONEGEN,
            "datagen",
            "submit",
            str(ROOT / "pipelines" / "captioned.yaml"),
            "--address",
            address,
            "--python",
            sys.executable,
            "subsets=[t2i,i2i]",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=420,
        env={**os.environ, **auth, "PYTHONPATH": str(ROOT)},
    )


def test_submitted_dag_runs_on_the_cluster_and_a_recipe_change_fails_the_job(ray_head, tmp_path):
    address, auth = ray_head
    work = tmp_path / "login_node"
    work.mkdir()
    # Relative output and tracking store, as a user types them: the job must write here,
    # not into its temporary working directory on the head node.
    ok = _submit(address, auth, work, "--output", "out", "source.n=10", "shards.max_samples=4")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "SUCCEEDED" in ok.stdout and "10 inputs processed" in ok.stdout
    # The job's console is the run's own lines, not Ray Data's progress blocks.
    assert "10/10 keys processed this run" in ok.stdout
    assert "logging_progress" not in ok.stdout and "Running Dataset" not in ok.stdout
    out = work / "out"
    for subset in ("t2i", "i2i"):
        manifest = json.loads((out / subset / "manifest.json").read_text())
        assert manifest["written"] + manifest["quarantined"] == 10
        assert manifest["written"] == 10 and len(list((out / subset).glob("*.tar"))) == 3
    verify = subprocess.run(
        [*ONEGEN, "datagen", "verify", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "onegen-datagen"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"

    # Same output, different recipe (another seed changes the degradations): the job's
    # driver refuses, the job FAILS, the command exits non-zero; nothing written changes.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    bad = _submit(
        address, auth, work, "--output", "out", "source.n=10", "shards.max_samples=4", "seed=1"
    )
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout and "recipe" in bad.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before


def test_missing_token_is_refused_with_rays_message(ray_head, tmp_path):
    address, _ = ray_head
    env_without = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    proc = _submit(address, env_without, tmp_path, "--output", "out", "source.n=2")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "auth" in proc.stderr.lower()
    assert not (tmp_path / "out").exists()
