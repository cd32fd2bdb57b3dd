"""Start or join Ray the way a datagen job needs it.

Locally, Ray gets more logical CPUs than the machine has cores: a CPU actor
pool per model stage would otherwise hold every CPU and the read and write
tasks would wait forever (a silent hang on a 2-core laptop or CI runner).
Every worker runs offline: model hubs are never contacted.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
    "YOLO_CONFIG_DIR": os.path.join(tempfile.gettempdir(), "onegen-yolo"),
    "RAY_DEDUP_LOGS": "1",
}


# Set by Ray's job supervisor in a submitted job's driver process.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def local_logical_cpus(requested: int | None = None) -> int:
    if requested:
        return int(requested)
    return max(4, 2 * (os.cpu_count() or 1))


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Join ``address`` (a running cluster: ``auto``, ``ray://host:10001``) or
    start a local instance; returns the cluster's resources."""
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return ray.cluster_resources()
    if JOB_CONFIG_ENV in os.environ:
        # The driver of a submitted job (``onegen datagen submit``): Ray set RAY_ADDRESS to
        # this cluster, and the job's runtime env (code, offline env vars) already applies
        # to every task; a second one from ray.init would have to be merged with it.
        ray.init(address=address or "auto", log_to_driver=not quiet)
    elif address:
        import datagen
        import pipelines

        ray.init(
            address=address,
            runtime_env={"env_vars": dict(OFFLINE_ENV), "py_modules": [datagen, pipelines]},
            log_to_driver=not quiet,
        )
    else:
        ray.init(
            num_cpus=local_logical_cpus(num_cpus),
            object_store_memory=object_store_memory,
            include_dashboard=False,
            log_to_driver=not quiet,
        )
    return ray.cluster_resources()
