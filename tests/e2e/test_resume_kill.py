"""SIGKILL the whole datagen job mid-run, rerun, and account for every key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from datagen import shards
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# (DAG, subsets, extra overrides): cheap task stages only; and a model stage in an actor pool.
PLANS = {
    "tasks": ("captioned", ("t2i", "i2i"), []),
    "actor_pool": (
        "depth",
        ("depth",),
        [
            "weights=random-tiny",
            "stages.depth.resources.batch_size=2",
            "stages.depth.resources.num_gpus=0",
            "stages.depth.resources.actors=[1,1]",
        ],
    ),
}


def _job(out: Path, tmp: Path, plan: str) -> list[str]:
    name, subsets, extra = PLANS[plan]
    return [
        sys.executable,
        "-m",
        "orchestration.cli",
        "datagen",
        "run",
        str(REPO / "pipelines" / f"{name}.yaml"),
        "--output",
        str(out),
        "source.n=40",
        f"source.cache_dir={tmp / 'inputs'}",
        "source.max_side=384",
        "shards.max_samples=2",
        "ray.num_cpus=2",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"subsets=[{','.join(subsets)}]",
        *extra,
    ]


@pytest.mark.parametrize("plan", list(PLANS))
def test_sigkill_mid_run_then_resume_has_no_duplicates_and_no_gaps(tmp_path, plan):
    subsets = PLANS[plan][1]
    last = subsets[-1]
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        _job(out, tmp_path, plan),
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as some shards are committed but before the job can finish.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob(f"{last}/*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(200):  # Ray's own processes share the group; wait until all are gone
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)

    # No partial tar is visible: every *.tar parses completely.
    for tar in out.rglob("*.tar"):
        shards.read_tar_samples(tar.read_bytes())
    committed = shards.read_indexes(str(out), last).num_rows
    assert 0 < committed < 40
    before = {
        s: shards.read_indexes(str(out), s).num_rows + shards.read_quarantine(str(out), s).num_rows
        for s in subsets
    }
    assert (out / "_onegen.lock").exists(), "the killed job's lock is left behind (and is stale)"

    rerun = subprocess.run(
        _job(out, tmp_path, plan),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # The summary reads as a resume, not as a loss.
    for subset, already in before.items():
        assert (
            f"{subset}: {40 - already} written this run, {already} already committed, 0 quarantined, "
            "40 inputs in all" in rerun.stdout
        ), rerun.stdout
    assert not (out / "_onegen.lock").exists()
    for subset in subsets:
        keys = [
            k
            for tar in sorted((out / subset).glob("*.tar"))
            for k, _ in shards.read_tar_samples(tar.read_bytes())
        ]
        quarantined = shards.read_quarantine(str(out), subset).column("key").to_pylist()
        assert not [k for k, c in Counter(keys + quarantined).items() if c > 1], "duplicate keys"
        assert sorted(keys + quarantined) == [f"demo_{i:06d}" for i in range(40)]
    assert shards.verify(str(out)).ok
    assert not list(out.rglob(f"*{shards.TMP_MARK}*"))
