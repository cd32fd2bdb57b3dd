"""From a fit to the data that fed it: a real datagen run (local Ray) writes shards whose
manifests name the run; a fit on them records those runs and the same datasets, in one
real sqlite MLflow store."""

from __future__ import annotations

import json

import pytest

from tests.helpers import small_run_args


@pytest.mark.slow
def test_a_fit_links_to_the_datagen_runs_that_wrote_its_shards(ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from datagen.shards.index import manifest_digest
    from orchestration.cli import main
    from training.config import load_config
    from training.fit import fit

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "shards"
    assert main(small_run_args(tmp_path, out)) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in ("t2i", "i2i")}
    datagen_ids = {r["run_id"] for m in manifests.values() for r in m["datagen_runs"]}
    assert len(datagen_ids) == 1

    cfg = load_config(None, [
        "name=lineage", "experiment=lineage", f"runs_dir={tmp_path / 'runs'}",
        "data.kind=onegen", f"data.paths={{t2i: {out}, i2i: {out}}}", "data.batch_size=2",
        "data.num_workers=0", "data.buckets=[[64, 64]]", "trainer.max_steps=1",
        "checkpoint.every_n_steps=1", "encoders.text_max_length=24",
        f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false",
    ])  # fmt: skip
    result = fit(cfg)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["onegen.datagen_runs"] == next(iter(datagen_ids))
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"t2i", "i2i"}
    for subset, manifest in manifests.items():
        assert inputs[subset].dataset.digest == manifest_digest(manifest)[:32]
        tags = {t.key: t.value for t in inputs[subset].tags}
        assert tags["onegen.datagen_runs"] == next(iter(datagen_ids))
    # ... and the datagen run logged the same datasets as its outputs.
    datagen_run = client.get_run(next(iter(datagen_ids)))
    outputs = {
        d.dataset.name: d.dataset.digest
        for d in datagen_run.inputs.dataset_inputs
        if any(t.key == "mlflow.data.context" and t.value == "output" for t in d.tags)
    }
    assert outputs == {s: inputs[s].dataset.digest for s in ("t2i", "i2i")}
