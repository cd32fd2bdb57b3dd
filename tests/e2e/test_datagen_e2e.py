"""The demo DAG on a real local Ray: real tars, real readers, real MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import webdataset as wds

from datagen import shards
from datagen.schema import validate_sample
from orchestration.cli import main as cli
from orchestration.datagen_job import DatagenError, run
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _all_keys(out: Path, subset: str) -> list[str]:
    return [
        k
        for tar in sorted((out / subset).glob("*.tar"))
        for k, _ in shards.read_tar_samples(tar.read_bytes())
    ]


def test_demo_dag_end_to_end(ray_local, cheap_cfg, tmp_path, capsys):
    cfg = cheap_cfg(n=12)
    result = run(cfg, log=lambda *_: None)
    out = Path(result.output)

    for subset in ("t2i", "i2i"):
        assert result.subsets[subset]["written"] == 12
        assert result.subsets[subset]["quarantined"] == 0
        assert sorted(_all_keys(out, subset)) == [f"demo_{i:06d}" for i in range(12)]
        manifest = json.loads((out / subset / "manifest.json").read_text())
        assert manifest["written"] == 12 and len(manifest["shards"]) == 3  # 4 samples per shard
    assert shards.verify(str(out)).ok
    assert cli(["datagen", "verify", str(out)]) == 0

    # Plain webdataset reads every sample, grouped correctly, and it passes the contract.
    urls = shards.shard_urls(str(out), "i2i")
    assert sorted(urls) == sorted(str(p) for p in (out / "i2i").glob("*.tar"))
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        files = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        files.pop("__url__", None)
        files.pop("__local_path__", None)
        meta = validate_sample("i2i", files)
        assert meta["degradations"]["seed"] == 0
        assert {
            "jpg",
            "canny.png",
            "hed.png",
            "blur.jpg",
            "lowres.jpg",
            "masked.jpg",
            "mask.png",
        } <= set(files)
        seen.append(sample["__key__"])
    assert sorted(seen) == [f"demo_{i:06d}" for i in range(12)]

    # Ray Data reads the same shards back.
    ds = ray_local.data.read_webdataset(shards.shard_urls(str(out), "t2i"), decoder=None)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == [f"demo_{i:06d}" for i in range(12)]
    assert all(r["txt"] for r in rows)

    # MLflow: params, per-stage metrics and the artifacts.
    client = mlflow.MlflowClient(str(cfg.mlflow.tracking_uri))
    run_info = client.get_run(result.mlflow_run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["stages.decode.params.min_side"] == "64"
    assert run_info.data.metrics["stage.decode.in"] == 12
    assert run_info.data.metrics["stage.degrade.out"] == 12
    assert run_info.data.metrics["subset.i2i.written"] == 12
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"dag.yaml", "quarantine_summary.json", "_preview.png", "manifests"} <= artifacts

    # status and preview from the CLI.
    capsys.readouterr()
    assert cli(["datagen", "status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["t2i"]["written"] == 12 and status["i2i"]["shards"] == 3
    sheet = tmp_path / "sheet.png"
    assert cli(["datagen", "preview", str(out), "--out", str(sheet), "--samples", "2"]) == 0
    assert sheet.stat().st_size > 0

    # A rerun resumes by key: nothing left to do, nothing rewritten.
    before = sorted(p.name for p in out.rglob("*.tar"))
    again = run(cfg, log=lambda *_: None)
    assert again.pending == 0
    assert sorted(p.name for p in out.rglob("*.tar")) == before
    # More inputs later: only the new keys are processed, old shards untouched.
    progress: list[str] = []
    bigger = run(cheap_cfg("allow_recipe_change=true", n=16), log=progress.append)
    assert bigger.pending == 4
    assert sorted(_all_keys(out, "i2i")) == [f"demo_{i:06d}" for i in range(16)]
    assert shards.verify(str(out)).ok
    # ... and the summary says so, instead of reading like a loss ("4 written (of 16)").
    for subset in ("t2i", "i2i"):
        s = bigger.subsets[subset]
        assert (s["written_this_run"], s["already_committed"], s["written"], s["inputs"]) == (
            4,
            12,
            16,
            16,
        )
    assert "4/4 keys processed this run (12 already committed)" in progress[-1]

    # The CLI on the finished output: nothing to do, every key accounted for.
    capsys.readouterr()
    assert (
        cli(
            [
                "datagen",
                "run",
                str(REPO / "pipelines" / "captioned.yaml"),
                "--output",
                str(out),
                "source.n=16",
                f"source.cache_dir={tmp_path / 'inputs'}",
                "source.max_side=256",
                "shards.max_samples=4",
                "subsets=[t2i,i2i]",
                "allow_recipe_change=true",
                f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "done in" in printed
        and "0 inputs processed this run, 16 already committed, 16 in all" in printed
    )
    assert (
        "t2i: 0 written this run, 16 already committed, 0 quarantined, 16 inputs in all" in printed
    )


def test_bad_inputs_are_quarantined_with_exact_accounting(ray_local, cheap_cfg, tmp_path):
    from datagen.sources.base import key_from_path
    from tests.helpers.bad_inputs import write_bad_inputs

    folder = tmp_path / "images"
    folder.mkdir()
    expected = write_bad_inputs(folder)
    good = (
        sorted(p for p in (tmp_path / "inputs").glob("*.jpg"))
        if (tmp_path / "inputs").exists()
        else []
    )
    assert not good  # the folder holds only what write_bad_inputs made
    cfg = cheap_cfg("max_error_rate=1.0", f"source.path={folder}", "source.kind=folder")
    result = run(cfg, log=lambda *_: None)
    out = Path(result.output)

    keys = {key_from_path(name): err for name, err in expected.items()}
    for subset in ("t2i", "i2i"):
        written = set(shards.read_indexes(str(out), subset).column("key").to_pylist())
        q = shards.read_quarantine(str(out), subset).to_pylist()
        quarantined = {r["key"]: r for r in q}
        assert len(q) == len(quarantined), "a key was quarantined twice"
        assert written.isdisjoint(quarantined)
        assert written | set(quarantined) == set(keys)
        for key, err in keys.items():
            if err is None:
                if subset == "i2i":
                    assert key in written, f"{key} should decode"
            else:
                assert quarantined[key]["error"] == err, (key, quarantined[key])
                assert quarantined[key]["stage"] == "decode"
                assert quarantined[key]["uri"].startswith(str(folder))
        assert result.subsets[subset]["written"] + result.subsets[subset]["quarantined"] == len(
            keys
        )
    # Good images have no caption: t2i quarantines them at the schema check, with the reason.
    t2i_q = shards.read_quarantine(str(out), "t2i").to_pylist()
    assert {r["stage"] for r in t2i_q if keys[r["key"]] is None} == {"schema"}
    assert shards.verify(str(out)).ok


def test_error_rate_above_the_limit_fails_after_committing(ray_local, cheap_cfg, tmp_path):
    from tests.helpers.bad_inputs import write_bad_inputs

    folder = tmp_path / "images"
    folder.mkdir()
    write_bad_inputs(folder)
    cfg = cheap_cfg(f"source.path={folder}", "source.kind=folder", "max_error_rate=0.05")
    with pytest.raises(DatagenError, match="exceeds max_error_rate"):
        run(cfg, log=lambda *_: None)
    out = Path(str(cfg.output))
    status = shards.status(str(out))
    assert status["i2i"]["written"] + status["i2i"]["quarantined"] == len(list(folder.iterdir()))
    client = mlflow.MlflowClient(str(cfg.mlflow.tracking_uri))
    runs = client.search_runs([client.get_experiment_by_name("onegen-datagen").experiment_id])
    assert runs[0].info.status == "FAILED"


def test_verify_catches_truncation_and_checksum_mismatch(ray_local, cheap_cfg, tmp_path):
    cfg = cheap_cfg(n=8)
    out = Path(run(cfg, log=lambda *_: None).output)
    assert shards.verify(str(out)).ok

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    tar = sorted((truncated / "i2i").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    report = shards.verify(str(truncated))
    assert not report.ok
    assert any(tar.name in d and "sha256" in d for d in report.defects)
    assert cli(["datagen", "verify", str(truncated)]) == 1

    flipped = tmp_path / "flipped"
    shutil.copytree(out, flipped)
    tar = sorted((flipped / "t2i").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside the first member's payload: the tar still parses
    tar.write_bytes(bytes(data))
    report = shards.verify(str(flipped))
    assert [d for d in report.defects if "sha256" in d and tar.name in d]
    assert cli(["datagen", "verify", str(flipped)]) == 1


def test_actor_pool_stage_gives_the_same_samples_as_tasks(ray_local, cheap_cfg, tmp_path):
    """A stage with ``actors`` runs as a Ray actor pool with fractional CPUs;
    it must produce byte-identical shards to the fused-task path."""
    tasks = run(cheap_cfg(n=6), log=lambda *_: None)
    pooled_cfg = cheap_cfg(
        "stages.degrade.resources.actors=[1,2]",
        "stages.degrade.resources.num_cpus=0.5",
        f"output={tmp_path / 'pooled'}",
        n=6,
    )
    pooled = run(pooled_cfg, log=lambda *_: None)
    for subset in ("t2i", "i2i"):
        a = sorted(p.name for p in (Path(tasks.output) / subset).glob("*.tar"))
        b = sorted(p.name for p in (Path(pooled.output) / subset).glob("*.tar"))
        assert a == b and a
        for name in a:
            assert (Path(tasks.output) / subset / name).read_bytes() == (
                Path(pooled.output) / subset / name
            ).read_bytes()


def test_url_output_stages_nothing_at_fixed_temp_paths(ray_local, cheap_cfg, tmp_path, monkeypatch):
    """A URL output (``file://`` here) stages demo inputs and draws its preview in a
    private temporary folder, not at the fixed /tmp names an attacker could plant a
    symlink at; the preview lands in the output itself."""
    import os
    import tempfile

    from common.offline import OFFLINE_ENV

    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("keep")
    victim_file = tmp_path / "victim.png"
    victim_file.write_bytes(b"precious")
    planted = {
        Path("/tmp/onegen-inputs"): victim_dir,
        Path("/tmp/onegen-preview.png"): victim_file,
        Path(tempfile.gettempdir()) / "onegen-yolo": victim_dir,
    }
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    seen: list[list[tuple[str, int]]] = []

    def log(_: str) -> None:  # what the temp folder holds while the run is under way
        seen.append([(p.name, p.stat().st_mode & 0o777) for p in private_tmp.iterdir()])

    made = []
    try:
        for link, target in planted.items():
            if link.exists() or link.is_symlink():
                pytest.skip(f"{link} exists on this machine; cannot plant a symlink there")
            link.symlink_to(target)
            made.append(link)
        out = f"file://{tmp_path / 'out'}"
        result = run(cheap_cfg(f"output={out}", "source.cache_dir=null", n=4), log=log)
    finally:
        for link in made:
            link.unlink()
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    assert (victim_dir / "keep.txt").read_text() == "keep"
    assert victim_file.read_bytes() == b"precious"
    assert result.subsets["i2i"]["written"] == 4
    assert result.preview == f"{out}/_preview.png"
    assert (tmp_path / "out" / "_preview.png").stat().st_size > 0
    private = {entry for snapshot in seen for entry in snapshot}
    assert private and all(
        name.startswith("onegen-run-") and mode == 0o700 for name, mode in private
    )
    assert not list(private_tmp.iterdir()), "the private folder is removed after the run"
    assert not any(str(tempfile.gettempdir()) in v or "/tmp" in v for v in OFFLINE_ENV.values())
    assert os.environ.get("YOLO_CONFIG_DIR", "") != str(Path(tempfile.gettempdir()) / "onegen-yolo")
