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

Ray's console on the driver is quiet by default (:func:`configure_ray_logs`,
:func:`quiet_native_stderr`): its WARNINGs and errors, not its INFO lines and progress
blocks, which would drown the run's own progress lines. Ray's log files keep everything;
``verbose`` brings Ray's stock console back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
from collections.abc import Iterator
from typing import Any

from common.offline import apply_offline_env, offline_env

# Set by Ray's job supervisor in a submitted job's driver process.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# Console lines of Ray that tell a datagen user nothing, dropped unless verbose (Ray's log
# files keep them). Python loggers' records, by the start of their message:
RAY_DATA_NOTICES = (
    # Ray Data's answer to the progress bars this module turns off on a terminal.
    "Progress bars disabled.",
)
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICES = (
    # Printed by every local head ray.init starts: the secure default, nothing to act on.
    "Token authentication is enabled for this Ray cluster.",
)
# Ray core's C++ logger on the driver, which writes to fd 2 itself (no Python logger, no level
# that leaves its log file alone), by a fragment of the line:
NATIVE_STDERR_NOISE = (
    # Raised for every actor of a Ray Data actor pool (ray-project/ray#57733): the operator
    # passes its own ray.put refs (DataContext, map transformer) to each actor it starts with
    # max_restarts=-1, and holds those refs for the pool's lifetime, so a restart finds them.
    b"has constructor arguments in the object store and max_restarts > 0",
)


class _ConsoleFilter(logging.Filter):
    """Passes records at ``level`` or above whose message starts with none of ``drop``."""

    def __init__(self, level: int, drop: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.level, self.drop = level, drop

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level and not record.getMessage().startswith(self.drop)


_RAY_DATA_CONSOLE = _ConsoleFilter(logging.WARNING, RAY_DATA_NOTICES)
_TOKEN_AUTH_CONSOLE = _ConsoleFilter(logging.NOTSET, TOKEN_AUTH_NOTICES)


def configure_ray_logs(verbose: bool = False) -> None:
    """Ray Data's console handler on the driver: WARNING and above unless ``verbose`` (its
    stock INFO: execution plans, a progress block every few seconds). Its file handler
    (``<session>/logs/ray-data/ray-data.log``) keeps DEBUG either way; a user's own
    ``RAY_DATA_LOGGING_CONFIG`` (no handler named ``console``) is left as it is."""
    import ray.data  # noqa: F401  (configures the ray.data loggers at import)

    consoles = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    token = logging.getLogger(TOKEN_AUTH_LOGGER)
    for handler in consoles:
        handler.removeFilter(_RAY_DATA_CONSOLE)
    token.removeFilter(_TOKEN_AUTH_CONSOLE)
    if not verbose:
        for handler in consoles:
            handler.addFilter(_RAY_DATA_CONSOLE)
        token.addFilter(_TOKEN_AUTH_CONSOLE)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # stderr gone: keep draining the pipe regardless
        while data:
            data = data[os.write(fd, data) :]


def _copy_lines(src: int, dst: int, drop: tuple[bytes, ...]) -> None:
    """``src`` to ``dst`` line by line, without the lines holding one of ``drop``; a
    partial line (a prompt, a ``\r`` progress bar) goes out after 0.2 s without more."""
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([src], [], [], 0.2 if pending else None)
            if not ready:
                _write_all(dst, pending)
                pending = b""
                continue
            chunk = os.read(src, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines if not any(d in line for d in drop)]
            _write_all(dst, b"".join(kept))
        if pending and not any(d in pending for d in drop):
            _write_all(dst, pending)
    finally:
        os.close(src)
        os.close(dst)


@contextlib.contextmanager
def quiet_native_stderr(
    verbose: bool = False, drop: tuple[bytes, ...] = NATIVE_STDERR_NOISE
) -> Iterator[None]:
    """While inside, this process's fd 2 goes through a pipe that a thread copies to the real
    stderr without the lines holding one of ``drop``: Ray core's C++ logger writes there
    directly, and its level (``RAY_BACKEND_LOG_LEVEL``) would also empty its log file, where
    those lines stay. Python exceptions surface after the block, on the real stderr; a hard
    crash of this process inside it may lose its last stderr lines (Ray's driver log keeps
    its own). Nothing changes when ``verbose``, or where fd 2 cannot be piped."""
    if verbose or not drop or os.name != "posix":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a daemon), or sys.stderr closed
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(
        target=_copy_lines, args=(read_end, os.dup(saved), drop), name="stderr-filter", daemon=True
    )
    copier.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's write end: the copier sees EOF and ends
        os.close(saved)
        copier.join(timeout=5)  # longer only if a child process inherited the pipe


def ray_logs_dir() -> str | None:
    """The local session's log folder (Ray's and Ray Data's files), or None (not started
    here, a Ray client)."""
    from ray._private import worker

    node = worker._global_node
    return node.get_logs_dir_path() if node is not None else None


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
    verbose: bool = False,
) -> dict[str, Any]:
    """Join ``address`` (a running cluster: ``auto``, ``ray://host:10001``) or
    start a local instance; returns the cluster's resources. ``quiet``: no worker output on
    this console (tests, benchmarks); ``verbose``: Ray's INFO lines and Ray Data's progress
    on it, not only its warnings (:func:`configure_ray_logs`)."""
    apply_offline_env()
    import ray

    configure_ray_logs(verbose)
    if verbose:  # ultralytics' own lines in the actors' logs too (quiet by OFFLINE_ENV)
        os.environ["YOLO_VERBOSE"] = "True"
    if ray.is_initialized():
        return ray.cluster_resources()
    logging_level = logging.INFO if verbose else logging.WARNING
    if JOB_CONFIG_ENV in os.environ:
        # The driver of a submitted job (``onegen datagen submit``): Ray set RAY_ADDRESS to
        # this cluster, and the job's runtime env (code, offline env vars) already applies
        # to every task; a second one from ray.init would have to be merged with it.
        ray.init(address=address or "auto", log_to_driver=not quiet, logging_level=logging_level)
    elif address:
        import datagen
        import pipelines

        ray.init(
            address=address,
            runtime_env={"env_vars": offline_env(), "py_modules": [datagen, pipelines]},
            log_to_driver=not quiet,
            logging_level=logging_level,
        )
    else:
        with _without_usage_stats_dashboard():
            ray.init(
                num_cpus=local_logical_cpus(num_cpus),
                object_store_memory=object_store_memory,
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging_level,
            )
    return ray.cluster_resources()
