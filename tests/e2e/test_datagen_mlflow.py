"""MLflow conventions of datagen runs, on a real local Ray and a real sqlite store:
``MLFLOW_TRACKING_URI`` honoured, run names a reviewer can tell apart, output datasets,
the run ids in the manifests, a rerun continuing its run, a new recipe a new run.

One demo run and two quick reruns on the same output (every key already committed) serve
all tests: the fixture runs them in order and keeps what each left behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import pytest

from datagen import shards
from orchestration.datagen_job import run
from orchestration.submit import absolute_tracking_uri
from pipelines import dag
from tests.helpers import MLFLOW_PROCESS_ENV, REPO

pytestmark = pytest.mark.slow
DEMO = REPO / "pipelines" / "captioned.yaml"
RUN_FILE = "_mlflow_run.json"  # OUT/_mlflow_run.json: the run a rerun continues


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _overrides(tmp: Path, *extra: str) -> list[str]:
    """The tiny demo (conftest's ``cheap_cfg``) without an explicit tracking URI."""
    return [
        f"output={tmp / 'data' / 'demo'}",
        "source.n=4",
        f"source.cache_dir={tmp / 'inputs'}",
        "source.max_side=96",
        "shards.max_samples=4",
        "subsets=[t2i,i2i]",
        "ray.num_cpus=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datagen_mlflow")
    env_store = f"sqlite:///{tmp / 'env.db'}"
    # In-process MLflow exports the active experiment and run into os.environ: restore all
    # of it after this module's runs, or later tests' subprocesses inherit them.
    saved = {k: os.environ.get(k) for k in MLFLOW_PROCESS_ENV}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # a store falling back to sqlite:///mlflow.db lands here, not in the repo
        for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", env_store)
        found: dict = {"tmp": tmp, "store": env_store, "started": time.time()}
        cfg = dag.load(DEMO, _overrides(tmp))
        # Where the run landed, whichever store that is (the tests below read it there).
        found["used"] = absolute_tracking_uri(str(cfg.mlflow.tracking_uri))
        first = run(cfg, log=lambda *_: None)
        out = Path(first.output)
        found["first"] = first
        found["manifest_first"] = json.loads((out / "i2i" / "manifest.json").read_text())
        found["manifests_first"] = {s: shards.read_manifest(str(out), s) for s in ("t2i", "i2i")}
        found["run_file_first"] = _json(out / RUN_FILE)
        # As a killed process leaves it: a rerun must bring it back to FINISHED.
        mlflow.MlflowClient(found["used"]).update_run(first.mlflow_run_id, status="RUNNING")
        found["rerun"] = run(dag.load(DEMO, _overrides(tmp)), log=lambda *_: None)
        found["manifest_rerun"] = json.loads((out / "i2i" / "manifest.json").read_text())
        changed = _overrides(tmp, "allow_recipe_change=true", "stages.degrade.params.canny_low=50")
        found["changed"] = run(dag.load(DEMO, changed), log=lambda *_: None)
        found["manifest_changed"] = json.loads((out / "i2i" / "manifest.json").read_text())
        found["run_file_changed"] = _json(out / RUN_FILE)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    yield found


def test_the_environment_names_the_store_unless_the_dag_does(runs, tmp_path, monkeypatch):
    assert runs["used"] == runs["store"]
    client = mlflow.MlflowClient(runs["store"])
    first = client.get_run(runs["first"].mlflow_run_id)
    assert first.data.tags["onegen.kind"] == "datagen"
    assert not (runs["tmp"] / "mlflow.db").exists()
    # Precedence, as the CLI loads a DAG: explicit value > environment > sqlite:///mlflow.db.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert dag.load(DEMO, ["subsets=[i2i]"]).mlflow.tracking_uri == "sqlite:////from/env.db"
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    cfg = dag.load(DEMO, ["subsets=[i2i]", f"mlflow.tracking_uri={explicit}"])
    assert cfg.mlflow.tracking_uri == explicit
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert dag.load(DEMO, ["subsets=[i2i]"]).mlflow.tracking_uri == "sqlite:///mlflow.db"
    # The store is not part of the recipe.
    assert cfg.config_digest == dag.load(DEMO, ["subsets=[i2i]"]).config_digest


def test_run_name_tells_dag_output_and_time(runs):
    info = mlflow.MlflowClient(runs["used"]).get_run(runs["first"].mlflow_run_id)
    name = info.info.run_name
    assert name.startswith("datagen-captioned -> ")
    assert "data/demo" in name  # relative to the working folder, as the user typed it
    stamp = name.rsplit(" @ ", 1)[1]
    assert abs(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M")) - runs["started"]) < 180
    tags = info.data.tags
    assert tags["onegen.output"] == runs["first"].output
    assert tags["onegen.config_digest"] == runs["run_file_first"]["config_digest"]


def test_output_datasets_are_logged_with_context_output(runs):
    out = Path(runs["first"].output)
    inputs = mlflow.MlflowClient(runs["used"]).get_run(runs["first"].mlflow_run_id).inputs
    by_name = {d.dataset.name: d for d in inputs.dataset_inputs}
    assert set(by_name) == {"t2i", "i2i"}
    for subset, d in by_name.items():
        tags = {t.key: t.value for t in d.tags}
        assert tags["mlflow.data.context"] == "output"
        assert tags["onegen.samples"] == "4"
        assert d.dataset.source_type == "local"
        assert json.loads(d.dataset.source)["uri"] == str(out / subset / "manifest.json")
        manifest = runs["manifests_first"][subset]
        assert d.dataset.digest == shards.manifest_digest(manifest)[:32]


def test_manifest_records_the_datagen_run(runs):
    first = runs["first"]
    entry = {
        "run_id": first.mlflow_run_id,
        "tracking_uri": runs["used"],
        "experiment": "onegen-datagen",
    }
    assert runs["manifest_first"]["datagen_runs"] == [entry]
    assert runs["run_file_first"] == {
        **entry,
        "config_digest": runs["run_file_first"]["config_digest"],
    }
    # Still a manifest every reader takes; a manifest from before the field reads too.
    out = str(Path(first.output))
    assert shards.verify(out).ok
    old = {k: v for k, v in runs["manifest_first"].items() if k != "datagen_runs"}
    assert shards.manifest_problem(old) is None


def test_a_rerun_continues_the_same_run(runs):
    first, rerun = runs["first"], runs["rerun"]
    assert rerun.pending == 0
    assert rerun.mlflow_run_id == first.mlflow_run_id
    client = mlflow.MlflowClient(runs["used"])
    info = client.get_run(first.mlflow_run_id)
    assert info.data.tags["onegen.resume_count"] == "1"
    assert info.info.status == "FINISHED"  # the "killed" run, continued and finished
    history = client.get_metric_history(first.mlflow_run_id, "pending")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (1, 0.0)]
    assert [r["run_id"] for r in runs["manifest_rerun"]["datagen_runs"]] == [first.mlflow_run_id]
    artifacts = {a.path for a in client.list_artifacts(first.mlflow_run_id)}
    assert {"dag.yaml", "dag_resume_1.yaml"} <= artifacts


def test_a_changed_recipe_starts_a_new_run_naming_the_old(runs):
    first, changed = runs["first"], runs["changed"]
    assert changed.mlflow_run_id != first.mlflow_run_id
    client = mlflow.MlflowClient(runs["used"])
    info = client.get_run(changed.mlflow_run_id)
    assert info.data.tags["onegen.previous_run"] == first.mlflow_run_id
    assert "onegen.resume_count" not in info.data.tags
    assert info.info.status == "FINISHED"
    assert runs["run_file_changed"]["run_id"] == changed.mlflow_run_id
    assert runs["run_file_changed"]["config_digest"] != runs["run_file_first"]["config_digest"]
    assert [r["run_id"] for r in runs["manifest_changed"]["datagen_runs"]] == [
        first.mlflow_run_id,
        changed.mlflow_run_id,
    ]
