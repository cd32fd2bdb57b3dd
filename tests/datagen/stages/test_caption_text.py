"""The VLM answer parsers: entity lists in every layout models produce, and caption
clean-up. Pure text, no model."""

from __future__ import annotations

import pytest

from datagen.stages.entities import MAX_ENTITIES, clean_caption, parse_entities

MESSY = [
    ("1. A dog\n2. A red ball\n3. the sky", ["dog", "red ball", "sky"]),
    ("1) man 2) woman 3) child", ["man", "woman", "child"]),
    ("- dog\n- cat\n* tree", ["dog", "cat", "tree"]),
    ("\u2022 lamp\n\u2022 sofa", ["lamp", "sofa"]),
    ("dog, cat, tree", ["dog", "cat", "tree"]),
    ("dog; cat; bird\n1. fish", ["dog", "cat", "bird", "fish"]),
    ("dog. cat. tree.", ["dog", "cat", "tree"]),
    ("Entities: a dog and a cat.", ["dog", "cat"]),
    ("Here are the entities: dog; cat; grass.", ["dog", "cat", "grass"]),
    ("The main objects in the image are: a boat, water and trees.", ["boat", "water", "trees"]),
    ('"person", "bicycle"', ["person", "bicycle"]),
    ("a red car (parked)", ["red car"]),
    ("dog, cat, Dog, DOG., the dog", ["dog", "cat"]),  # duplicates, any case or article
    ("", []),
    ("   \n  ", []),
    ("none", []),
    ("N/A", []),
    ("1.\n2.\n3.", []),  # numbering without items
    # a sentence is not an entity; the phrase after it is
    ("The image shows a very long sentence that is not an entity, dog", ["dog"]),
    ("cat <script>, a:b", ["cat script", "a b"]),  # no tag-breaking characters survive
]


@pytest.mark.parametrize(("text", "expected"), MESSY)
def test_messy_entity_lists(text, expected):
    assert parse_entities(text) == expected


def test_more_than_ten_keeps_the_first_ten_in_order():
    text = "\n".join(f"{i}. thing{i}" for i in range(1, 16))
    got = parse_entities(text)
    assert got == [f"thing{i}" for i in range(1, MAX_ENTITIES + 1)]
    assert parse_entities(text, limit=3) == ["thing1", "thing2", "thing3"]
    assert parse_entities(text, limit=0) == []


def test_entities_are_safe_detector_phrases_and_tag_labels():
    text = "Dog!!, >cat<, red:ball, wolf's den, x" * 3
    for item in parse_entities(text):
        assert item == item.lower().strip()
        assert set(item) <= set("abcdefghijklmnopqrstuvwxyz0123456789 '-")
        assert "." not in item and ">" not in item and ":" not in item


def test_clean_caption():
    assert clean_caption("  A dog\n on   grass. ") == "A dog on grass."
    # cut back to the last full sentence when generation stopped mid-sentence
    assert clean_caption("A dog sits. It is brown and the") == "A dog sits. It is brown and the"
    assert clean_caption("A dog sits on grass near a tree. It is") == (
        "A dog sits on grass near a tree."
    )
    assert clean_caption("") == ""
    assert clean_caption("no full stop at all") == "no full stop at all"
