"""``onegen datagen submit``: run a DAG as a Ray job on a cluster.

A job's driver runs on the head node, so a long datagen run survives the submitting
laptop or login node going away, and the cluster's dashboard lists it with its logs.
The job carries its own code (this checkout's packages, uploaded as ``py_modules``) and
the fully resolved DAG (``dag.yaml`` in a staged ``working_dir``): what runs is what the
submitter validated, with overrides applied. Paths are made absolute before upload,
because the job's working directory is a temporary folder on the head node; they must
name storage that every node can reach (a shared filesystem or an fsspec URL).
Authentication is Ray's own: with token auth on the cluster, set ``RAY_AUTH_MODE=token``
and the token (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) as for ``ray job submit``.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from orchestration.ray_runtime import offline_env

if TYPE_CHECKING:
    from pipelines.dag import Dag

PACKAGES = ("datagen", "pipelines", "orchestration", "model", "training")
STAGED_DAG = "dag.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(ValueError):
    """A DAG that cannot be submitted as it stands; the message says what to change."""


def absolute_location(location: str) -> str:
    """URLs (``s3://``, ``gs://``, ``file://``) unchanged; local paths made absolute,
    braces and globs kept (``os.path.abspath`` does not touch the file system)."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` is relative to the process's working directory, which for a
    job is a temporary folder; anchor it here. Servers (http, databricks) are unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + absolute_location(uri[len(prefix) :])
    if "://" not in uri and uri:  # a bare folder: MLflow's file store
        return absolute_location(uri)
    return uri


def prepare(cfg: Dag) -> DictConfig:
    """The resolved DAG as the job will run it: every path absolute, and no ``ray.address``
    (the job's driver joins the cluster it runs on)."""
    job = OmegaConf.create(OmegaConf.to_container(cfg.config, resolve=True))
    job.output = absolute_location(str(job.output))
    source = job.source
    for key in ("path", "urls", "cache_dir"):
        if source.get(key):
            source[key] = absolute_location(str(source[key]))
    if job.mlflow.get("tracking_uri"):
        job.mlflow.tracking_uri = absolute_tracking_uri(str(job.mlflow.tracking_uri))
    job.ray.address = None
    job.ray.num_cpus = None  # a cluster's CPUs are its own; ray.init may not set them
    return job


def package_dirs() -> list[str]:
    """This checkout's packages, so the cluster runs the submitter's code version."""
    root = Path(__file__).resolve().parents[1]
    dirs = [root / name for name in PACKAGES]
    missing = [str(d) for d in dirs if not (d / "__init__.py").exists()]
    if missing:
        raise SubmitError(f"package folders not found: {missing}")
    return [str(d) for d in dirs]


def runtime_env(staging: Path) -> dict[str, Any]:
    return {
        "working_dir": str(staging),
        "py_modules": package_dirs(),
        "excludes": ["__pycache__", "*.pyc"],
        # Offline, no telemetry, in the job's driver and every worker (a user's own values
        # of these variables, set here, are what the job gets).
        "env_vars": offline_env(),
    }


def entrypoint(python: str = "python", verbose: bool = False) -> str:
    command = f"{shlex.quote(python)} -m orchestration.cli datagen run {STAGED_DAG}"
    return f"{command} --verbose" if verbose else command


def submit(
    cfg: Dag,
    address: str,
    *,
    submission_id: str | None = None,
    python: str = "python",
    verbose: bool = False,
) -> tuple[str, DictConfig]:
    """Submit the DAG; returns the job's submission id and the config it runs."""
    from ray.job_submission import JobSubmissionClient

    job_cfg = prepare(cfg)
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="onegen-submit-") as staging:
        OmegaConf.save(job_cfg, Path(staging) / STAGED_DAG)
        job_id = client.submit_job(
            entrypoint=entrypoint(python, verbose),
            runtime_env=runtime_env(Path(staging)),
            submission_id=submission_id,
            metadata={"onegen": "datagen", "dag": str(job_cfg.name), "output": str(job_cfg.output)},
        )
    return job_id, job_cfg


def follow(
    address: str,
    job_id: str,
    *,
    poll_s: float = 2.0,
    write: Callable[[str], Any] = print,
) -> str:
    """Stream the job's log until the job ends; returns its final status.

    Tails over the job server's websocket (only new lines travel, however long the log);
    if that connection drops, waits on the status alone.
    """
    import asyncio

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk.rstrip("\n"))

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - a dropped log stream must not lose the outcome
        write(f"(log stream ended: {exc}; waiting for the job's status)")
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status
