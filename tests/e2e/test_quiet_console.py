"""``onegen datagen run`` as a user sees it, in a subprocess with its own local Ray: the
run's own lines, not Ray Data's progress blocks, the actor-restart error line of every
actor pool or ultralytics' settings banner; ``--verbose`` brings them back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

ONEGEN = str(Path(sys.executable).parent / "onegen")
NOISE_OF_RAY = (
    "logging_progress",  # Ray Data's progress blocks
    "Running Dataset",
    "Execution plan of Dataset",
    "max_restarts",  # the C++ line each actor of a pool prints
    "concurrency is deprecated",  # ray.data's warning on map_batches(concurrency=)
    "Creating new Ultralytics Settings",  # the YOLO detector's banner, in the actor
    "Token authentication is enabled",
    "INFO mlflow",
)


def _pose_run(tmp_path: Path, name: str, *extra: str) -> str:
    """The pose DAG (a YOLO actor pool) on 6 inputs with tiny random models; its console."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "YOLO_CONFIG_DIR": str(tmp_path / f"ultralytics-{name}"),  # a fresh settings file
    }
    proc = subprocess.run(
        [
            ONEGEN,
            "datagen",
            "run",
            str(REPO / "pipelines" / "pose.yaml"),
            "--output",
            str(tmp_path / name),
            "weights=random-tiny",
            "num_gpus=0",
            "source.n=6",
            f"source.cache_dir={tmp_path / 'inputs'}",
            "source.max_side=160",
            "stages.pose.resources.batch_size=3",
            "stages.pose.resources.actors=[1,1]",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def consoles(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("console")
    return {"quiet": _pose_run(tmp, "quiet"), "verbose": _pose_run(tmp, "verbose", "--verbose")}


def test_default_console_is_the_runs_own_lines(consoles):
    console = consoles["quiet"]
    for noise in NOISE_OF_RAY:
        assert noise not in console, noise
    assert "6/6 keys processed this run (0 already committed)" in console
    assert "rows/s per worker: decode " in console and ", pose " in console
    assert "pose: 6 written this run" in console
    assert len(console.splitlines()) <= 12, console


def test_verbose_brings_rays_and_ultralytics_lines_back(consoles):
    """The same run, verbose: what the default drops is really there to drop."""
    console = consoles["verbose"]
    for line in ("Running Dataset", "max_restarts", "Creating new Ultralytics Settings"):
        assert line in console, line
    assert "6/6 keys processed this run (0 already committed)" in console
