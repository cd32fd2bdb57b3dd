"""What tests share that is not a fixture: the repository root, the arguments of a small
``onegen datagen run``, the MLflow variables a process must not inherit. Shard and input
builders live beside this file (``bad_inputs``, ``depth_pose_shards``, ``training_shards``,
``toy_stages``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def small_run_args(
    tmp_path: Path, output: Path | str, *extra: str, dag: str = "captioned"
) -> list[str]:
    """``onegen`` arguments of a 4-input run of ``pipelines/<dag>.yaml`` (default: the
    no-model t2i + i2i DAG) into ``output`` (CLI and subprocess tests)."""
    return [
        "datagen",
        "run",
        str(REPO / "pipelines" / f"{dag}.yaml"),
        "--output",
        str(output),
        "source.n=4",
        f"source.cache_dir={tmp_path / 'inputs'}",
        "source.max_side=96",
        "shards.max_samples=4",
        "subsets=[t2i,i2i]",
        "ray.num_cpus=2",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


# MLflow writes the active experiment and tracking URI into os.environ
# (``mlflow.set_experiment``, ``mlflow.set_tracking_uri``); a later test's subprocess
# would inherit another test's store and experiment id.
MLFLOW_PROCESS_ENV = (
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_LOGGING_LEVEL",  # common.console.quiet_library_logs
)
