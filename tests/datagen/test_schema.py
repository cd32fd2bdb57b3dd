"""datagen.schema: the sample contract, colour tags, palette and task tokens."""

from __future__ import annotations

import json
import re

import pytest

from datagen.schema import (
    COMMON_META_KEYS,
    MAP_TASKS,
    PALETTE,
    SAMPLE_KINDS,
    SCHEMA_VERSION,
    SUBSETS,
    TASK_FAMILIES,
    TASK_LABELS,
    TASKS,
    SchemaError,
    color_tag,
    describe,
    image_marker,
    make_meta,
    palette_rgb,
    validate_key,
    validate_sample,
)

META_VALUES = {
    "caption": "a cat on a mat",
    "width": 640,
    "height": 480,
    "degradations": {"blur": {"kind": "gaussian", "sigma": 2.0}},
    "entities": [{"label": "cat", "color": "red", "boxes": [[1, 2, 3, 4]]}],
    "entities_dropped": ["dog"],
    "segment_model": "grounding-dino-base+sam_vit_h_4b8939.pth",
    "depth_model": "depth-anything-v2-small",
    "depth_min": 0.1,
    "depth_max": 3.5,
    "people": [],
    "pose_model": "yolo11x.pt+vitpose-base-simple",
    "scene": "scene_0001",
    "captions": ["view zero", "view one"],
    "num_views": 2,
    "identity": "person_17",
    "frames": [0, 4],
    "camera_scale": 0.25,
}


def _sample(
    subset: str, key: str = "sample_0001", views: int = 2, meta: dict | None = None
) -> dict:
    """A well-formed sample: every field of the subset, metadata from make_meta."""
    spec = SUBSETS[subset]
    sample: dict[str, object] = {"__key__": key}
    for field in spec.fields:
        if field.name == "json":
            continue
        if field.per_view:
            for i in range(views):
                sample[field.name.replace("{i}", str(i))] = f"{field.name} view {i}".encode()
        else:
            sample[field.name] = f"bytes of {field.name}".encode()
    fields = make_meta(
        key, subset, "unit-test", list(spec.tasks), **{k: META_VALUES[k] for k in spec.meta_keys}
    )
    fields.update(meta or {})
    sample["json"] = json.dumps(fields).encode("utf-8")
    return sample


def _rejects(subset: str, sample: dict, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        validate_sample(subset, sample)


# --- accepted ----------------------------------------------------------------------------


@pytest.mark.parametrize("subset", sorted(SUBSETS))
def test_well_formed_sample_of_each_subset_is_accepted(subset):
    sample = _sample(subset)
    meta = validate_sample(subset, sample)
    assert meta["key"] == "sample_0001"
    assert meta["subset"] == subset
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["tasks"] == list(SUBSETS[subset].tasks)
    for k in SUBSETS[subset].meta_keys:
        assert meta[k] == META_VALUES[k]


def test_handwritten_t2i_sample():
    meta = make_meta(
        "cat_01", "t2i", "folder", ["[[text2image]]"], caption="a cat", width=3, height=2
    )
    sample = {
        "__key__": "cat_01",
        "__url__": "shard-000000.tar",  # webdataset's own fields are ignored
        "jpg": b"\xff\xd8\xff fake jpeg",
        "txt": bytearray(b"a cat"),
        "json": memoryview(json.dumps(meta).encode()),
    }
    assert validate_sample("t2i", sample)["caption"] == "a cat"


def test_multiview_with_many_views_and_a_task_subset():
    assert validate_sample("multiview", _sample("multiview", views=6))["num_views"] == 2
    i2i = _sample("i2i", meta={"tasks": ["[[deblurring]]"]})
    assert validate_sample("i2i", i2i)["tasks"] == ["[[deblurring]]"]


def test_compatible_minor_version_is_accepted():
    major = SCHEMA_VERSION.split(".")[0]
    sample = _sample("t2i", meta={"schema_version": f"{major}.99"})
    assert validate_sample("t2i", sample)["schema_version"] == f"{major}.99"


def test_make_meta_common_keys():
    meta = make_meta("k", "depth", "src", ["[[depth2image]]"], depth_model="m")
    assert set(COMMON_META_KEYS) <= set(meta)
    assert meta == {
        "key": "k",
        "subset": "depth",
        "schema_version": SCHEMA_VERSION,
        "source": "src",
        "tasks": ["[[depth2image]]"],
        "depth_model": "m",
    }


# --- rejected ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["has.dot", "cat.jpg", "", "a b", "é", "x" * 201, None, 17])
def test_bad_keys_are_rejected(key):
    with pytest.raises(SchemaError, match="invalid sample key"):
        validate_key(key)
    sample = _sample("t2i")
    sample["__key__"] = key
    _rejects("t2i", sample, "invalid sample key")


def test_good_keys():
    for key in ("a", "A-b_9", "x" * 200, "demo_000001"):
        validate_key(key)


@pytest.mark.parametrize(
    ("subset", "field"),
    [(s, f.name) for s in sorted(SUBSETS) for f in SUBSETS[s].fields if not f.per_view],
)
def test_missing_required_field(subset, field):
    sample = _sample(subset)
    del sample[field]
    _rejects(subset, sample, f"missing required field '{field}'")


def test_unknown_field():
    sample = _sample("t2i")
    sample["depth.png"] = b"not a t2i field"
    _rejects("t2i", sample, "'depth.png' is not part of subset 't2i'")
    sample = _sample("depth")
    sample["img0.jpg"] = b"per-view field of another subset"
    _rejects("depth", sample, "'img0.jpg' is not part of subset 'depth'")


@pytest.mark.parametrize("value", [b"", bytearray(), "a str, not bytes", None, 5])
def test_empty_or_non_bytes_field(value):
    sample = _sample("depth")
    sample["depth.png"] = value
    _rejects("depth", sample, "'depth.png' is empty or not bytes")


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe\x00", b'{"key": "sample_0001"'])
def test_json_that_does_not_parse(payload):
    sample = _sample("t2i")
    sample["json"] = payload
    _rejects("t2i", sample, "json metadata does not parse")


def test_json_not_an_object():
    sample = _sample("t2i")
    sample["json"] = b'["key", "subset"]'
    _rejects("t2i", sample, "must be an object")


@pytest.mark.parametrize("subset", sorted(SUBSETS))
def test_json_missing_a_meta_key(subset):
    for dropped in COMMON_META_KEYS + SUBSETS[subset].meta_keys:
        sample = _sample(subset)
        meta = json.loads(sample["json"])
        del meta[dropped]
        sample["json"] = json.dumps(meta).encode()
        _rejects(subset, sample, f"lacks \\['{dropped}'\\]")


def test_wrong_key_in_json():
    _rejects("t2i", _sample("t2i", meta={"key": "sample_0002"}), "does not match")


def test_wrong_subset():
    # the json says depth, the sample is checked as t2i
    depth_meta = _sample("t2i", meta={"subset": "depth"})
    _rejects("t2i", depth_meta, "json subset 'depth' is not 't2i'")
    # a sample of one subset checked against another: its fields already disagree
    _rejects("t2i", _sample("depth"), "not part of subset 't2i'")
    _rejects("nope", _sample("t2i"), "unknown subset 'nope'")


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.0", "2"])
def test_incompatible_schema_version(version):
    _rejects("t2i", _sample("t2i", meta={"schema_version": version}), "is incompatible with")


@pytest.mark.parametrize(
    ("subset", "tasks"),
    [
        ("t2i", ["[[text2imag]]"]),
        ("t2i", ["[[text2image]]", "[[depth2image]]"]),
        ("depth", ["[[text2image]]"]),
        ("i2i", ["[[deblurring]]", "[[nonsense]]"]),
        ("t2i", []),
    ],
)
def test_unknown_or_foreign_task(subset, tasks):
    _rejects(subset, _sample(subset, meta={"tasks": tasks}), "must be a non-empty subset")


@pytest.mark.parametrize("subset", ["multiview", "faceid"])
def test_multi_image_subsets_need_two_views(subset):
    _rejects(
        subset, _sample(subset, views=1), re.escape("needs at least 2 views of 'img{i}.jpg', got 1")
    )
    _rejects(subset, _sample(subset, views=0), "got 0")


@pytest.mark.parametrize("subset", ["multiview", "faceid"])
def test_views_must_be_numbered_from_zero(subset):
    sample = _sample(subset, views=3)
    del sample["img1.jpg"]  # views 0 and 2
    _rejects(subset, sample, r"not numbered 0..n-1: \[0, 2\]")
    sample = _sample(subset, views=3)
    del sample["img0.jpg"]  # views 1 and 2
    _rejects(subset, sample, r"not numbered 0..n-1: \[1, 2\]")


# --- tokens, palette, tags ---------------------------------------------------------------


def test_color_tag_format():
    assert color_tag("yellow", "mask", "mouse") == "<#FFFF00 yellow mask: mouse>"
    assert color_tag("cyan", "boundingbox", "moon") == "<#00FFFF cyan boundingbox: moon>"
    assert color_tag("red", "mask", "a red car") == "<#FF0000 red mask: a red car>"


def test_color_tag_rejects_unknown_colour_and_kind():
    with pytest.raises(ValueError, match="not in the palette"):
        color_tag("chartreuse", "mask", "x")
    with pytest.raises(ValueError, match="not in the palette"):
        color_tag("#FFFF00", "mask", "x")
    with pytest.raises(ValueError, match="tag kind"):
        color_tag("red", "box", "x")


def test_palette_released_order():
    assert len(PALETTE) == 20
    assert [name for _, name in PALETTE] == [
        "red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "brown",
        "green", "pink", "teal", "darkorange", "blueviolet", "darkgreen", "orangered",
        "navy", "gold", "turquoise", "orchid",
    ]  # fmt: skip
    assert PALETTE[0] == ("#FF0000", "red")
    assert len({h for h, _ in PALETTE}) == 20
    for hexcode, name in PALETTE:
        assert len(hexcode) == 7 and hexcode[0] == "#"
        assert hexcode == hexcode.upper()
        assert color_tag(name, "mask", "x").startswith(f"<{hexcode} {name} ")


def test_palette_rgb():
    assert palette_rgb(0) == (255, 0, 0)
    assert palette_rgb(1) == (0, 255, 0)
    assert palette_rgb(6) == (255, 165, 0)  # orange
    assert palette_rgb(19) == (0xDA, 0x70, 0xD6)
    assert palette_rgb(20) == palette_rgb(0)  # wraps round
    for i, (hexcode, _) in enumerate(PALETTE):
        assert "#{:02X}{:02X}{:02X}".format(*palette_rgb(i)) == hexcode


def test_task_labels_spelled_as_released():
    assert TASK_LABELS == (
        "[[text2image]]",
        "[[deblurring]]",
        "[[image_inpainting]]",
        "[[canny2image]]",
        "[[depth2image]]",
        "[[hed2img]]",
        "[[pose2image]]",
        "[[semanticmap2image]]",
        "[[boundingbox2image]]",
        "[[image_editing]]",
        "[[faceid]]",
        "[[multiview]]",
        "[[subject_driven]]",
    )
    assert set(TASK_LABELS) >= MAP_TASKS
    for subset in SUBSETS.values():
        assert set(subset.tasks) <= set(TASK_LABELS), subset.name


def test_tasks_table_declares_every_token_and_each_subset_its_kind_and_family():
    assert tuple(TASKS) == TASK_LABELS
    assert all(token == task.token for token, task in TASKS.items())
    assert {token for token, task in TASKS.items() if task.reversible} == MAP_TASKS
    assert {t.name: t.map_name for t in TASKS.values() if t.reversible} == {
        "canny2image": "canny",
        "depth2image": "depth",
        "hed2img": "hed",
        "pose2image": "pose",
        "semanticmap2image": "semanticmap",
        "boundingbox2image": "boundingbox",
    }
    assert {t.token: t.tag_kind for t in TASKS.values() if t.tag_kind} == {
        "[[semanticmap2image]]": "mask",
        "[[boundingbox2image]]": "boundingbox",
    }
    # released tokens no subset trains yet have no layout
    assert {t for t, task in TASKS.items() if task.layout is None} == {
        "[[image_editing]]",
        "[[subject_driven]]",
    }
    assert {s.name: (s.kind, s.family) for s in SUBSETS.values()} == {
        "t2i": ("single", "text2image"),
        "i2i": ("pair", "image2image"),
        "semantic": ("pair", "image2image"),
        "depth": ("pair", "image2image"),
        "pose": ("pair", "image2image"),
        "multiview": ("multiview", "multiview_id"),
        "faceid": ("faceid", "multiview_id"),
    }
    assert {s.kind for s in SUBSETS.values()} == set(SAMPLE_KINDS)
    assert {s.family for s in SUBSETS.values()} == set(TASK_FAMILIES)
    for subset in SUBSETS.values():  # every task reads fields its subset stores
        for token in subset.tasks:
            assert set(TASKS[token].fields) <= set(subset.field_names()), (subset.name, token)


@pytest.mark.parametrize("tasks", [7, "[[text2image]]", None])
def test_tasks_that_are_not_a_list_are_a_schema_error(tasks):
    _rejects("t2i", _sample("t2i", meta={"tasks": tasks}), "tasks must be a list")


def test_image_marker():
    assert image_marker(0) == "[[img0]]"
    assert image_marker(12) == "[[img12]]"
    with pytest.raises(ValueError):
        image_marker(-1)


def test_describe_is_plain_json():
    d = json.loads(json.dumps(describe()))
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["task_labels"] == list(TASK_LABELS)
    assert d["palette"][0] == {"hex": "#FF0000", "name": "red"}
    assert set(d["subsets"]) == set(SUBSETS)
    assert d["subsets"]["multiview"]["min_views"] == 2
    assert "img{i}.jpg" in d["subsets"]["faceid"]["fields"]
    assert d["subsets"]["t2i"]["meta_keys"] == [*COMMON_META_KEYS, "caption", "width", "height"]


@pytest.mark.parametrize("subset", ["multiview", "faceid"])
def test_view_numbers_are_written_without_leading_zeros(subset):
    # img01.jpg is not img{1}.jpg: a reader looking for img1.jpg would not find it
    sample = _sample(subset, views=1)
    sample["img01.jpg"] = b"view one, misnamed"
    _rejects(subset, sample, "'img01.jpg' is not part of subset")
    sample = _sample(subset, views=2)
    sample["img00.jpg"] = b"a second view zero"
    _rejects(subset, sample, "'img00.jpg' is not part of subset")
    assert validate_sample(subset, _sample(subset, views=12))["num_views"] == 2  # img10, img11 fine
