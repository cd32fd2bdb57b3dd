"""The segment stage (grounded SAM) on real photographs with tiny random models
(mechanics only: boxes and masks are meaningless): the maps it draws agree exactly with
the entities it records, colours are distinct and stable, rows without entities are
filtered, and the production loading path reads checkpoints saved in the real formats."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from datagen.images import encode_jpeg
from datagen.params import ParamError
from datagen.schema import PALETTE, make_meta, palette_rgb, validate_sample
from datagen.stages.models.common import RANDOM_TINY
from datagen.stages.protocol import ERROR, FILTERED
from datagen.stages.segment import SegmentParams, SegmentStage
from datagen.stages.segment_render import (
    Entity,
    entity_colours,
    render_boxes,
    render_semantic,
    rle_to_mask,
)

PHOTOS = {
    "astronaut": cv2.resize(skdata.astronaut(), (96, 96), interpolation=cv2.INTER_AREA),
    "coffee": cv2.resize(skdata.coffee(), (120, 80), interpolation=cv2.INTER_AREA),
    "chelsea": cv2.resize(skdata.chelsea(), (90, 60), interpolation=cv2.INTER_AREA),
}
JPGS = {k: encode_jpeg(v) for k, v in PHOTOS.items()}
NAMES = {
    "astronaut": ["person", "flag", "white suit"],
    "coffee": ["cup", "saucer"],
    "chelsea": ["cat"],
}


def _stage(detector: str = RANDOM_TINY, sam: str = RANDOM_TINY, **kw) -> SegmentStage:
    stage = SegmentStage(SegmentParams(detector_weights=detector, weights=sam, device="cpu", **kw))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def tiny() -> SegmentStage:
    return _stage()


def _batch(names: dict[str, list[str] | None]) -> dict[str, list]:
    keys = list(names)
    return {"key": keys, "jpg": [JPGS[k] for k in keys], "entity_names": list(names.values())}


def _png(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), 4)


def test_maps_agree_exactly_with_the_recorded_entities(tiny):
    out = tiny(_batch(NAMES))
    assert out["failure"] == [None, None, None]
    for i, key in enumerate(NAMES):
        h, w = PHOTOS[key].shape[:2]
        meta = out["meta"][i]
        entities = meta["entities"]
        labels = [e["label"] for e in entities]
        # every entity asked for is either found or listed as dropped, in order
        assert sorted(labels + meta["entities_dropped"]) == sorted(NAMES[key])
        assert labels == [n for n in NAMES[key] if n in labels]
        colours = [PALETTE.index((e["hex"], e["color"])) for e in entities]
        assert colours == entity_colours(key, 0, len(entities))  # random, from key and seed
        assert len(set(colours)) == len(colours)
        rebuilt = [
            Entity(
                e["label"],
                c,
                np.array(e["boxes"], np.float32),
                np.array(e["scores"]),
                rle_to_mask(e["mask"]),
            )
            for e, c in zip(entities, colours, strict=True)
        ]
        semantic, boxes = _png(out["semantic_png"][i]), _png(out["boxes_png"][i])
        assert semantic.shape == boxes.shape == (h, w, 3)
        # the images are exactly what the metadata says (PNG is lossless)
        np.testing.assert_array_equal(semantic, render_semantic(rebuilt, w, h))
        np.testing.assert_array_equal(boxes, render_boxes(rebuilt, w, h))
        allowed = {(0, 0, 0), *(palette_rgb(c) for c in colours)}
        assert set(map(tuple, semantic.reshape(-1, 3))) <= allowed
        for e, c in zip(entities, colours, strict=True):
            assert e["mask_tag"] == f"<{PALETTE[c][0]} {PALETTE[c][1]} mask: {e['label']}>"
            assert e["box_tag"] == f"<{PALETTE[c][0]} {PALETTE[c][1]} boundingbox: {e['label']}>"
            assert 1 <= len(e["boxes"]) == len(e["scores"]) <= 3
            for x0, y0, x1, y1 in e["boxes"]:
                assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert all(0 <= s <= 1 for s in e["scores"])
        assert meta["segment_model"] == "random-tiny+random-tiny"
        sample_meta = make_meta(
            key, "semantic", "x", ["[[semanticmap2image]]"], caption="c", width=w, height=h
        )
        files = {
            "jpg": JPGS[key],
            "semantic.png": out["semantic_png"][i],
            "boxes.png": out["boxes_png"][i],
            "json": json.dumps({**sample_meta, **meta}).encode(),
        }
        validate_sample("semantic", {"__key__": key, **files})


def test_stable_across_reruns_and_batches(tiny):
    batch = _batch(NAMES)
    first, again = tiny(batch), tiny(batch)
    assert first["meta"] == again["meta"] and first["semantic_png"] == again["semantic_png"]
    alone = tiny(_batch({"coffee": NAMES["coffee"]}))
    assert alone["meta"][0] == first["meta"][1]
    assert alone["boxes_png"][0] == first["boxes_png"][1]


def test_rows_without_entities_are_filtered(tiny):
    out = tiny(_batch({"astronaut": [], "coffee": None, "chelsea": ["cat"]}))
    kinds = [(f.kind, f.error) if f else None for f in out["failure"]]
    assert kinds == [(FILTERED, "NoEntities"), (ERROR, "NoEntityList"), None]
    strict = _stage(box_threshold=0.99)
    failure = strict(_batch({"chelsea": ["cat", "sofa"]}))["failure"][0]
    assert (failure.kind, failure.error) == (FILTERED, "NoEntityFound")
    assert "'cat', 'sofa'" in failure.message


def test_params_are_checked():
    with pytest.raises(ParamError, match="box_threshold"):
        SegmentParams(box_threshold=1.5)
    with pytest.raises(ParamError, match="max_per_entity"):
        SegmentParams(max_per_entity=0)


def test_loads_checkpoints_saved_in_the_real_formats(tmp_path, tiny):
    from datagen.stages.models.tiny.grounding import save_tiny_grounder
    from datagen.stages.models.tiny.sam import save_tiny_sam

    folder = save_tiny_grounder(tmp_path / "grounding-dino")
    sam = save_tiny_sam(tmp_path / "sam_tiny.pth")
    assert (folder / "model.safetensors").is_file() and sam.is_file()
    real = _stage(str(folder), str(sam))
    batch = _batch(NAMES)
    got, want = real(batch), tiny(batch)
    assert got["semantic_png"] == want["semantic_png"] and got["boxes_png"] == want["boxes_png"]
    for g, w in zip(got["meta"], want["meta"], strict=True):
        assert g["segment_model"] == "grounding-dino+sam_tiny.pth"
        assert {**g, "segment_model": w["segment_model"]} == w


@pytest.mark.parametrize("which", ["detector_weights", "weights"])
def test_missing_weights_name_the_path(tmp_path, which):
    stage = SegmentStage(
        SegmentParams(
            **{
                "detector_weights": RANDOM_TINY,
                "weights": RANDOM_TINY,
                which: str(tmp_path / "nope"),
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        stage.setup()
