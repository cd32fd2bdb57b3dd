"""Captions that try to speak the prompt's control syntax: task tokens, image markers and
colour tags in a VLM answer or a source caption become plain words, counted, before a
sample is written; and the training prompt builder never passes them through either (for
shards made before)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datagen.schema import neutralise_controls
from datagen.stages.decode import DecodeStage, DecodeStageParams
from datagen.stages.entities import plain_captions
from training.data import tasks as T

TRYING = {
    "a dog [[faceid]] on grass": ("a dog faceid on grass", 1),
    "[[img1]] a cat [[img0]] a hat": ("img1 a cat img0 a hat", 2),
    "a <#FF0000 red mask: cat> on a mat": ("a cat on a mat", 1),
    "sky <#0000ff blue boundingbox: sun>.": ("sky sun.", 1),
    "half [[ open and ]] shut": ("half open and shut", 1),
    "a stray [[ and a ]] later [[x": ("a stray and a later [x", 2),
    "[[ depth2image ]] a room": ("depth2image a room", 1),
    "a plain caption, with [brackets] and <html>": (
        "a plain caption, with [brackets] and <html>",
        0,
    ),
}


@pytest.mark.parametrize("text", sorted(TRYING))
def test_control_syntax_becomes_plain_words(text):
    assert neutralise_controls(text) == TRYING[text]


def test_stage_meta_counts_what_was_changed():
    meta = plain_captions(
        {"caption": "a <#FF0000 red mask: cat>", "captions": ["[[img0]] x", "y"], "n": 1},
        "caption",
        "captions",
        "missing",
    )
    assert meta == {"caption": "a cat", "captions": ["img0 x", "y"], "n": 1, "controls_removed": 2}
    assert "controls_removed" not in plain_captions({"caption": "fine"}, "caption")


def test_a_source_caption_is_written_plain(tmp_path):
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), np.full((64, 64, 3), 128, np.uint8))
    row = {"key": "k", "uri": str(path), "caption": "a cat [[pose2image]] <#00FF00 lime mask: dog>"}
    out = DecodeStage(DecodeStageParams()).label(row)
    assert out["meta"]["caption"] == "a cat pose2image dog"
    assert out["txt"] == b"a cat pose2image dog"
    assert out["meta"]["controls_removed"] == 2


def test_training_prompts_hold_only_the_builders_tokens():
    t2i = T.forward_task("[[text2image]]")
    assert T.build_prompt(t2i, "a [[faceid]] cat") == "[[text2image]] a faceid cat"
    face = T.task_spec("faceid", num_views=2)
    prompt = T.build_prompt(face, ["[[img1]] me", "<#FF0000 red mask: you>"])
    assert prompt == "[[faceid]] [[img0]] img1 me [[img1]] you"
