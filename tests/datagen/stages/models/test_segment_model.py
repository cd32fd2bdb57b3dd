"""The segment labeler's models, models/grounding.py and models/sam.py with their random builds
in models/tiny/ (mechanics only: random weights, MEANINGLESS labels).

Grounding: prompt building, phrase token spans, NMS and phrase assignment on hand-made
tensors; the tiny random Grounding DINO on real photographs with different phrase lists
per image in one call (batched == one by one; why images are grouped by padded size);
the production loading path from a save_pretrained folder. SAM: masks per box at each
image's size, the batched encoder == one by one == segment_anything's own SamPredictor,
the production .pth path (weights_only: a pickled os.system is refused), and the
architecture read off a state dict for vit_b (built), vit_l and vit_h (meta device).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from common.boxes import box_iou
from datagen.stages.models.common import RANDOM_TINY, CheckpointError
from datagen.stages.models.grounding import (
    Detection,
    Grounder,
    build_prompt,
    clean_phrase,
    cxcywh_to_xyxy,
    nms,
    phrase_scores,
    phrase_token_spans,
    select_detections,
)
from datagen.stages.models.sam import Segmenter, read_sam_state_dict, sam_from_state_dict
from datagen.stages.models.sam_arch import SAM_ARCHS, build_sam, infer_sam_arch
from datagen.stages.models.tiny.grounding import grounder_processor, save_tiny_grounder, tiny_vocab
from datagen.stages.models.tiny.sam import TINY_SAM, random_sam, save_tiny_sam

THRESH = {"box_threshold": 0.35, "text_threshold": 0.25}


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


# padded input sizes: astronaut and camera 128 x 128, coffee and chelsea 128 x 192, rocket
# 128 x 256 (resized to 128 x 213)
PHOTOS = [
    _resize(skdata.astronaut(), 96, 96),
    _resize(skdata.coffee(), 150, 100),
    _resize(skdata.chelsea(), 113, 75),
    _resize(skdata.camera(), 80, 80),
    _resize(skdata.rocket(), 200, 120),
]
PHRASES = [
    ["astronaut", "red white striped flag", "space suit"],
    ["cup", "red saucer"],
    ["cat"],
    ["man", "camera", "grass", "tripod", "coat"],
    ["rocket", "sky", "tower"],
]


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder.load(RANDOM_TINY, device="cpu")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.load(RANDOM_TINY, device="cpu")


@pytest.fixture(scope="module")
def detections(grounder) -> list[list[Detection]]:
    return grounder.detect(PHOTOS, PHRASES, micro_batch=4, **THRESH)


def _same_detections(a: list[Detection], b: list[Detection]) -> None:
    assert [d.phrase for d in a] == [d.phrase for d in b]
    np.testing.assert_allclose([d.score for d in a], [d.score for d in b], atol=1e-5)
    np.testing.assert_allclose(
        np.array([d.box for d in a]).reshape(-1, 4),
        np.array([d.box for d in b]).reshape(-1, 4),
        atol=1e-3,
    )


# -- prompts and token spans (no model) --------------------------------------------------


def test_prompt_is_lowercase_phrases_each_ending_in_a_dot():
    prompt, spans = build_prompt(["Dog", "red  Ball", "", "what? no.", "  "])
    assert prompt == "dog. red ball. what no."
    assert spans == [(0, 3), (5, 13), None, (15, 22), None]
    for span, text in zip(spans, ["dog", "red ball", None, "what no", None], strict=True):
        assert (span is None and text is None) or prompt[span[0] : span[1]] == text
    assert clean_phrase(" A.B?c ") == "a b c"


def test_phrase_spans_from_the_tokenizer():
    tokenizer = grounder_processor(128, 213).tokenizer
    prompt, char_spans = build_prompt(["dog", "red ball", "zebrafish"])
    enc = tokenizer(prompt, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    spans = phrase_token_spans(enc["offset_mapping"], char_spans)
    assert [tokens[i] for i in spans[0]] == ["dog"]
    assert [tokens[i] for i in spans[1]] == ["red", "ball"]
    assert "".join(tokens[i] for i in spans[2]).replace("##", "") == "zebrafish"
    assert len(spans[2]) > 1  # a word split into pieces stays one phrase
    # the same spans as the runs between the "." delimiters (ids Grounding DINO splits at)
    ids = enc["input_ids"]
    dots = [i for i, t in enumerate(ids) if t == 1012]
    runs = [list(range(a + 1, b)) for a, b in zip([0, *dots[:-1]], dots, strict=True)]
    assert [s.tolist() for s in spans] == runs


def test_phrase_spans_handmade_offsets_padding_and_truncation():
    # "[CLS] dog . red ball . [SEP] [PAD] [PAD]" for "dog. red ball."
    offsets = [(0, 0), (0, 3), (3, 4), (5, 8), (9, 13), (13, 14), (0, 0), (0, 0), (0, 0)]
    spans = phrase_token_spans(offsets, [(0, 3), (5, 13), None], n_tokens=7)
    assert [s.tolist() for s in spans] == [[1], [3, 4], []]
    # truncated after "red": the second phrase lost its "." and is dropped, not half-scored
    cut = [(0, 0), (0, 3), (3, 4), (5, 8), (0, 0)]
    assert [s.tolist() for s in phrase_token_spans(cut, [(0, 3), (5, 13)])] == [[1], []]


def test_tiny_vocab_keeps_bert_special_ids():
    vocab = tiny_vocab()
    assert (vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"], vocab["."], vocab["?"]) == (
        0,
        101,
        102,
        1012,
        1029,
    )
    assert len(vocab) > 1300 and "dog" in vocab and "##z" in vocab


# -- NMS and phrase assignment (no model) -------------------------------------------------


def test_box_iou_and_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    iou = box_iou(boxes, boxes)
    assert iou[0, 1] == pytest.approx(81 / 119) and iou[0, 2] == 0 and iou[0, 3] == 1
    assert box_iou(np.array([[5, 5, 5, 5]]), np.array([[5, 5, 5, 5]]))[0, 0] == 0  # empty
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]  # 0 and 1 overlap 3
    assert nms(boxes, scores, 0.7).tolist() == [3, 1, 2]  # 1 overlaps 3 by 0.68 <= 0.7
    assert nms(boxes[:3], scores[:3], 0.7).tolist() == [0, 1, 2]
    assert nms(boxes[:3], scores[:3], 0.7, limit=2).tolist() == [0, 1]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def _probs(rows: list[dict[int, float]], n_tokens: int = 7) -> np.ndarray:
    probs = np.full((len(rows), n_tokens), 0.05, np.float32)
    for q, row in enumerate(rows):
        for t, p in row.items():
            probs[q, t] = p
    return probs


def test_select_assigns_thresholds_suppresses_caps_and_orders():
    # tokens: [CLS] dog . red ball . [SEP]  -> phrase 0 = [1], phrase 1 = [3, 4]
    spans = [np.array([1]), np.array([3, 4])]
    probs = _probs(
        [
            {1: 0.9},  # 0: dog
            {1: 0.8},  # 1: dog, overlaps 0 -> suppressed
            {3: 0.7, 4: 0.6},  # 2: red ball (mean 0.65)
            {1: 0.3},  # 3: dog but box score 0.3 < 0.35
            {1: 0.6},  # 4: dog, elsewhere
            {1: 0.5},  # 5: dog, elsewhere: beyond the per-phrase cap of 2
            {2: 0.99, 5: 0.99, 0: 0.99},  # 6: only delimiters / [CLS] fire: not a phrase
            {3: 0.9, 4: 0.1},  # 7: one strong word: mean 0.5 > text_threshold 0.25
            {3: 0.36, 4: 0.05},  # 8: box score 0.36 passes, mean 0.205 < 0.25
        ]
    )
    boxes = np.array(
        [
            [0, 0, 10, 10],
            [1, 1, 11, 11],
            [50, 50, 60, 60],
            [70, 70, 80, 80],
            [20, 0, 30, 10],
            [40, 0, 45, 10],
            [0, 50, 5, 60],
            [90, 90, 99, 99],
            [80, 0, 90, 5],
        ],
        float,
    )
    dets = select_detections(
        probs, boxes, spans, box_threshold=0.35, text_threshold=0.25, max_per_phrase=2, nms_iou=0.5
    )
    got = [(d.phrase, round(d.score, 4), d.box) for d in dets]
    assert got == [
        (0, 0.9, (0.0, 0.0, 10.0, 10.0)),
        (0, 0.6, (20.0, 0.0, 30.0, 10.0)),
        (1, 0.65, (50.0, 50.0, 60.0, 60.0)),
        (1, 0.5, (90.0, 90.0, 99.0, 99.0)),
    ]


def test_mean_score_tells_phrases_sharing_a_word_apart():
    # [CLS] red ball . blue ball . [SEP]: a box whose "blue" and "ball" tokens fire
    spans = [np.array([1, 2]), np.array([4, 5])]
    probs = _probs([{1: 0.1, 2: 0.9, 4: 0.8, 5: 0.9}], n_tokens=8)
    assert phrase_scores(probs, spans)[0].tolist() == pytest.approx([0.5, 0.85])
    dets = select_detections(
        probs,
        np.array([[0, 0, 10, 10]], float),
        spans,
        box_threshold=0.35,
        text_threshold=0.25,
        max_per_phrase=5,
        nms_iou=0.5,
    )
    assert [(d.phrase, round(d.score, 3)) for d in dets] == [(1, 0.85)]  # max would tie 0.9


def test_select_drops_empty_boxes_and_handles_no_phrases():
    spans = [np.array([1])]
    probs = _probs([{1: 0.9}, {1: 0.9}], n_tokens=3)
    boxes = np.array([[5, 5, 5, 9], [0, 0, 4, 4]], float)  # the first has zero width
    dets = select_detections(
        probs, boxes, spans, box_threshold=0.3, text_threshold=0.2, max_per_phrase=5, nms_iou=0.5
    )
    assert [d.box for d in dets] == [(0.0, 0.0, 4.0, 4.0)]
    kw = {"box_threshold": 0.3, "text_threshold": 0.2, "max_per_phrase": 5, "nms_iou": 0.5}
    assert select_detections(probs, boxes, [np.zeros(0, np.int64)], **kw) == []


def test_cxcywh_to_pixel_xyxy_clipped():
    boxes = np.array([[0.5, 0.5, 0.5, 0.5], [0.05, 0.9, 0.2, 0.4]])
    xyxy = cxcywh_to_xyxy(boxes, width=200, height=100)
    np.testing.assert_allclose(xyxy, [[50, 25, 150, 75], [0, 70, 30, 100]])


# -- the random-tiny grounder on photographs ----------------------------------------------


def test_detections_are_well_formed(detections):
    assert len(detections) == len(PHOTOS)
    assert sum(len(d) for d in detections) > 0  # random-tiny scores are usable
    for image, phrases, dets in zip(PHOTOS, PHRASES, detections, strict=True):
        h, w = image.shape[:2]
        for d in dets:
            assert 0 <= d.phrase < len(phrases)
            assert THRESH["text_threshold"] < d.score <= 1
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        keys = [(d.phrase, -d.score) for d in dets]
        assert keys == sorted(keys)
        for p in range(len(phrases)):
            assert sum(d.phrase == p for d in dets) <= 5  # max_per_phrase default
            same = np.array([d.box for d in dets if d.phrase == p]).reshape(-1, 4)
            iou = box_iou(same, same)
            assert (iou[np.triu_indices(len(same), 1)] <= 0.5).all()  # NMS at 0.5


def test_high_threshold_keeps_nothing(grounder):
    dets = grounder.detect(PHOTOS, PHRASES, box_threshold=0.95, text_threshold=0.25, micro_batch=4)
    assert dets == [[] for _ in PHOTOS]


def test_batched_equals_one_by_one(grounder, detections):
    # same-size images share a forward pass with prompts of different lengths
    sizes = [grounder._padded_size(*grounder._pixels(p).shape[-2:]) for p in PHOTOS]
    assert sizes == [(128, 128), (128, 192), (128, 192), (128, 128), (128, 256)]
    for image, phrases, batched in zip(PHOTOS, PHRASES, detections, strict=True):
        alone = grounder.detect([image], [phrases], micro_batch=1, **THRESH)[0]
        _same_detections(batched, alone)
    reordered = grounder.detect(PHOTOS[::-1], PHRASES[::-1], micro_batch=2, **THRESH)
    for a, b in zip(reordered[::-1], detections, strict=True):
        _same_detections(a, b)


def test_image_padding_changes_outputs_so_images_are_grouped(grounder):
    """Why each image is padded to a size of its own: the model's output for the same
    image padded further (as a larger batch neighbour would force) is different."""
    x = grounder._pixels(PHOTOS[0])  # 128 x 128
    enc = grounder.tokenizer(["astronaut."], return_tensors="pt")

    def run(height: int, width: int) -> torch.Tensor:
        pixels = torch.zeros((1, 3, height, width))
        mask = torch.zeros((1, height, width), dtype=torch.long)
        pixels[0, :, :128, :128], mask[0, :128, :128] = x, 1
        with torch.inference_mode():
            return grounder.model(pixel_values=pixels, pixel_mask=mask, **enc).pred_boxes

    assert torch.equal(run(128, 128), run(128, 128))
    assert (run(128, 128) - run(128, 256)).abs().max() > 1e-2


def test_empty_phrases_and_lists(grounder, monkeypatch):
    dets = grounder.detect(
        PHOTOS[:3], [[], ["", "cat", "?"], ["..."]], micro_batch=3, box_threshold=0.3,
        text_threshold=0.2,
    )  # fmt: skip
    assert dets[0] == [] and dets[2] == []
    assert dets[1] and {d.phrase for d in dets[1]} == {1}
    calls: list[int] = []
    forward = grounder.model.forward
    monkeypatch.setattr(grounder.model, "forward", lambda **kw: calls.append(1) or forward(**kw))
    assert grounder.detect(PHOTOS[:2], [[], [". ?"]], micro_batch=2, **THRESH) == [[], []]
    assert calls == []  # nothing to look for: the model is not run
    with pytest.raises(ValueError, match="2 images but 1 phrase lists"):
        grounder.detect(PHOTOS[:2], [["cat"]], micro_batch=2, **THRESH)


def test_bfloat16_runs():
    grounder = Grounder.load(RANDOM_TINY, device="cpu", dtype="bfloat16")
    dets = grounder.detect(PHOTOS[:2], PHRASES[:2], micro_batch=2, **THRESH)
    assert len(dets) == 2 and all(0 <= d.score <= 1 for ds in dets for d in ds)
    segmenter = Segmenter.load(RANDOM_TINY, device="cpu", dtype="bfloat16")
    masks = segmenter.segment(PHOTOS[:1], [np.array([[10, 10, 60, 80]])], micro_batch=1)
    assert masks[0].shape == (1, 96, 96) and masks[0].dtype == bool


# -- the grounder's production loading path ----------------------------------------------


def test_saved_grounder_loads_like_in_memory(tmp_path, detections):
    folder = save_tiny_grounder(tmp_path / "gdino")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    loaded = Grounder.load(str(folder), device="cpu")
    assert loaded.model_id == "gdino"
    again = loaded.detect(PHOTOS, PHRASES, micro_batch=4, **THRESH)
    for a, b in zip(again, detections, strict=True):
        _same_detections(a, b)


def test_grounder_refuses_missing_and_pickle_folders(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        Grounder.load(str(missing), device="cpu")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    folder = save_tiny_grounder(tmp_path / "bin_only")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        Grounder.load(str(folder), device="cpu")
    assert "pytorch_model.bin" in str(err.value) and "\n" not in str(err.value)


# -- SAM -----------------------------------------------------------------------------------


BOXES = [
    np.array([[10, 10, 60, 80], [0, 0, 96, 96], [40.5, 30.2, 41.5, 31.0]]),
    np.zeros((0, 4)),
    np.array([[5, 5, 100, 70]]),
    np.array([[0, 0, 40, 40], [30, 30, 80, 80]]),
    np.array([[150, 20, 199, 119]]),
]


def test_masks_per_box_at_each_image_size(segmenter):
    masks = segmenter.segment(PHOTOS, BOXES, micro_batch=4)
    for image, boxes, m in zip(PHOTOS, BOXES, masks, strict=True):
        assert m.dtype == bool and m.shape == (len(boxes), *image.shape[:2])
    assert masks[1].shape == (0, 100, 150)
    for m in masks:
        for mask in m:
            assert mask.any() and not mask.all()  # random, but not degenerate
    assert segmenter.segment([], [], micro_batch=2) == []


def test_batched_encoder_equals_one_by_one_and_sam_predictor(segmenter):
    from segment_anything import SamPredictor

    batched = segmenter.segment(PHOTOS, BOXES, micro_batch=3)
    for image, boxes, masks in zip(PHOTOS, BOXES, batched, strict=True):
        alone = segmenter.segment([image], [boxes], micro_batch=1)[0]
        np.testing.assert_array_equal(alone, masks)
    # segment_anything's own single-image path gives the same masks
    predictor = SamPredictor(segmenter.sam)
    for image, boxes, masks in zip(PHOTOS, BOXES, batched, strict=True):
        if not len(boxes):
            continue
        predictor.set_image(image)
        b = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
        ref, _, _ = predictor.predict_torch(None, None, boxes=b.float(), multimask_output=False)
        np.testing.assert_array_equal(ref[:, 0].numpy(), masks)


def test_segment_rejects_bad_boxes(segmenter):
    with pytest.raises(ValueError, match="boxes\\[0\\]"):
        segmenter.segment(PHOTOS[:1], [np.array([1, 2, 3])], micro_batch=1)
    with pytest.raises(ValueError, match="boxes\\[0\\]"):
        segmenter.segment(PHOTOS[:1], [np.array([[0, 0, np.nan, 4]])], micro_batch=1)


def test_saved_sam_loads_like_in_memory(tmp_path, segmenter):
    path = save_tiny_sam(tmp_path / "sam_tiny.pth")
    expected = segmenter.segment(PHOTOS, BOXES, micro_batch=4)
    loaded = Segmenter.load(str(path), device="cpu")
    assert loaded.model_id == "sam_tiny.pth"
    for a, b in zip(loaded.segment(PHOTOS, BOXES, micro_batch=4), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    from safetensors.torch import save_file

    st = tmp_path / "sam_tiny.safetensors"
    save_file(torch.load(path, weights_only=True), str(st))
    again = Segmenter.load(str(st), device="cpu").segment(PHOTOS[:1], BOXES[:1], micro_batch=1)
    np.testing.assert_array_equal(again[0], expected[0])


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_pickled_code_in_a_sam_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = random_sam(TINY_SAM).state_dict()
    state["evil"] = _Reduce(os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        Segmenter.load(str(path), device="cpu")
    message = str(err.value)
    assert "refused by weights_only" in message and "system" in message and "\n" not in message
    assert "weights_only=False" not in message  # torch's advice is not passed on
    assert not marker.exists()


def test_sam_files_that_do_not_fit_are_one_line_errors(tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError) as err:
        Segmenter.load(str(missing), device="cpu")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    state = random_sam(TINY_SAM).state_dict()
    cases = {
        "not_sam": ({"a": torch.zeros(2)}, "not a SAM"),
        "missing": (
            {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"},
            "missing mask_decoder.iou_token.weight",
        ),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, "unexpected extra.weight"),
        "shape": (
            {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 7)},
            "mis-shaped mask_decoder.iou_token.weight",
        ),
        "not_tensors": ({"a": 1}, "not a state dict of tensors"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(CheckpointError) as err:
            Segmenter.load(str(path), device="cpu")
        assert message in str(err.value) and "\n" not in str(err.value), name
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a torch.save file") as err:
        read_sam_state_dict(tmp_path / "junk.pth")
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_architecture_inferred_for_vit_b_exactly():
    from segment_anything import build_sam_vit_b

    official = build_sam_vit_b(checkpoint=None)
    state = official.state_dict()
    assert infer_sam_arch(state) == SAM_ARCHS["vit_b"]
    with torch.device("meta"):
        ours = build_sam(infer_sam_arch(state))
    assert _shapes(ours) == _shapes(official)  # same keys, same shapes
    loaded = sam_from_state_dict(state)
    for key in ("image_encoder.blocks.2.attn.rel_pos_h", "mask_decoder.iou_token.weight"):
        assert torch.equal(loaded.state_dict()[key], state[key])
    assert loaded.image_encoder.blocks[2].window_size == 0  # global
    assert loaded.image_encoder.blocks[3].window_size == 14
    assert infer_sam_arch(random_sam(TINY_SAM).state_dict()) == TINY_SAM


@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_architecture_inferred_for_vit_l_and_vit_h(name, monkeypatch):
    import importlib

    registry = importlib.import_module("segment_anything.build_sam")  # the module, not the function

    with torch.device("meta"):  # shapes only: no memory, no init time
        official = registry.sam_model_registry[name](checkpoint=None)
    arch = infer_sam_arch(official.state_dict())
    assert arch == SAM_ARCHS[name]
    with torch.device("meta"):
        assert _shapes(build_sam(arch)) == _shapes(official)
    seen: dict = {}
    monkeypatch.setattr(registry, "_build_sam", lambda **kw: seen.update(kw))
    registry.sam_model_registry[name](checkpoint=None)
    assert (arch.embed_dim, arch.depth, arch.num_heads, list(arch.global_attn_indexes)) == (
        seen["encoder_embed_dim"],
        seen["encoder_depth"],
        seen["encoder_num_heads"],
        seen["encoder_global_attn_indexes"],
    )
