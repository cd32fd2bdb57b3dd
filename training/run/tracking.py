"""MLflow for training runs: config, lineage, metrics, samples, checkpoints, system metrics.

* ``build_logger``: Lightning's ``MLFlowLogger`` on ``mlflow.tracking_uri`` (default
  ``sqlite:///mlflow.db``), ``synchronous=False`` (metric batches are queued, not awaited);
  ``run_id`` given when resuming, so a resumed fit continues the same run.
* ``TrackingCallback`` (rank 0 only, after the processes are launched): the resolved config as
  flattened params and as ``config/config.yaml``; the dataset manifests as run inputs
  (``MetaDataset`` over each manifest path, digest = its sha256, full hash as an input tag);
  run tags (kind, run dir, checkpoint dir, resume origin); mlflow's ``SystemMetricsMonitor``
  for the run (skipped with a tag if psutil or the monitor cannot start); the run id written
  to ``<run_dir>/mlflow_run.json`` and into every checkpoint (``OneGenModule``).
* Per-task losses, grad norm and lr come from ``OneGenModule.log_window``; throughput/MFU from
  ``ThroughputMonitor``; sample grids and checkpoint tags from ``SampleGrid`` and
  ``OneGenCheckpoint`` (``training/callbacks.py``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from common.offline import apply_offline_env
from common.overrides import flat_params
from datagen.shards.index import manifest_digest
from training.run.folders import CHECKPOINTS, checkpoint_step

RUN_FILE = "mlflow_run.json"
INIT_FILE = "init_from.json"  # what a new run started from (model.init_from)
PROBE_TIMEOUT_S = 5.0


def disable_telemetry() -> None:
    """MLflow 3 looks up its telemetry host unless told not to; a fit talks only to the
    tracking server it was given. Called before mlflow is imported, whichever entry point
    started the fit (a user's explicit choice wins)."""
    apply_offline_env(("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"))


def probe_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an HTTP(S) tracking server cannot be reached, or None when it answers (any HTTP
    status but 502-504 counts: auth may refuse ``/health`` yet serve the API). Other stores
    (sqlite, file, databricks) are not probed: None. MLflow's own client retries for minutes
    before failing; this GET waits ``timeout`` seconds once."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if urllib.parse.urlsplit(uri).scheme.lower() not in ("http", "https"):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        # 502-504: a proxy or load balancer answered for a server that is down.
        return f"HTTP {exc.code} {exc.reason}" if exc.code in (502, 503, 504) else None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def ensure_tracking(cfg: DictConfig, warn: Any = print) -> None:
    """Fail fast on an unreachable tracking server (``TrackingError``, one line), or with
    ``mlflow.required: false`` turn tracking off for this fit (``mlflow.enabled = false``)
    and ``warn``."""
    from training.errors import TrackingError

    mcfg = cfg.mlflow
    if not mcfg.enabled:
        return
    uri = str(mcfg.tracking_uri)
    reason = probe_tracking_server(uri)
    if reason is None:
        return
    if mcfg.required:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
            "mlflow.tracking_uri, or set mlflow.required=false"
        )
    warn(f"MLflow tracking server {uri} is unreachable ({reason}); this fit runs without tracking")
    mcfg.enabled = False


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a sqlite store: every rank builds its logger, and ranks
    starting together on a new file would run MLflow's schema migrations concurrently (one
    fails). An exclusive ``flock`` on ``<db>.lock`` beside it; other stores need none."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    import fcntl

    db = Path(uri[len(prefix) :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)  # creates / migrates the schema
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_logger(cfg: DictConfig, run_id: str | None = None):
    """The run's ``MLFlowLogger``, or None when ``mlflow.enabled`` is false."""
    mcfg = cfg.mlflow
    if not mcfg.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    kwargs: dict[str, Any] = {}
    kwargs["synchronous"] = bool(mcfg.synchronous)
    with sqlite_store_lock(str(mcfg.tracking_uri)):
        return MLFlowLogger(
            experiment_name=str(cfg.experiment),
            run_name=str(cfg.run_name or cfg.name),
            tracking_uri=str(mcfg.tracking_uri),
            tags={"onegen.kind": "train"},
            run_id=run_id,
            log_model=False,
            **kwargs,
        )


def read_run_file(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_paths(cfg: DictConfig) -> list[Path]:
    """The dataset manifests a fit reads, from ``data.paths`` as ``training.data.datamodule`` takes it:
    one folder, a list of folders (datagen outputs holding ``<subset>/manifest.json``), or
    ``{subset: folder | [folders]}`` (a datagen output or the subset folder itself).
    Local paths only: remote URLs are left to the ``onegen.inputs`` tag."""
    paths = cfg.data.get("paths")
    if not paths:
        return []
    container = OmegaConf.to_container(paths, resolve=True) if not isinstance(paths, str) else paths
    found: list[Path] = []
    if isinstance(container, dict):
        for subset, roots in container.items():
            for root in [roots] if isinstance(roots, str) else roots:
                if "://" in str(root):
                    continue
                for cand in (
                    Path(root) / str(subset) / "manifest.json",
                    Path(root) / "manifest.json",
                ):
                    if cand.is_file():
                        found.append(cand)
                        break
    else:
        for root in [container] if isinstance(container, str) else container:
            if "://" not in str(root):
                found += [
                    Path(p)
                    for p in sorted(glob.glob(os.path.join(str(root), "*", "manifest.json")))
                ]
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(str(path.resolve()), path)
    return list(unique.values())


def log_dataset_inputs(client: Any, run_id: str, cfg: DictConfig) -> list[dict]:
    """Each manifest becomes a run input (``mlflow.log_inputs``): a ``MetaDataset`` named
    after its subset whose source is the manifest path and whose digest is
    ``datagen.shards.manifest_digest`` (first 32 hex chars, as the datagen run logs the same
    dataset as its output, so the two match in MLflow); the file's sha256, the sample count
    and the datagen runs that wrote it (``datagen_runs`` of the manifest) are input tags."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    logged = []
    inputs = []
    for path in manifest_paths(cfg):
        sha = sha256_file(path)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if not isinstance(manifest, dict):
            manifest = {}
        runs = [
            r
            for r in manifest.get("datagen_runs") or []
            if isinstance(r, dict) and isinstance(r.get("run_id"), str)
        ]
        name = str(manifest.get("subset") or path.parent.name)
        digest = manifest_digest(manifest) if manifest else sha
        ds = MetaDataset(
            LocalArtifactDatasetSource(str(path.resolve())), name=name, digest=digest[:32]
        )
        tags = [
            InputTag(key="mlflow.data.context", value="training"),
            InputTag(key="onegen.manifest_sha256", value=sha),
            InputTag(key="onegen.samples", value=str(manifest.get("written", ""))),
            InputTag(key="onegen.datagen_runs", value=",".join(r["run_id"] for r in runs)),
        ]
        inputs.append(DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags))
        logged.append(
            {"name": name, "path": str(path), "sha256": sha, "digest": digest, "datagen_runs": runs}
        )
    if str(cfg.data.kind) == "synthetic":
        from mlflow.data.sources import CodeDatasetSource

        node = {"seed": cfg.seed, **OmegaConf.to_container(cfg.data, resolve=True)}
        spec = json.dumps(node, sort_keys=True)
        digest = hashlib.sha256(spec.encode()).hexdigest()
        ds = MetaDataset(
            CodeDatasetSource({"generator": "training.data.synthetic.SyntheticDataModule"}),
            name="synthetic",
            digest=digest[:32],
        )
        inputs.append(
            DatasetInput(
                dataset=ds._to_mlflow_entity(),
                tags=[InputTag(key="mlflow.data.context", value="training")],
            )
        )
        logged.append({"name": "synthetic", "sha256": digest})
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return logged


class TrackingCallback(Callback):
    """Run-level MLflow records; acts on rank 0 only (the logger is a dummy elsewhere)."""

    def __init__(
        self, cfg: DictConfig, resumed_from: str | None = None, init_source: Any = None
    ) -> None:
        self.cfg = cfg
        self.resumed_from = resumed_from
        self.init_source = init_source  # model.init_from of a new run: recorded once
        self.monitor: Any = None
        self.run_id: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is None or self.run_id is not None:
            return
        # The logger creates/looks up the run on rank 0 only; every rank learns the id (one
        # broadcast, all ranks run this hook) so each node can log its own system metrics.
        run_id = trainer.strategy.broadcast(logger.run_id if trainer.is_global_zero else None, 0)
        self.run_id = run_id
        pl_module.mlflow_run_id = run_id
        if not trainer.is_global_zero:
            if trainer.local_rank == 0 and trainer.num_nodes > 1:
                self._start_system_metrics(None, run_id, str(self.cfg.mlflow.tracking_uri), trainer)
            return
        import mlflow

        client = logger.experiment
        cfg = self.cfg
        uri = str(cfg.mlflow.tracking_uri)
        mlflow.set_tracking_uri(uri)
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        params = flat_params(cfg)
        existing = run.data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
        if self.resumed_from:
            step = _ckpt_step(self.resumed_from)
            client.log_text(run_id, yaml_text, f"config/resume_{step}.yaml")
            client.set_tag(run_id, "onegen.resumed_from", str(Path(self.resumed_from).resolve()))
            client.set_tag(
                run_id,
                "onegen.resume_count",
                str(int(run.data.tags.get("onegen.resume_count", "0")) + 1),
            )
            if changed:
                client.set_tag(run_id, "onegen.changed_on_resume", ",".join(changed)[:5000])
        else:
            client.log_text(run_id, yaml_text, "config/config.yaml")
        run_dir = Path(cfg.run_dir).resolve()
        if self.init_source is not None:
            record = self.init_source.record()
            (run_dir / INIT_FILE).write_text(json.dumps(record, indent=1) + "\n")
            client.log_dict(run_id, record, INIT_FILE)
            client.set_tag(run_id, "onegen.init_from", record["path"])
            client.set_tag(run_id, "onegen.init_from.kind", record["kind"])
            client.set_tag(run_id, "onegen.init_from.sha256", json.dumps(record["sha256"])[:5000])
            if record["source_run_id"]:
                client.set_tag(run_id, "onegen.init_from.run_id", record["source_run_id"])
        client.set_tag(run_id, "onegen.run_dir", str(run_dir))
        client.set_tag(run_id, "onegen.checkpoint_dir", str((run_dir / CHECKPOINTS).resolve()))
        client.set_tag(run_id, "onegen.config_name", str(cfg.name))
        client.set_tag(run_id, "onegen.model", str(cfg.model.config))
        client.set_tag(run_id, "onegen.world_size", str(trainer.world_size))
        try:
            inputs = log_dataset_inputs(client, run_id, cfg)
            client.set_tag(run_id, "onegen.inputs", json.dumps(inputs)[:5000])
            lineage = {r["run_id"]: r for i in inputs for r in i.get("datagen_runs", [])}
            if lineage:  # walk from the fit to the runs that wrote its data
                client.set_tag(run_id, "onegen.datagen_runs", ",".join(lineage))
                client.set_tag(
                    run_id, "onegen.datagen_run_records", json.dumps(list(lineage.values()))[:5000]
                )
        except Exception as exc:  # lineage must not kill a fit
            client.set_tag(run_id, "onegen.inputs_error", str(exc)[:5000])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_FILE).write_text(
            json.dumps(
                {"run_id": run_id, "tracking_uri": uri, "experiment": str(cfg.experiment)},
                indent=1,
            )
        )
        self._start_system_metrics(client, run_id, uri, trainer)

    def _start_system_metrics(
        self, client: Any, run_id: str, uri: str, trainer: pl.Trainer
    ) -> None:
        """mlflow's SystemMetricsMonitor for this node (``system/...``; with several nodes
        ``system/node<N>/...`` from each node's local rank 0). Skipped, with a tag saying
        why, when it cannot start (psutil missing, ...); GPU metrics need pynvml."""
        mcfg = self.cfg.mlflow
        if not mcfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            node = f"node{trainer.node_rank}" if trainer.num_nodes > 1 else None
            self.monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=float(mcfg.system_metrics_interval),
                resume_logging=self.resumed_from is not None,
                node_id=node,
                tracking_uri=uri,
            )
            self.monitor.start()
            status = "on"
        except Exception as exc:  # e.g. psutil missing: run without
            self.monitor = None
            status = f"off: {exc}"
        if client is not None:
            client.set_tag(run_id, "onegen.system_metrics", status[:5000])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_id:
            pl_module.mlflow_run_id = self.run_id

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
            self.monitor = None
        if self.run_id is not None:
            with contextlib.suppress(Exception):
                import mlflow

                mlflow.flush_async_logging()


def _ckpt_step(path: str) -> str:
    """``step00000003`` for ``.../step00000003-v1.ckpt``: the step, not every digit."""
    step = checkpoint_step(path)
    return f"step{step:08d}" if step is not None else Path(str(path)).name
