"""The depth and pose DAGs end to end on a real local Ray: tiny random models in actor
pools, real shards that pass ``verify`` and the schema, filtered rows counted apart."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datagen import shards
from datagen.schema import validate_sample
from orchestration.cli import main as cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, name: str, *extra: str, out: Path | None = None) -> Path:
    out = out or tmp_path / f"out-{name}"
    code = cli(
        [
            "datagen",
            "run",
            str(REPO / "pipelines" / f"{name}.yaml"),
            "--output",
            str(out),
            "weights=random-tiny",
            "source.n=6",
            f"source.cache_dir={tmp_path / 'inputs'}",
            "source.max_side=160",
            "shards.max_samples=4",
            f"stages.{name}.resources.num_gpus=0",
            f"stages.{name}.resources.batch_size=3",
            f"stages.{name}.resources.actors=[1,1]",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ]
    )
    assert code == 0
    return out


def _samples(out: Path, subset: str) -> list[tuple[str, dict[str, bytes]]]:
    return [
        sample
        for tar in sorted((out / subset).glob("*.tar"))
        for sample in shards.read_tar_samples(tar.read_bytes())
    ]


def test_depth_dag(ray_local, tmp_path):
    out = _run(tmp_path, "depth")
    samples = _samples(out, "depth")
    assert len(samples) == 6
    for key, files in samples:
        meta = validate_sample("depth", {"__key__": key, **files})
        image = cv2.imdecode(np.frombuffer(files["jpg"], np.uint8), cv2.IMREAD_COLOR)
        depth = cv2.imdecode(np.frombuffer(files["depth.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.shape == image.shape[:2]
        assert depth.min() == 0 and depth.max() == 65535
        assert meta["depth_model"] == "random-tiny" and meta["depth_min"] < meta["depth_max"]
    assert shards.verify(str(out)).ok
    manifest = json.loads((out / "depth" / "manifest.json").read_text())
    assert manifest["labelers"]["depth"] == "depth@1"


def test_pose_dag_counts_filtered_apart(ray_local, tmp_path, capsys):
    out = _run(tmp_path, "pose")
    samples = _samples(out, "pose")
    assert len(samples) == 6
    for key, files in samples:
        meta = validate_sample("pose", {"__key__": key, **files})
        assert meta["people"] and all(len(p["keypoints"]) == 17 for p in meta["people"])
        pose = cv2.imdecode(np.frombuffer(files["pose.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert pose.shape == (meta["height"], meta["width"], 3)
    assert shards.verify(str(out)).ok
    capsys.readouterr()
    # Nobody above the threshold: every row filtered (an expected outcome), none an error.
    strict = _run(
        tmp_path,
        "pose",
        "stages.pose.params.person_conf=0.99",
        out=tmp_path / "strict",
    )
    assert (
        "pose: 0 written this run, 0 already committed, 0 quarantined, 6 filtered"
        in capsys.readouterr().out
    )
    q = shards.read_quarantine(str(strict), "pose").to_pylist()
    assert {(r["kind"], r["error"]) for r in q} == {("filtered", "NoPerson")} and len(q) == 6
    assert shards.verify(str(strict)).ok
    assert shards.status(str(strict))["pose"] | {"errors": None} == {
        "written": 0,
        "quarantined": 0,
        "filtered": 6,
        "shards": 0,
        "bytes": 0,
        "errors": None,
    }
    from orchestration.cli import main

    assert main(["datagen", "status", str(strict)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split() == ["subset", "written", "quarantined", "filtered", "shards", "bytes"]
    assert row.split() == ["pose", "0", "0", "6", "0", "0"]
