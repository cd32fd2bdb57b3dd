"""Shared fixtures: one real local Ray for the session, DAG configs on tmp paths."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Offline everywhere, as in production workers: no hub, no auto-installs.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# No telemetry or cloud probes either (Ray usage stats, MLflow): what `onegen` sets itself.
from common.offline import apply_offline_env  # noqa: E402
from tests.helpers import MLFLOW_PROCESS_ENV, REPO  # noqa: E402

apply_offline_env()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with more logical CPUs than cores."""
    import ray

    from orchestration.ray_runtime import init_ray

    init_ray(num_cpus=4, quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def cheap_cfg(tmp_path):
    """The no-model DAG (decode, degrade: t2i from source captions, i2i), small, writing
    into tmp_path, tracked in a tmp sqlite store."""
    from pipelines import dag

    def make(*overrides: str, n: int = 12):
        return dag.load(
            REPO / "pipelines" / "captioned.yaml",
            [
                f"output={tmp_path / 'out'}",
                f"source.n={n}",
                f"source.cache_dir={tmp_path / 'inputs'}",
                "source.max_side=256",
                "shards.max_samples=4",
                "subsets=[t2i,i2i]",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                *overrides,
            ],
        )

    return make


# What the session started with: every test ends with it again, including after a
# module-scoped fixture that ran MLflow in this process before the test's own snapshot.
_MLFLOW_ENV_AT_START = {k: os.environ.get(k) for k in MLFLOW_PROCESS_ENV}


@pytest.fixture(autouse=True)
def _mlflow_env_per_test():
    yield
    for key, value in _MLFLOW_ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
