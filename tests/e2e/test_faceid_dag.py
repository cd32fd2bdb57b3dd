"""The faceid DAG: the identity packing stage on group rows (with and without a face check
and a caption stage before it), and ``pipelines/faceid.yaml`` end to end on a real local
Ray with tiny random models: samples that read back as [[faceid]] prompts, and every key
written, quarantined or filtered exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from datagen import shards
from datagen.images import decode_rgb
from datagen.schema import validate_sample
from datagen.sources.identities import demo_identity_photos, identity_manifest
from datagen.stages.face import face_label
from datagen.stages.identity import IdentityParams, IdentityStage
from datagen.stages.protocol import meta_column, status_column
from datagen.stages.runner import run_stage
from orchestration.cli import main as cli
from pipelines import dag
from tests.helpers import REPO

FACEID_YAML = REPO / "pipelines" / "faceid.yaml"

# -- the identity stage on constructed group rows --------------------------------------------

# Two photos, each with one bright square "face" on a dark background.
FACES = [((300, 200), [180, 60, 220, 110]), ((240, 240), [20, 150, 70, 200])]


def _photo(size: tuple[int, int], box: list[int]) -> np.ndarray:
    width, height = size
    image = np.full((height, width, 3), 30, np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 230
    return image


def _group_batch(
    stage_metas: dict[str, dict], view_caption: list[str | None]
) -> tuple[dict[str, list], tuple[str, ...]]:
    """One identity's group row after ``stage_metas`` (stage -> its merged metadata)."""
    batch: dict[str, list] = {
        "key": ["ann-s0"],
        "views": [len(FACES)],
        "group": ["Ann Lee"],
        "view_caption": [view_caption],
        "image": [[_photo(size, box) for size, box in FACES]],
    }
    for stage, meta in stage_metas.items():
        batch[status_column(stage)] = ["ok"]
        batch[meta_column(stage)] = [json.dumps(meta)]
    return batch, tuple(stage_metas)


def _face_meta(margin: float = 0.5) -> dict[str, list]:
    labels = [
        face_label(
            np.array([box], float),
            np.array([0.9]),
            *size,
            conf=0.5,
            min_face_side=8.0,
            margin=margin,
        )
        for size, box in FACES
    ]
    return {k: [label[k] for label in labels] for k in labels[0]}


def test_packs_face_crops_with_boxes_in_stored_pixels():
    face = _face_meta()
    assert face["face_crop"] == [[150, 35, 250, 135], [0, 125, 100, 225]]
    batch, needs = _group_batch(
        {
            "decode": {"caption": ["", ""], "width": [300, 240]},
            "face": face,
            "caption": {"caption": ["a VLM caption", " "], "caption_model": ["vlm-x", "vlm-x"]},
        },
        ["the manifest's first", "the manifest's second"],
    )
    out = run_stage(
        IdentityStage(IdentityParams(max_side=64, min_side=32)), batch, name="identity", needs=needs
    )
    assert out[status_column("identity")] == ["ok"]
    meta = json.loads(out[meta_column("identity")][0])
    assert meta == {
        "identity": "Ann Lee",
        "captions": ["a VLM caption", "the manifest's second"],
        "num_views": 2,
        # crops of 100 px stored at 64: (box - crop origin) * 0.64
        "face_boxes": [[19.2, 16.0, 44.8, 48.0], [12.8, 16.0, 44.8, 48.0]],
        "caption_model": "vlm-x",
    }
    jpgs = out["img_jpg"][0]
    assert len(jpgs) == 2
    for jpg, box in zip(jpgs, meta["face_boxes"], strict=True):
        stored = decode_rgb(jpg)
        assert stored.shape == (64, 64, 3)
        x0, y0, x1, y1 = (round(v) for v in box)
        assert stored[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3].min() > 200  # the face, where the box says
        outside = np.ones(stored.shape[:2], bool)
        outside[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False
        assert stored[outside].max() < 60


def test_without_a_face_check_photos_are_stored_whole():
    batch, needs = _group_batch({"decode": {"caption": ["", ""]}}, ["the manifest's first", None])
    out = run_stage(
        IdentityStage(IdentityParams(max_side=150, min_side=32)),
        batch,
        name="identity",
        needs=needs,
    )
    meta = json.loads(out[meta_column("identity")][0])
    assert meta == {"identity": "Ann Lee", "captions": ["the manifest's first", ""], "num_views": 2}
    shapes = [decode_rgb(jpg).shape for jpg in out["img_jpg"][0]]
    assert shapes == [(100, 150, 3), (150, 150, 3)]  # long side brought down to max_side


def test_a_crop_below_min_side_filters_the_sample():
    batch, needs = _group_batch({"decode": {}, "face": _face_meta(margin=0.0)}, [None, None])
    out = run_stage(IdentityStage(IdentityParams(min_side=56)), batch, name="identity", needs=needs)
    assert out[status_column("identity")] == ["filtered"]
    assert out["identity.error"] == ["SmallFace"]
    assert out["identity.message"][0] == "view 0: the crop is 50x50, a side below min_side=56"
    assert out["img_jpg"] == [b""]


def test_an_item_row_is_not_an_identity():
    batch = {"key": ["x"], "image": [np.zeros((80, 80, 3), np.uint8)], "group": [None]}
    out = run_stage(IdentityStage(), batch, name="identity", needs=())
    assert out[status_column("identity")] == ["error"]
    assert out["identity.error"] == ["NotAGroup"]


def test_faceid_dag_validates_and_orders_its_stages():
    cfg = dag.load(FACEID_YAML, ["weights=random-tiny"])
    assert [(s.name, s.needs) for s in cfg.stages] == [
        ("decode", ()),
        ("face", ("decode",)),
        ("caption", ("decode", "face")),  # photos the face check rejects are not captioned
        ("identity", ("decode", "face", "caption")),
    ]
    assert [(s.name, s.needs) for s in cfg.subsets] == [
        ("faceid", ("decode", "face", "caption", "identity"))
    ]
    # the documented override to a user's manifest validates (demo keys are dropped)
    cfg = dag.load(
        FACEID_YAML, ["weights=random-tiny", "source.kind=identities", "source.path=people.csv"]
    )
    assert cfg.source_spec == {
        "kind": "identities",
        "path": "people.csv",
        "min_images": 4,
        "views": [2, 4],
        "samples_per_identity": 2,
    }


def test_one_caption_per_identity_is_refused():
    with pytest.raises(dag.DagError, match=r"stages.identity: .*group_views.*'all', not 'first'"):
        dag.load(FACEID_YAML, ["weights=random-tiny", "stages.caption.params.group_views=first"])


# -- the DAG end to end on Ray -----------------------------------------------------------------


def _variant(tmp_path: Path, without: str) -> Path:
    """pipelines/faceid.yaml without one stage (as its header says a user may)."""
    config = yaml.safe_load(FACEID_YAML.read_text())
    config["stages"] = [s for s in config["stages"] if s["name"] != without]
    path = tmp_path / f"faceid-without-{without}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(tmp_path: Path, dag_path: Path, out: Path, *extra: str) -> None:
    assert (
        cli(
            [
                "datagen",
                "run",
                str(dag_path),
                "--output",
                str(out),
                "weights=random-tiny",
                "shards.max_samples=4",
                "ray.num_cpus=2",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                *extra,
            ]
        )
        == 0
    )


def _samples(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [
        sample
        for tar in sorted((out / "faceid").glob("*.tar"))
        for sample in shards.read_tar_samples(tar.read_bytes())
    ]


DEMO = {
    "kind": "demo_identities",
    "images_per_identity": 4,
    "min_images": 4,
    "views": [2, 3],
    "samples_per_identity": 1,
    "max_side": 128,
}
MODEL_ON_CPU = ("resources.num_gpus=0", "resources.actors=[1,1]", "resources.batch_size=3")


@pytest.mark.slow
def test_faceid_dag_writes_identities_that_read_back_as_prompts(ray_local, tmp_path):
    """decode -> caption -> identity (the face check left out: random weights filter at
    random) on the demo identities."""
    from training.data.tasks import build_prompt, faceid_task

    cache, out = tmp_path / "cache", tmp_path / "out"
    source = [f"source.{k}={json.dumps(v)}" for k, v in DEMO.items()]
    _run(
        tmp_path,
        _variant(tmp_path, "face"),
        out,
        *source,
        f"source.cache_dir={cache}",
        *(f"stages.caption.{r}" for r in MODEL_ON_CPU),
        "stages.caption.params.max_new_tokens=12",
        "stages.caption.params.min_words=0",
        "stages.identity.params.max_side=96",
    )
    manifest = {
        r["key"]: r for r in identity_manifest({**DEMO, "cache_dir": str(cache)}, ".").to_pylist()
    }
    samples = _samples(out)
    assert sorted(k for k, _ in samples) == sorted(manifest) and len(samples) == 6
    for key, files in samples:
        meta = validate_sample("faceid", {"__key__": key, **files})
        row = manifest[key]
        n = row["views"]
        assert sorted(files) == sorted([f"img{i}.jpg" for i in range(n)] + ["json"])
        assert meta["num_views"] == n and meta["identity"] == row["group"]
        assert meta["caption_model"] == "random-tiny" and "face_boxes" not in meta
        captions = meta["captions"]
        assert len(captions) == n and all(isinstance(c, str) and c for c in captions)
        prompt = build_prompt(faceid_task(n), captions)
        assert prompt == "[[faceid]] " + " ".join(f"[[img{i}]] {c}" for i, c in enumerate(captions))
        # img{i} is the manifest's photo i (in the sample's order), stored at max_side
        photos = [cv2.cvtColor(cv2.imread(u), cv2.COLOR_BGR2RGB) for u in row["uri"]]
        for i in range(n):
            stored = decode_rgb(files[f"img{i}.jpg"]).astype(float)
            assert max(stored.shape[:2]) <= 96
            size = (stored.shape[1], stored.shape[0])
            errors = [
                np.abs(cv2.resize(p, size, interpolation=cv2.INTER_AREA) - stored).mean()
                for p in photos
            ]
            assert int(np.argmin(errors)) == i and errors[i] < 6, (key, i, errors)
    assert shards.verify(str(out)).ok
    assert cli(["datagen", "verify", str(out)]) == 0


@pytest.mark.slow
def test_faceid_dag_with_the_face_check_accounts_for_every_key(ray_local, tmp_path):
    """decode -> face -> identity (the caption left out) on a user's manifest: an identity
    under the minimum, a broken row and samples the random face model rejects all end up
    counted once, each with its reason."""
    photos = _demo_photos(tmp_path / "cache")
    first, second, third = list(photos)[:3]
    rows = [{"uri": uri, "identity": who} for who in (first, second) for uri in photos[who]]
    rows += [{"uri": uri, "identity": third} for uri in photos[third][:2]]
    rows.append({"uri": "", "identity": "x"})
    manifest_path = tmp_path / "people.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"kind": "identities", "path": str(manifest_path)}
    source |= {"views": [2, 3], "samples_per_identity": 2}
    out = tmp_path / "out"
    _run(
        tmp_path,
        _variant(tmp_path, "caption"),
        out,
        *(f"source.{k}={json.dumps(v)}" for k, v in source.items()),
        "max_error_rate=1.0",
        *(f"stages.face.{r}" for r in MODEL_ON_CPU),
        "stages.face.params.imgsz=128",
    )
    keys = identity_manifest(source, ".").column("key").to_pylist()
    assert len(keys) == 6  # 2 samples x 2 kept identities, 1 under the minimum, 1 broken row
    status = shards.status(str(out))["faceid"]
    assert (status["written"], status["quarantined"], status["filtered"]) == (0, 1, 5)
    records = shards.read_quarantine(str(out), "faceid").to_pylist()
    assert sorted(r["key"] for r in records) == sorted(keys)  # each key once
    reasons = [(r["stage"], r["kind"], r["error"], r["message"]) for r in records]
    assert sorted(reasons)[:2] == [
        (
            "decode",
            "error",
            "BadManifestRow",
            f"{manifest_path} line 11: uri '' is empty or not a string",
        ),
        (
            "decode",
            "filtered",
            "TooFewImages",
            f"identity {third} has 2 images, fewer than min_images=4",
        ),
    ]
    for stage, kind, error, message in sorted(reasons)[2:]:  # random weights: "faces" everywhere
        assert (stage, kind, error) == ("face", "filtered", "ManyFaces")
        assert message.startswith("view 0: ") and "faces with score > conf=0.5" in message
    assert shards.verify(str(out)).ok


def _demo_photos(cache: Path) -> dict[str, list[str]]:
    """The demo identities' photos (4 each at 128 px), by identity."""
    table = pq.read_table(demo_identity_photos(str(cache), 4, 128)).to_pylist()
    photos: dict[str, list[str]] = {}
    for row in table:
        photos.setdefault(row["identity"], []).append(row["uri"])
    return photos
