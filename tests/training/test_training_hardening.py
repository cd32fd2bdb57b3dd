"""A fit that says what went wrong: skipped data counted and limited, an unreachable MLflow
server found in seconds, ``resume=last`` / ``auto`` without a checkpoint.

The skip tests run real single-process fits on real shards (``datagen.shards.commit_shard``,
as in ``tests/helpers/training_shards.py``) in which some samples are corrupt, tracked in a real
sqlite MLflow store.
"""

from __future__ import annotations

import socket
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.training_shards import write_subset

FIT_YAML = """
name: harden-test
seed: 2
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 24}
optim: {lr: 5.0e-4, warmup_steps: 1}
trainer: {accelerator: cpu, devices: 1, max_steps: 4, log_every_n_steps: 1}
checkpoint: {every_n_steps: 100, keep: -1}
data:
  kind: synthetic
  batch_size: 2
  synthetic: {resolution: 32, max_views: 2, tasks: [text2image, canny2image]}
experiment: harden-test
mlflow: {system_metrics: false}
"""


@pytest.fixture
def fit_yaml(tmp_path) -> Path:
    path = tmp_path / "fit.yaml"
    path.write_text(FIT_YAML)
    return path


def _one_error_line(err: str, prefix: str) -> str:
    """The error is the last line on stderr and the only one of its kind (library INFO
    lines, e.g. MLflow creating its tables, may come before it); no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(prefix), err
    assert sum(ln.startswith(prefix) for ln in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


# --------------------------------------------------------------------------- skipped data


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> str:
    """t2i shards where every third sample has a JPEG that is no image and every fifth a
    metadata file that does not parse (samples 0, 15: both; counted once, as ``schema``)."""
    out = tmp_path_factory.mktemp("corrupt") / "out"
    write_subset(str(out), "t2i", [12, 12])
    for tar_path in sorted((out / "t2i").glob("*.tar")):
        raw = bytearray(tar_path.read_bytes())
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                i = int(member.name.split(".")[0].rsplit("_", 1)[1])
                if member.name.endswith(".jpg") and i % 3 == 0:
                    raw[member.offset_data : member.offset_data + 16] = bytes(16)
                if member.name.endswith(".json") and i % 5 == 0:
                    raw[member.offset_data : member.offset_data + 1] = b"#"
        tar_path.write_bytes(bytes(raw))
    return str(out)


def _data_overrides(shards: str) -> list[str]:
    return [
        "data.kind=onegen",
        f"data.paths={{t2i: {shards}}}",
        "data.num_workers=0",
        "data.buckets=[[32, 32]]",
        "data.reads_per_batch=1",
        "data.skip_rate_min_samples=1",
    ]


def _expected_skips(shards: str, steps: int) -> dict[str, int]:
    """What the fit's batches 0..steps-1 skip, from the loader itself (a pure function)."""
    from training.config import load_config
    from training.data.datamodule import OneGenDataModule
    from training.fit import build_datamodule

    cfg = load_config(None, _data_overrides(shards) + ["data.batch_size=2", "seed=2"])
    dm = build_datamodule(cfg)
    assert isinstance(dm, OneGenDataModule)
    stream = dm.stream(start_batch=0, rank=0)
    total: dict[str, int] = {}
    for k in range(steps):
        for reason, n in stream.make_batch(k)["skip_reasons"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def test_skipped_samples_reach_mlflow_and_the_progress_line(
    corrupt_shards, fit_yaml, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    from training.config import load_config
    from training.fit import fit

    expected = _expected_skips(corrupt_shards, 4)
    assert expected.get("decode", 0) > 0 and expected.get("schema", 0) > 0, expected
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(fit_yaml, _data_overrides(corrupt_shards) + [
        f"run_dir={tmp_path / 'run'}", f"mlflow.tracking_uri={db}", "data.max_skip_rate=0.9"])  # fmt: skip
    result = fit(cfg)
    assert result.global_step == 4
    client = MlflowClient(db)
    metrics = client.get_run(result.run_id).data.metrics
    for reason, n in expected.items():
        assert metrics[f"data/skipped.t2i.{reason}"] == n, (reason, metrics)
    skipped = sum(expected.values())
    assert metrics["data/skipped"] == skipped
    assert metrics["data/skip_rate.t2i"] == pytest.approx(skipped / (skipped + 4 * 2))
    history = client.get_metric_history(result.run_id, "data/skipped")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == sorted(
        m.value for m in history
    )  # cumulative
    out = capsys.readouterr().out
    last = [ln for ln in out.splitlines() if ln.startswith("step 4/4 |")]
    assert last and f"skipped {skipped} (" in last[0] and "t2i.decode" in last[0], out


def test_skip_counts_survive_a_resume(corrupt_shards, fit_yaml, tmp_path):
    """Stop at a checkpoint, resume: the totals equal an uninterrupted run's, also for the
    log window the checkpoint was saved in (saved before the module closes it)."""
    from mlflow.tracking import MlflowClient

    from training.config import load_config
    from training.fit import fit

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = _data_overrides(corrupt_shards) + [
        f"run_dir={tmp_path / 'run'}", f"mlflow.tracking_uri={db}", "data.max_skip_rate=0.9",
        "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=2"]  # fmt: skip
    fit(load_config(fit_yaml, [*common, "trainer.max_steps=2"]))
    result = fit(load_config(fit_yaml, [*common, "trainer.max_steps=4", "resume=last"]))
    assert result.resumed_from and result.global_step == 4
    metrics = MlflowClient(db).get_run(result.run_id).data.metrics
    assert metrics["data/skipped"] == sum(_expected_skips(corrupt_shards, 4).values())


def test_a_skip_rate_past_the_limit_stops_the_fit(corrupt_shards, fit_yaml, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestration.cli import main

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["train", "fit", "--config", str(fit_yaml), *_data_overrides(corrupt_shards),
               "data.max_skip_rate=0.01", f"run_dir={tmp_path / 'run'}",
               f"mlflow.tracking_uri={db}"])  # fmt: skip
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "onegen train fit: error: ")
    assert "data subset 't2i' skipped" in line and "data.max_skip_rate 1.0%" in line
    assert "last: decode" in line or "last: schema" in line
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("harden-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["data/skipped"] > 0


def test_skip_reasons_are_stable_and_summed():
    from training.data import skips
    from training.errors import SkipRateError

    rank0, rank1 = skips.empty(), skips.empty()
    batch = {"subsets": ["t2i"] * 4, "skipped": 3, "skip_reasons": {"decode": 2, "truncated": 1},
             "skip_last": "truncated: x"}  # fmt: skip
    skips.add(rank0, batch)
    skips.add(rank1, {**batch, "skipped": 0, "skip_reasons": {}, "skip_last": ""})
    skips.add(rank1, {"subsets": ["t2i"] * 4})  # synthetic batches carry no counts
    total = skips.merge(skips.empty(), rank0, rank1)
    m = skips.metrics(total)
    assert m["data/skipped.t2i.decode"] == 2 and m["data/skipped.t2i.truncated"] == 1
    assert m["data/skip_rate.t2i"] == pytest.approx(3 / 11)
    skips.check(total, 0.3, 1)
    with pytest.raises(SkipRateError, match=r"skipped 3 of 11 samples .* last: truncated: x"):
        skips.check(total, 0.2, 1)
    skips.check(total, 0.2, 12)  # too few samples read yet to judge


# --------------------------------------------------------------------------- MLflow server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_in_seconds(fit_yaml, tmp_path, capsys):
    from orchestration.cli import main

    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    rc = main(["train", "fit", "--config", str(fit_yaml), f"mlflow.tracking_uri={uri}",
               f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    assert rc == 1 and time.monotonic() - t0 < 30
    line = _one_error_line(capsys.readouterr().err, "onegen train fit: error: ")
    assert line.startswith(
        f"onegen train fit: error: MLflow tracking server {uri} is unreachable ("
    )
    assert line.endswith("start it, fix mlflow.tracking_uri, or set mlflow.required=false")


def test_unreachable_tracking_server_not_required_runs_untracked(fit_yaml, tmp_path, capsys):
    from orchestration.cli import main

    uri = f"http://127.0.0.1:{_closed_port()}"
    rc = main(["train", "fit", "--config", str(fit_yaml), f"mlflow.tracking_uri={uri}",
               "mlflow.required=false", "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert f"MLflow tracking server {uri} is unreachable" in captured.err
    assert "done: step 2" in captured.out and "mlflow run:" not in captured.out


def test_local_stores_are_not_probed(monkeypatch):
    import urllib.request

    from training.run.tracking import probe_tracking_server

    def no_network(*args, **kwargs):
        raise AssertionError("probed the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns", "databricks"):
        assert probe_tracking_server(uri) is None
    with pytest.raises(AssertionError, match="probed"):
        probe_tracking_server("http://127.0.0.1:1")


def test_tracking_uri_defaults_to_the_environment(fit_yaml, monkeypatch):
    from training.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/team.db")
    assert load_config(fit_yaml).mlflow.tracking_uri == "sqlite:////srv/team.db"
    given = load_config(fit_yaml, ["mlflow.tracking_uri=sqlite:///x.db"])
    assert given.mlflow.tracking_uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(fit_yaml).mlflow.tracking_uri == "sqlite:///mlflow.db"


# --------------------------------------------------------------------------- resume modes


def test_resume_last_without_a_checkpoint_is_an_error(fit_yaml, tmp_path, capsys):
    from orchestration.cli import main

    rc = main(["train", "fit", "--config", str(fit_yaml), "resume=last",
               f"run_dir={tmp_path / 'run'}", "mlflow.enabled=false"])  # fmt: skip
    assert rc == 2  # a config that cannot start: nothing ran
    line = _one_error_line(capsys.readouterr().err, "onegen train fit: error: ")
    assert line.endswith(
        f"resume=last but no checkpoint in {tmp_path / 'run'}; "
        "use resume=auto to start fresh when there is none"
    )


def test_resume_auto_starts_fresh_then_resumes(fit_yaml, tmp_path):
    from training.config import load_config
    from training.fit import fit

    base = [f"run_dir={tmp_path / 'run'}", "mlflow.enabled=false", "resume=auto",
            "checkpoint.every_n_steps=2"]  # fmt: skip
    first = fit(load_config(fit_yaml, base + ["trainer.max_steps=2"]))
    assert first.resumed_from is None and first.global_step == 2
    second = fit(load_config(fit_yaml, base + ["trainer.max_steps=3"]))
    assert second.resumed_from == str(tmp_path / "run" / "checkpoints" / "step00000002.ckpt")
    assert second.global_step == 3


# --------------------------------------------------------------------------- process groups


_TWO_FITS = """
import sys
import torch.distributed as dist
from orchestration.cli import main
config, out = sys.argv[1], sys.argv[2]
common = ["--config", config, "mlflow.enabled=false", "trainer.max_steps=1"]
print("first", main(["train", "fit", *common, "trainer.strategy=fsdp", f"run_dir={out}/a"]), flush=True)
print("group left open", dist.is_initialized(), flush=True)
print("second", main(["train", "fit", *common, "resume=last", f"run_dir={out}/b"]), flush=True)
"""


@pytest.mark.slow
def test_a_one_device_fsdp_fit_leaves_the_process_usable(fit_yaml, tmp_path):
    """``trainer.strategy=fsdp`` on one device opens a process group of one (Lightning leaves
    it open): the fit's end closes it instead of ending the process as a real distributed
    run's end does, so a later fit in the same process returns its exit code. In a
    subprocess: a process that ends early (with code 0) must show as missing lines."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO
    from training.fit import RENDEZVOUS_ENV

    # a fresh process, as a user's: no rendezvous left by fits earlier in this one
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", _TWO_FITS, str(fit_yaml), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("first", "group", "second"))]
    assert lines == ["first 0", "group left open False", "second 2"], (
        proc.stdout + proc.stderr[-2000:]
    )
    assert "resume=last but no checkpoint" in proc.stderr
