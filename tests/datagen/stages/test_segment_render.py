"""What the segment stage draws and records, without a model: hand-made masks and boxes
give exactly the expected pixels and tags; entity colours are distinct per sample,
random across samples and stable across reruns; RLE round-trips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datagen.schema import PALETTE, palette_rgb
from datagen.stages.segment_render import (
    Entity,
    box_thickness,
    entity_colours,
    entity_record,
    mask_to_rle,
    render_boxes,
    render_semantic,
    rle_to_mask,
)

W, H = 40, 30


def _entity(label: str, colour: int, mask: np.ndarray, boxes=((0, 0, 1, 1),)) -> Entity:
    return Entity(label, colour, np.array(boxes, np.float32), np.full(len(boxes), 0.5), mask)


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_semantic_map_exact_pixels_small_on_top_of_large():
    big, small = _rect(0, 0, 30, 20), _rect(5, 5, 10, 10)
    # the small entity listed first: it must still be on top (larger masks painted first)
    image = render_semantic([_entity("cup", 3, small), _entity("table", 0, big)], W, H)
    expected = np.zeros((H, W, 3), np.uint8)
    expected[big] = palette_rgb(0)
    expected[small] = palette_rgb(3)
    np.testing.assert_array_equal(image, expected)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert (image[~big] == 0).all()  # black background


def test_box_map_exact_outline():
    e = _entity("dog", 5, _rect(0, 0, 1, 1), boxes=[(4.4, 6.6, 20.5, 25.2)])
    image = render_boxes([e], W, H)
    t = box_thickness(W, H)
    expected = np.zeros((H, W, 3), np.uint8)
    cv2.rectangle(expected, (4, 7), (20, 25), palette_rgb(5), t)
    np.testing.assert_array_equal(image, expected)
    # an outline, not a fill: the inside stays black, the edge has the colour
    assert (image[15, 12] == 0).all()
    assert tuple(image[15, 4]) == palette_rgb(5)
    assert set(map(tuple, image.reshape(-1, 3))) == {(0, 0, 0), palette_rgb(5)}


def test_entity_record_tags_as_the_released_code_spells_them():
    mask = _rect(2, 2, 8, 8)
    rec = entity_record(_entity("dog", PALETTE.index(("#FFFF00", "yellow")), mask))
    assert rec["mask_tag"] == "<#FFFF00 yellow mask: dog>"
    assert rec["box_tag"] == "<#FFFF00 yellow boundingbox: dog>"
    assert rec["color"] == "yellow" and rec["hex"] == "#FFFF00"
    np.testing.assert_array_equal(rle_to_mask(rec["mask"]), mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_rle_round_trips(seed):
    rng = np.random.default_rng(seed)
    for mask in (
        rng.random((H, W)) < 0.3,
        np.zeros((H, W), bool),
        np.ones((H, W), bool),
        _rect(0, 0, 1, 1),
    ):
        rle = mask_to_rle(mask)
        assert rle["size"] == [H, W]
        assert sum(rle["counts"]) == H * W
        np.testing.assert_array_equal(rle_to_mask(rle), mask)


def test_rle_is_coco_column_major():
    mask = np.array([[0, 1], [0, 1]], bool)  # column-major: 0 0 1 1
    assert mask_to_rle(mask)["counts"] == [2, 2]
    assert mask_to_rle(np.array([[1, 0], [1, 0]], bool))["counts"] == [0, 2, 2]


def test_colours_distinct_stable_and_random():
    for key in ("a", "b", "img_000123"):
        colours = entity_colours(key, 0, 10)
        assert len(set(colours)) == 10  # distinct within a sample
        assert colours == entity_colours(key, 0, 10)  # stable across reruns
        assert entity_colours(key, 0, 3) == colours[:3]  # a prefix of the same draw
    firsts = {entity_colours(f"key{i}", 0, 1)[0] for i in range(200)}
    assert len(firsts) >= 15  # the first entity is not always red
    assert entity_colours("a", 0, 5) != entity_colours("a", 1, 5)  # the seed matters
    assert len(set(entity_colours("a", 0, len(PALETTE)))) == len(PALETTE)
    with pytest.raises(ValueError, match="palette"):
        entity_colours("a", 0, len(PALETTE) + 1)
