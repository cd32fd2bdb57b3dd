"""The model DAGs (depth, pose, t2i, semantic) end to end on a real local Ray: tiny
random models in actor pools, real shards that pass ``verify`` and the schema, filtered
rows counted apart."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datagen import shards
from datagen.schema import validate_sample
from orchestration.cli import main as cli
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _run(
    tmp_path: Path, name: str, *extra: str, out: Path | None = None, stage: str | None = None
) -> Path:
    """``pipelines/<name>.yaml`` on 6 demo inputs with tiny random models, model stage
    ``stage`` (default: the DAG's name) on CPU in one actor."""
    out = out or tmp_path / f"out-{name}"
    stage = stage or name
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
            f"stages.{stage}.resources.num_gpus=0",
            f"stages.{stage}.resources.batch_size=3",
            f"stages.{stage}.resources.actors=[1,1]",
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


CAPTION_FAST = (
    "stages.caption.params.max_new_tokens=32",
    "stages.caption.params.entity_max_new_tokens=16",
)


def test_t2i_dag_captions_uncaptioned_images(ray_local, tmp_path):
    """The demo inputs come with captions: the VLM's caption is the sample's, the source
    caption is kept beside it."""
    out = _run(tmp_path, "t2i", *CAPTION_FAST, stage="caption")
    samples = _samples(out, "t2i")
    assert len(samples) == 6
    for key, files in samples:
        meta = validate_sample("t2i", {"__key__": key, **files})
        assert files["txt"].decode() == meta["caption"] and meta["caption"]
        assert meta["caption_model"] == "random-tiny"
        assert meta["source_caption"] and meta["source_caption"] != meta["caption"]
        assert "entity_names" not in meta  # t2i.yaml does not ask for entities
    assert shards.verify(str(out)).ok
    manifest = json.loads((out / "t2i" / "manifest.json").read_text())
    assert manifest["labelers"]["caption"] == "caption@1"


def test_semantic_dag_end_to_end(ray_local, tmp_path):
    out = _run(
        tmp_path,
        "semantic",
        *CAPTION_FAST,
        "stages.caption.resources.num_gpus=0",
        "stages.caption.resources.actors=[1,1]",
        "stages.caption.resources.batch_size=3",
        stage="segment",
    )
    status = shards.status(str(out))
    assert status["t2i"]["written"] == 6
    semantic = status["semantic"]
    assert semantic["written"] + semantic["quarantined"] + semantic["filtered"] == 6
    assert semantic["quarantined"] == 0 and semantic["written"] >= 3, semantic
    for key, files in _samples(out, "semantic"):
        meta = validate_sample("semantic", {"__key__": key, **files})
        assert set(files) == {"jpg", "semantic.png", "boxes.png", "json"}
        image = cv2.imdecode(np.frombuffer(files["jpg"], np.uint8), cv2.IMREAD_COLOR)
        for name in ("semantic.png", "boxes.png"):
            drawn = cv2.imdecode(np.frombuffer(files[name], np.uint8), cv2.IMREAD_UNCHANGED)
            assert drawn.shape == image.shape and drawn.dtype == np.uint8
        labels = [e["label"] for e in meta["entities"]]
        assert labels and set(labels) <= set(meta["entity_names"])
        assert len({e["color"] for e in meta["entities"]}) == len(labels)
        assert meta["segment_model"] == "random-tiny+random-tiny"
    for record in shards.read_quarantine(str(out), "semantic").to_pylist():
        assert (record["stage"], record["kind"]) == ("segment", "filtered")
        assert record["error"] in ("NoEntities", "NoEntityFound")
    assert shards.verify(str(out)).ok
    manifest = json.loads((out / "semantic" / "manifest.json").read_text())
    assert manifest["labelers"]["segment"] == "segment@1"
