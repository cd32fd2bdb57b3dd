"""The caption stage on real photographs with the tiny random VLM (mechanics only: its
captions are word salad): what it stores, the source caption kept beside the VLM's,
typed failures, parameters checked, and the production loading path from a folder
saved in the real format."""

from __future__ import annotations

import cv2
import pytest
from skimage import data as skdata

from datagen.images import encode_jpeg
from datagen.params import ParamError
from datagen.stages.caption import CaptionParams, CaptionStage
from datagen.stages.entities import parse_entities
from datagen.stages.models.common import RANDOM_TINY
from datagen.stages.protocol import ERROR, FILTERED, OK, meta_column, status_column
from datagen.stages.runner import run_stage

PHOTOS = {
    "astronaut": cv2.resize(skdata.astronaut(), (96, 96), interpolation=cv2.INTER_AREA),
    "coffee": cv2.resize(skdata.coffee(), (120, 80), interpolation=cv2.INTER_AREA),
    "chelsea": cv2.resize(skdata.chelsea(), (90, 60), interpolation=cv2.INTER_AREA),
}
JPGS = {k: encode_jpeg(v) for k, v in PHOTOS.items()}
FAST = {"max_new_tokens": 24, "entity_max_new_tokens": 16, "device": "cpu", "min_words": 1}


def _stage(weights: str = RANDOM_TINY, **kw) -> CaptionStage:
    stage = CaptionStage(CaptionParams(weights=weights, **{**FAST, **kw}))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def tiny() -> CaptionStage:
    return _stage()


def _batch(captions: dict[str, str | None]) -> dict[str, list]:
    keys = list(captions)
    return {"key": keys, "jpg": [JPGS[k] for k in keys], "caption": list(captions.values())}


def test_captions_photos_and_keeps_the_source_caption(tiny):
    batch = _batch({"astronaut": "an astronaut", "coffee": None, "chelsea": ""})
    out = tiny(batch)
    assert out["failure"] == [None, None, None]
    for i in range(len(batch["key"])):
        meta, txt = out["meta"][i], out["txt"][i]
        assert isinstance(txt, bytes) and txt.decode() == meta["caption"]
        assert meta["caption"] and meta["caption"] == " ".join(meta["caption"].split())
        assert meta["caption_model"] == RANDOM_TINY
        names = meta["entity_names"]
        assert isinstance(names, list) and len(names) <= 10
        assert all(isinstance(n, str) and parse_entities(n) == [n] for n in names)
    assert out["meta"][0]["source_caption"] == "an astronaut"
    assert "source_caption" not in out["meta"][1] and "source_caption" not in out["meta"][2]
    assert tiny(batch)["meta"] == out["meta"]  # greedy: reruns reproduce


def test_caption_depends_on_the_image_not_on_the_batch(tiny):
    both = tiny(_batch({"astronaut": None, "coffee": None}))
    alone = tiny(_batch({"coffee": None}))
    assert both["meta"][1] == alone["meta"][0]


def test_short_caption_is_filtered_and_bad_jpg_fails_its_row_only(tiny):
    stage = _stage(min_words=10_000)
    out = stage(_batch({"astronaut": None}))
    failure = out["failure"][0]
    assert (failure.kind, failure.error) == (FILTERED, "ShortCaption")
    batch = _batch({"astronaut": None, "coffee": None})
    batch["jpg"][0] = b"\xff\xd8\xffnot a jpeg"
    out = run_stage(tiny, batch, name="caption", needs=())
    assert out[status_column("caption")] == [ERROR, OK]
    assert out["caption.error"][0] == "UndecodableJpg"
    assert out[meta_column("caption")][1]


def test_no_entity_prompt_no_entity_list():
    stage = _stage(entity_prompt=None)
    meta = stage(_batch({"coffee": None}))["meta"][0]
    assert "entity_names" not in meta and meta["caption"]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("max_new_tokens", 0, "max_new_tokens: must be >= 1"),
        ("micro_batch", 0, "micro_batch: must be >= 1"),
        ("prompt", "  ", "prompt: must not be empty"),
        ("entity_prompt", "", "entity_prompt: must not be empty"),
        ("max_image_tokens", 0, "max_image_tokens"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
    ],
)
def test_params_are_checked(key, value, match):
    with pytest.raises(ParamError, match=match):
        CaptionParams(**{key: value})


def test_loads_a_saved_folder_like_random_tiny(tmp_path, tiny):
    from datagen.stages.models.tiny.caption import save_tiny

    folder = save_tiny(tmp_path / "vlm")
    assert (folder / "model.safetensors").is_file()
    from_folder = _stage(str(folder))
    batch = _batch({"astronaut": "x", "chelsea": None})
    got, want = from_folder(batch)["meta"], tiny(batch)["meta"]
    for g, w in zip(got, want, strict=True):
        assert g["caption_model"] == "vlm"
        assert {**g, "caption_model": RANDOM_TINY} == w


def test_missing_weights_name_the_path(tmp_path):
    stage = CaptionStage(CaptionParams(weights=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="nope"):
        stage.setup()
