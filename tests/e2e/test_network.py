"""No network call leaves the machine: not from the driver, a Ray worker, Ray's own
processes, the training process, or anything they start.

Every Python process of the run imports a ``sitecustomize`` from a folder put first on
``PYTHONPATH`` (Ray's processes and workers inherit the driver's environment); it installs
an audit hook that appends each socket connect, send and name lookup to one log file.
Connects over unix sockets, and to loopback and this machine's own addresses (Ray talks
to its processes on the node IP), are the only ones allowed. The subprocesses get none of
the offline variables and none of the CI markers that quietly switch MLflow's telemetry
off under pytest: the ``onegen`` entry point must set what it needs itself.

``test_the_hook_sees_ray_and_mlflow_probes`` shows the check can fail: a plain
``ray.init`` and MLflow with telemetry on are caught.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.offline import OFFLINE_ENV
from tests.helpers import REPO, small_run_args

pytestmark = pytest.mark.slow
ONEGEN = str(Path(sys.executable).parent / "onegen")

SITECUSTOMIZE = textwrap.dedent('''
    """Test hook: log every network attempt of this process to $ONEGEN_NETLOG."""
    import json
    import os
    import socket
    import sys

    _LOG = os.environ.get("ONEGEN_NETLOG")
    _LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                "socket.gethostbyaddr", "socket.getnameinfo"}
    _SENDS = {"socket.connect", "socket.sendto", "socket.sendmsg"}

    def _write(event, target):
        line = json.dumps({"pid": os.getpid(), "argv": " ".join(sys.argv)[:200],
                           "event": event, "target": repr(target)})
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)

    def _hook(event, args):
        if event in _LOOKUPS:
            target = args[0]
        elif event in _SENDS:
            sock, target = args[0], args[-1]
            if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
                return  # unix sockets, netlink: local by nature
        else:
            return
        try:
            _write(event, target)
        except Exception:
            pass

    if _LOG:
        sys.addaudithook(_hook)
''')

# Environment variables whose mere presence turns MLflow's telemetry off
# (mlflow/telemetry/utils.py, _is_ci_env_or_testing): stripped so the test sees what a
# user's run would do.
CI_MARKERS = {
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
}


def own_addresses() -> set[str]:
    """This machine's names and addresses: loopback names, the hostname, what it resolves
    to, and the IP Ray picks as its node address."""
    from ray._common.network_utils import node_ip_address_from_perspective

    names = {"localhost", "0.0.0.0", "::", "", socket.gethostname(), socket.getfqdn()}
    for name in list(names - {""}):
        with contextlib.suppress(OSError):
            names.update(info[4][0] for info in socket.getaddrinfo(name, None))
    names.add(node_ip_address_from_perspective(None))
    return names


def is_local(target: object, own: set[str]) -> bool:
    """``target``: a host name / address, or an (address, port, ...) tuple."""
    host = target[0] if isinstance(target, tuple) else target
    if host is None or isinstance(host, int):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).split("%", 1)[0]
    if host in own:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def outside_attempts(log: Path, own: set[str]) -> list[dict]:
    """Every logged attempt that is not local, with ``target`` parsed back."""
    import ast

    found = []
    if not log.exists():
        return found
    for line in log.read_text().splitlines():
        record = json.loads(line)
        try:
            target = ast.literal_eval(record["target"])
        except (ValueError, SyntaxError):
            target = record["target"]
        if not is_local(target, own):
            found.append(record)
    return found


def hooked_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS and k not in OFFLINE_ENV}
    env.update(
        {
            "ONEGEN_NETLOG": str(log),
            "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO)]),
            "RAY_AUTH_MODE": "disabled",
            "OMP_NUM_THREADS": "1",
            **extra,
        }
    )
    return env, log


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_datagen_fit_and_sample_stay_on_this_machine(tmp_path):
    env, log = hooked_env(tmp_path)
    own = own_addresses()
    # (a) datagen on a fresh local Ray: driver, Ray's processes, workers.
    _run(
        [
            ONEGEN,
            *small_run_args(tmp_path, tmp_path / "out"),
        ],
        tmp_path,
        env,
    )
    assert json.loads((tmp_path / "out" / "i2i" / "manifest.json").read_text())["written"] == 4
    # (b) a tiny CPU fit, tracked in sqlite, through the entry torchrun and SLURM launch
    # (``python -m training.fit``: not the ``onegen`` CLI, which sets the env itself).
    run_dir = tmp_path / "run"
    _run(
        [
            sys.executable,
            "-m",
            "training.fit",
            "--config",
            str(REPO / "training" / "configs" / "demo.yaml"),
            "data.kind=synthetic",
            "data.batch_size=1",
            "data.synthetic.resolution=32",
            "data.synthetic.tasks=[text2image]",
            "trainer.max_steps=2",
            "checkpoint.every_n_steps=2",
            "samples.every_n_steps=0",
            "mlflow.system_metrics=false",
            f"run_dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        tmp_path,
        env,
    )
    ckpt = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpt, f"no checkpoint in {run_dir}"
    # (c) sampling from that checkpoint.
    _run(
        [
            ONEGEN,
            "sample",
            "--checkpoint",
            str(ckpt[-1]),
            "--task",
            "text2image",
            "--out",
            str(tmp_path / "samples"),
            "--steps",
            "1",
            "--size",
            "32",
            "--device",
            "cpu",
        ],
        tmp_path,
        env,
    )
    assert list((tmp_path / "samples").glob("*.png"))

    assert log.exists(), "the hook logged nothing: was sitecustomize imported at all?"
    processes = {json.loads(line)["argv"] for line in log.read_text().splitlines()}
    assert any("ray" in p for p in processes), f"no Ray process was hooked: {processes}"
    outside = outside_attempts(log, own)
    assert not outside, "network attempts beyond this machine:\n" + "\n".join(map(str, outside))


def test_model_dags_stay_on_this_machine(tmp_path):
    """The model stages (transformers: the VLM, Grounding DINO, DepthAnything, ViTPose;
    segment-anything; ultralytics) load and label offline: in the driver, which validates
    the DAG, and in the actors, which build the tiny random models."""
    env, log = hooked_env(tmp_path)
    own = own_addresses()
    out = tmp_path / "out"
    _run(
        [
            ONEGEN,
            *small_run_args(
                tmp_path,
                out,
                "subsets=[semantic,depth,pose]",
                "weights=random-tiny",
                "stages.caption.params.max_new_tokens=16",
                "stages.caption.params.entity_max_new_tokens=12",
                dag="demo",
            ),
        ],
        tmp_path,
        env,
    )
    for subset in ("semantic", "depth", "pose"):
        manifest = json.loads((out / subset / "manifest.json").read_text())
        assert manifest["written"] + manifest["quarantined"] + manifest["filtered"] == 4, manifest
    assert json.loads((out / "depth" / "manifest.json").read_text())["written"] == 4
    processes = {json.loads(line)["argv"] for line in log.read_text().splitlines()}
    assert any("ray" in p for p in processes), f"no Ray process was hooked: {processes}"
    outside = outside_attempts(log, own)
    assert not outside, "network attempts beyond this machine:\n" + "\n".join(map(str, outside))


PROBE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import mlflow
    import ray

    mlflow.set_tracking_uri(sys.argv[1])
    with mlflow.start_run():
        mlflow.log_param("x", 1)
    ray.init(num_cpus=1, include_dashboard=False)  # no onegen here: Ray's defaults
    log = os.environ["ONEGEN_NETLOG"]
    deadline = time.time() + 60
    while time.time() < deadline:
        text = open(log).read() if os.path.exists(log) else ""
        if "169.254.169.254" in text and "mlflow-telemetry" in text:
            break
        time.sleep(0.5)
    ray.shutdown()
""")


def test_the_hook_sees_ray_and_mlflow_probes(tmp_path):
    """Without onegen's settings (plain ``ray.init``, MLflow telemetry on) the very same
    check fails: the cloud-metadata probe of Ray's dashboard process and MLflow's
    telemetry host lookup are both caught."""
    env, log = hooked_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="false", DO_NOT_TRACK="false")
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    _run([sys.executable, str(script), f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path, env)
    outside = outside_attempts(log, own_addresses())
    targets = " ".join(r["target"] for r in outside)
    assert "169.254.169.254" in targets, outside
    assert "mlflow-telemetry.io" in targets, outside
    assert any("dashboard" in r["argv"] for r in outside), outside
