"""MLflow for datagen runs: what ran, on what, what came out, what was rejected.

The default store is ``sqlite:///mlflow.db`` in the working folder (review
with ``mlflow ui``); ``mlflow.tracking_uri`` points at a server instead and
``mlflow.enabled=false`` turns tracking off.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datagen import shards
from training.config_tools import flat_params


class DatagenTracking:
    def __init__(self, cfg: DictConfig, out: str, digest: str):
        self.cfg, self.out, self.digest = cfg, out, digest
        self.enabled = bool(cfg.mlflow.enabled)
        self.run_id: str | None = None
        if not self.enabled:
            return
        from orchestration.ray_runtime import apply_offline_env

        apply_offline_env()  # before mlflow's import: no telemetry
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(str(cfg.mlflow.tracking_uri))
        mlflow.set_experiment(str(cfg.mlflow.experiment))
        run = mlflow.start_run(
            run_name=f"datagen-{cfg.name}",
            tags={"onegen.kind": "datagen", "onegen.output": out, "onegen.config_digest": digest},
        )
        self.run_id = run.info.run_id
        params = flat_params(cfg)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "dag.yaml")

    def __enter__(self) -> DatagenTracking:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if not self.enabled:
            return
        if exc is not None:
            self.mlflow.set_tag("onegen.failure", str(exc)[:5000])
        self.mlflow.end_run(status="FAILED" if exc is not None else "FINISHED")

    def log_result(
        self,
        result: Any,
        manifests: dict[str, dict],
        quarantine: dict[str, Any],
        preview: Path | None = None,
    ) -> None:
        """Metrics, every subset's manifest (also for object-store outputs), a quarantine
        summary, from the tables the job already read, and the local ``preview`` file."""
        if not self.enabled:
            return
        mlflow = self.mlflow
        metrics: dict[str, float] = {
            "inputs": result.inputs,
            "pending": result.pending,
            "seconds": result.seconds,
            "samples_per_s": result.pending / max(result.seconds, 1e-9),
            "error_rate": result.error_rate,
        }
        for stage, s in result.stages.items():
            metrics[f"stage.{stage}.in"] = s.get("in", 0)
            metrics[f"stage.{stage}.quarantined"] = s.get("quarantined", 0)
            metrics[f"stage.{stage}.filtered"] = s.get("filtered", 0)
            metrics[f"stage.{stage}.out"] = (
                s.get("in", 0) - s.get("quarantined", 0) - s.get("filtered", 0)
            )
            if s.get("seconds"):
                metrics[f"stage.{stage}.samples_per_s_per_worker"] = s["in"] / s["seconds"]
        for subset, a in result.subsets.items():
            metrics[f"subset.{subset}.written"] = a["written"]
            metrics[f"subset.{subset}.quarantined"] = a["quarantined"]
            metrics[f"subset.{subset}.filtered"] = a.get("filtered", 0)
            metrics[f"subset.{subset}.written_this_run"] = a.get("written_this_run", 0)
            metrics[f"subset.{subset}.quarantined_this_run"] = a.get("quarantined_this_run", 0)
            metrics[f"subset.{subset}.already_committed"] = a.get("already_committed", 0)
            metrics[f"subset.{subset}.bytes_this_run"] = a.get("bytes", 0)
        mlflow.log_metrics(metrics)
        for subset, m in manifests.items():
            mlflow.log_dict(m, f"manifests/{subset}/{shards.MANIFEST}")
        summary = {}
        for subset, q in quarantine.items():
            summary[subset] = {
                "count": q.num_rows,
                "by_stage_error": manifests[subset]["quarantine_by_error"],
                "examples": q.slice(0, 20)
                .select(["key", "uri", "stage", "error", "message"])
                .to_pylist(),
            }
        mlflow.log_dict(summary, "quarantine_summary.json")
        if preview is not None and preview.exists():
            mlflow.log_artifact(str(preview))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run_result.json"
            path.write_text(
                json.dumps({k: v for k, v in vars(result).items()}, indent=2, default=str)
            )
            mlflow.log_artifact(str(path))


def datagen_run(cfg: DictConfig, out: str, digest: str) -> DatagenTracking:
    return DatagenTracking(cfg, out, digest)
