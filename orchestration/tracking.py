"""MLflow for datagen runs: what ran, on what, what came out, what was rejected.

The store is ``mlflow.tracking_uri`` when the DAG sets it, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db`` in the working folder (``pipelines.dag.tracking_uri``; review
with ``mlflow ui``); ``mlflow.enabled=false`` turns tracking off.

* Run name ``datagen-<dag> -> <output> @ <YYYY-mm-dd HH:MM>``; tags ``onegen.kind``,
  ``onegen.output``, ``onegen.config_digest``.
* Every subset manifest written is a run input with ``mlflow.data.context = output``
  (MLflow logs datasets as inputs only; ``log_outputs`` takes models): a ``MetaDataset``
  named after the subset, its source the manifest, its digest
  :func:`datagen.shards.manifest_digest` (first 32 hex).
* The run is recorded in ``OUT/_mlflow_run.json`` (``run_id``, ``tracking_uri``,
  ``experiment``, ``config_digest``) and in each manifest's ``datagen_runs``. A later run on
  the same output with the same store, experiment and config digest continues that run (a
  resume, or a rerun of a finished output): ``onegen.resume_count`` goes up by one and the
  end-of-run metrics are logged at ``step`` = that count, so earlier values stay in their
  history. Another recipe starts a new run tagged ``onegen.previous_run``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common.overrides import flat_params
from datagen import shards
from orchestration.submit import absolute_tracking_uri
from pipelines import dag

RUN_FILE = "_mlflow_run.json"
RESUME_COUNT = "onegen.resume_count"
PREVIOUS_RUN = "onegen.previous_run"


def store_uri(cfg: dag.Dag) -> str:
    """The tracking URI as recorded (run file, manifests): a relative sqlite path or
    folder anchored in the working folder, so it names the same store from anywhere."""
    return absolute_tracking_uri(cfg.mlflow.tracking_uri or "")


def short_output(out: str) -> str:
    """The output as a reviewer reads it in a run name: relative to the working folder when
    inside it, else its last two parts (``.../runs/demo``, ``s3://bucket/.../demo``)."""
    if "://" in out:
        scheme, rest = out.split("://", 1)
        parts = [p for p in rest.split("/") if p]
        if len(parts) <= 3:
            return out.rstrip("/")
        return f"{scheme}://{parts[0]}/.../{'/'.join(parts[-2:])}"
    path = Path(out)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd().resolve())) or "."
    return str(path) if len(path.parts) <= 4 else ".../" + "/".join(path.parts[-2:])


def run_name(cfg: dag.Dag, out: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
    return f"datagen-{cfg.name} -> {short_output(out)} @ {stamp}"


def read_run_file(out: str) -> dict[str, str] | None:
    """``OUT/_mlflow_run.json``, None when absent or unreadable (then a new run starts)."""
    fs, root = shards.filesystem(out)
    try:
        with fs.open(f"{root}/{RUN_FILE}", "rb") as fh:
            record = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        return None
    return {k: str(v) for k, v in record.items()}


def dataset_source(location: str) -> Any:
    """The MLflow dataset source of a manifest: a local path, or a URL (s3, gs, http, ...);
    a scheme MLflow does not know is recorded as a code source naming it."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    if "://" not in location:
        return LocalArtifactDatasetSource(location)
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for file://
            warnings.simplefilter("ignore")
            return resolve_dataset_source(location)
    except Exception:  # noqa: BLE001 - e.g. memory://: any scheme without a resolver
        return CodeDatasetSource({"uri": location})


class DatagenTracking:
    def __init__(self, cfg: dag.Dag, out: str, digest: str):
        self.cfg, self.out, self.digest = cfg, out, digest
        self.enabled = cfg.mlflow.enabled
        self.run_id: str | None = None
        self.resume_count = 0
        if not self.enabled:
            return
        from orchestration.ray_runtime import apply_offline_env

        apply_offline_env()  # before mlflow's import: no telemetry
        import mlflow

        self.mlflow = mlflow
        self.uri = store_uri(cfg)
        self.experiment = cfg.mlflow.experiment
        mlflow.set_tracking_uri(self.uri)
        experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        self.client = mlflow.MlflowClient(self.uri)
        continued, previous = self._previous(experiment_id)
        if continued is not None:
            self.resume_count = int(continued.data.tags.get(RESUME_COUNT, "0")) + 1
            # Back to RUNNING, whatever the last attempt left (FINISHED, FAILED, or RUNNING
            # after a killed process); the run keeps its name.
            run = mlflow.start_run(run_id=continued.info.run_id)
            mlflow.set_tag(RESUME_COUNT, str(self.resume_count))
        else:
            tags = {"onegen.kind": "datagen", "onegen.output": out, "onegen.config_digest": digest}
            if previous:
                tags[PREVIOUS_RUN] = previous
            run = mlflow.start_run(run_name=run_name(cfg, out), tags=tags)
        self.run_id = run.info.run_id
        fs, root = shards.filesystem(out)
        shards.atomic_write(
            fs,
            f"{root}/{RUN_FILE}",
            json.dumps({**self.record(), "config_digest": digest}, indent=1).encode(),
        )
        self._log_config(continued.data.params if continued is not None else {})

    def _previous(self, experiment_id: str) -> tuple[Any, str | None]:
        """(the run to continue or None, the id of an earlier run on this output that is
        not continued, for ``onegen.previous_run``)."""
        from mlflow.exceptions import MlflowException

        record = read_run_file(self.out)
        if record is None or record.get("tracking_uri") != self.uri:
            return None, None  # nothing recorded, or a run in another store
        try:
            old = self.client.get_run(record["run_id"])
        except MlflowException:
            return None, None  # deleted from the store (or never there)
        if old.info.lifecycle_stage != "active":
            return None, None
        same = (
            record.get("experiment") == self.experiment
            and old.info.experiment_id == experiment_id
            and record.get("config_digest") == self.digest
        )
        return (old, None) if same else (None, old.info.run_id)

    def _log_config(self, existing: dict[str, str]) -> None:
        """Params and the resolved DAG. A continued run keeps its params (MLflow refuses to
        change one): new keys are added, changed ones named in ``onegen.changed_on_resume``
        (they are outside the recipe: the config digest is the same)."""
        mlflow, cfg = self.mlflow, self.cfg
        params = flat_params(cfg.config)
        items = [(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yaml_text = cfg.to_yaml()
        if self.resume_count:
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                mlflow.set_tag("onegen.changed_on_resume", ",".join(changed)[:5000])
            mlflow.log_text(yaml_text, f"dag_resume_{self.resume_count}.yaml")
        else:
            mlflow.log_text(yaml_text, "dag.yaml")

    def record(self) -> dict[str, str] | None:
        """This run as a manifest's ``datagen_runs`` entry; None when tracking is off."""
        if not self.enabled or self.run_id is None:
            return None
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment}

    def __enter__(self) -> DatagenTracking:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if not self.enabled:
            return
        if exc is not None:
            self.mlflow.set_tag("onegen.failure", str(exc)[:5000])
        self.mlflow.end_run(status="FAILED" if exc is not None else "FINISHED")

    def log_outputs(self, manifests: dict[str, dict], digests: dict[str, str]) -> None:
        """Each subset manifest as a dataset of this run, context ``output``."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for subset, manifest in manifests.items():
            location = f"{self.out.rstrip('/')}/{subset}/{shards.MANIFEST}"
            digest = shards.manifest_digest(manifest)
            ds = MetaDataset(dataset_source(location), name=subset, digest=digest[:32])
            tags = [
                InputTag(key="mlflow.data.context", value="output"),
                InputTag(key="onegen.manifest_digest", value=digest),
                InputTag(key="onegen.subset_digest", value=str(digests.get(subset, ""))),
                InputTag(key="onegen.samples", value=str(manifest.get("written", ""))),
            ]
            inputs.append(DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_result(
        self,
        result: Any,
        manifests: dict[str, dict],
        quarantine: dict[str, Any],
        preview: Path | None = None,
        digests: dict[str, str] | None = None,
    ) -> None:
        """Metrics (at ``step`` = the resume count), every subset's manifest (also for
        object-store outputs) and its dataset, a quarantine summary, from the tables the
        job already read, and the local ``preview`` file."""
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
        mlflow.log_metrics(metrics, step=self.resume_count)
        for subset, m in manifests.items():
            mlflow.log_dict(m, f"manifests/{subset}/{shards.MANIFEST}")
        self.log_outputs(manifests, digests or {})
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


def datagen_run(cfg: dag.Dag, out: str, digest: str) -> DatagenTracking:
    return DatagenTracking(cfg, out, digest)
