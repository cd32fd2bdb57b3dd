"""Start or join Ray the way a datagen job needs it, offline.

Locally, Ray gets more logical CPUs than the machine has cores: a CPU actor
pool per model stage would otherwise hold every CPU and the read and write
tasks would wait forever (a silent hang on a 2-core laptop or CI runner).

No process of a run calls out except to addresses the user configured (Ray head,
MLflow server, object storage). What would, in the installed versions:

- Ray's usage stats (``ray/_common/usage/usage_lib.py``): off with
  ``RAY_USAGE_STATS_ENABLED=0``.
- Ray's dashboard process, which ``ray.init`` starts even with
  ``include_dashboard=False``, then loading only ``UsageStatsHead``: its ``run()``
  calls ``get_cluster_config_to_report``, which probes the Azure and AWS metadata
  address (169.254.169.254) and looks up ``metadata.google.internal`` *before* it
  reads ``RAY_USAGE_STATS_ENABLED``; no setting turns that off. A local head started
  here therefore does not start that process (:func:`_without_usage_stats_dashboard`);
  the module does nothing else on a ``ray.init`` cluster.
- MLflow 3's telemetry (``mlflow/telemetry``): off with ``MLFLOW_DISABLE_TELEMETRY``
  and ``DO_NOT_TRACK``.
- Model hubs (Hugging Face, ultralytics): offline variables below.

Ray's TPU detection reads GCE metadata too, but only on hosts with TPU devices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from common.offline import apply_offline_env, offline_env

# Set by Ray's job supervisor in a submitted job's driver process.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def local_logical_cpus(requested: int | None = None) -> int:
    if requested:
        return int(requested)
    return max(4, 2 * (os.cpu_count() or 1))


@contextlib.contextmanager
def _without_usage_stats_dashboard() -> Iterator[None]:
    """While starting a local head with ``include_dashboard=False``, skip Ray's dashboard
    process: all it would run is the cloud-metadata probe (module docstring). Ray runs
    without it by design (it only warns when the dashboard fails to start)."""
    from ray._private import node

    original = node.Node.start_api_server

    def start_api_server(
        self: Any, *, include_dashboard: bool | None, raise_on_failure: bool
    ) -> None:
        if include_dashboard is False:
            return None
        return original(
            self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure
        )

    node.Node.start_api_server = start_api_server
    try:
        yield
    finally:
        node.Node.start_api_server = original


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Join ``address`` (a running cluster: ``auto``, ``ray://host:10001``) or
    start a local instance; returns the cluster's resources."""
    apply_offline_env()
    import ray

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
            runtime_env={"env_vars": offline_env(), "py_modules": [datagen, pipelines]},
            log_to_driver=not quiet,
        )
    else:
        with _without_usage_stats_dashboard():
            ray.init(
                num_cpus=local_logical_cpus(num_cpus),
                object_store_memory=object_store_memory,
                include_dashboard=False,
                log_to_driver=not quiet,
            )
    return ray.cluster_resources()
