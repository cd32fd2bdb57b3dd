"""Open-vocabulary grounding for the segment labeler: Grounding DINO (through
transformers) turns an image and its noun phrases into boxes, each assigned to one
phrase. Imported only in ``SegmentStage.setup()`` on a worker.

Weights two ways: a local ``save_pretrained`` folder (safetensors only, offline), or
``random-tiny``: a tiny model built from a config with seeded random weights, whose boxes
and phrase assignments are MEANINGLESS (the mechanics: prompts, batching, thresholds,
NMS, run anywhere). :func:`save_tiny_grounder` writes it in the real format, so tests
exercise the production loading path; :func:`save_random_grounder` writes real
architectures with random weights for benches.

Batching. Grounding DINO pads a batch's images to a common size, and padding changes
what the model sees (the Swin backbone convolves and windows over the zeros): the same
image gets different boxes next to a larger neighbour. So each image is padded to a size
that depends on itself only (its resized size rounded up to a multiple of
:data:`PAD_MULTIPLE`, with the pixel mask the model was trained with), and images sharing
that size run together: a row's boxes never depend on its batch. Text padding, by
contrast, provably changes nothing (padded tokens are masked everywhere), so images with
different prompts share one forward pass.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).

# isort: split

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    CheckpointError,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
    weights_id,
)

TINY_SEED = 0  # one random-tiny model everywhere, whatever the DAG's seed
PAD_MULTIPLE = 64  # Grounding DINO inputs are padded to multiples of this (per image)
RANDOM_TEXT_LOGIT = 1.0  # random builds: every box-token logit is about this (sigmoid ~0.73)
RANDOM_LOGIT_SPREAD = 0.4  # ... with about this spread, so 0.95 is never reached
RANDOM_BOX_WH_LOGIT = 2.0  # random builds: added to the box width/height logits
TINY_GROUNDER_SIZE = (128, 213)  # shortest / longest edge (the released 800 / 1333, scaled)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


# == Grounding DINO: phrases, prompts, token spans, selection (no model) ===================


@dataclass(frozen=True)
class Detection:
    """One grounded box: ``phrase`` indexes the image's phrase list, ``score`` is the box's
    score for that phrase in [0, 1], ``box`` is xyxy in the image's pixels, clipped."""

    phrase: int
    score: float
    box: tuple[float, float, float, float]


def clean_phrase(phrase: str) -> str:
    """Lowercase, single-spaced, without "." and "?": both are Grounding DINO's phrase
    delimiters (token ids 1012 and 1029 split the text-attention blocks), so one inside a
    phrase would silently cut it in two."""
    return " ".join(re.sub(r"[.?]", " ", phrase.lower()).split())


def build_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int] | None]]:
    """The prompt ``"dog. red ball."`` for ``["dog", "red ball"]`` and each phrase's
    character span in it (None for a phrase that is empty once cleaned: left out)."""
    parts: list[str] = []
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for phrase in phrases:
        text = clean_phrase(phrase)
        if not text:
            spans.append(None)
            continue
        if parts:
            parts.append(" ")
            pos += 1
        spans.append((pos, pos + len(text)))
        parts.append(text + ".")
        pos += len(text) + 1
    return "".join(parts), spans


def phrase_token_spans(
    offsets: Sequence[tuple[int, int]],
    char_spans: Sequence[tuple[int, int] | None],
    n_tokens: int | None = None,
) -> list[np.ndarray]:
    """Token positions of each phrase, from the tokenizer's character offsets.

    A token belongs to a phrase when its (non-empty) character range lies inside the
    phrase's span; special tokens have empty ranges and the "." delimiters lie outside.
    A phrase counts only when its closing "." survived truncation (a token starting at the
    span's end): a half-truncated phrase would be scored on part of its words.
    ``n_tokens`` limits the search to the unpadded tokens.
    """
    n = len(offsets) if n_tokens is None else n_tokens
    starts = np.array([o[0] for o in offsets[:n]], np.int64)
    ends = np.array([o[1] for o in offsets[:n]], np.int64)
    real = ends > starts
    out: list[np.ndarray] = []
    for span in char_spans:
        if span is None:
            out.append(np.zeros(0, np.int64))
            continue
        lo, hi = span
        inside = np.flatnonzero(real & (starts >= lo) & (ends <= hi))
        closed = bool(np.any(real & (starts == hi)))
        out.append(inside if closed else np.zeros(0, np.int64))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a`` [N, 4] and ``b`` [M, 4] -> [N, M] (0 for empty unions)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int = -1) -> np.ndarray:
    """Greedy NMS (numpy; torchvision's compiled ops are not available): indices of the kept
    boxes, best first; a box is dropped when its IoU with a kept one is > ``iou_threshold``.
    Equal scores keep input order. ``limit`` > 0 stops after that many."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    keep: list[int] = []
    while order.size and (limit <= 0 or len(keep) < limit):
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if rest.size:
            rest = rest[box_iou(boxes[best], boxes[rest])[0] <= iou_threshold]
        order = rest
    return np.asarray(keep, np.int64)


def cxcywh_to_xyxy(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised centre boxes (relative to the unpadded image) -> pixel xyxy, clipped."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy, w, h = boxes.T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    xyxy *= np.array([width, height, width, height], np.float64)
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, width)
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, height)
    return xyxy


def phrase_scores(probs: np.ndarray, spans: Sequence[np.ndarray]) -> np.ndarray:
    """[Q, P] score of each query box for each phrase: the MEAN token probability over the
    phrase's tokens (-inf for a phrase without tokens).

    Mean, not max: Grounding DINO is trained with the positive spread over all of a
    phrase's tokens, and phrases share words ("red ball" / "blue ball"): under max a box
    whose "ball" token fires scores the same for both and the first phrase wins, under
    the mean the colour decides. One stray strong token also cannot claim a box alone.
    """
    out = np.full((probs.shape[0], len(spans)), -np.inf, np.float64)
    for i, idx in enumerate(spans):
        if idx.size:
            out[:, i] = probs[:, idx].astype(np.float64).mean(axis=1)
    return out


def select_detections(
    probs: np.ndarray,
    boxes_xyxy: np.ndarray,
    spans: Sequence[np.ndarray],
    *,
    box_threshold: float,
    text_threshold: float,
    max_per_phrase: int,
    nms_iou: float,
) -> list[Detection]:
    """Query boxes -> detections for one image.

    ``probs`` [Q, T]: sigmoid token probabilities; ``boxes_xyxy`` [Q, 4] in pixels;
    ``spans``: each phrase's token positions. A box's score is its best probability over
    the prompt's phrase tokens (delimiters and [CLS]/[SEP] excluded: the score must belong
    to a phrase); it is assigned to the phrase with the best :func:`phrase_scores` and kept
    when box score > ``box_threshold`` and phrase score > ``text_threshold``. Empty boxes
    are dropped. Per phrase: NMS at ``nms_iou``, then the best ``max_per_phrase``. Sorted by
    (phrase, -score).
    """
    q = probs.shape[0]
    if q == 0 or not any(idx.size for idx in spans):
        return []
    tokens = np.unique(np.concatenate([idx for idx in spans if idx.size]))
    box_score = probs[:, tokens].astype(np.float64).max(axis=1)
    per_phrase = phrase_scores(probs, spans)
    best = np.argmax(per_phrase, axis=1)  # ties: the first phrase
    score = per_phrase[np.arange(q), best]
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    alive = (box_score > box_threshold) & (score > text_threshold) & nonempty
    out: list[Detection] = []
    for phrase in range(len(spans)):
        members = np.flatnonzero(alive & (best == phrase))
        if not members.size:
            continue
        kept = members[nms(boxes[members], score[members], nms_iou, limit=max_per_phrase)]
        for k in kept:
            box = tuple(float(v) for v in boxes[k])
            out.append(Detection(phrase, float(score[k]), box))  # type: ignore[arg-type]
    return out


# == Grounding DINO: tiny tokenizer, configs, random builds ================================

# bert-base-uncased ids that Grounding DINO hard-codes as its phrase delimiters
# (``modeling_grounding_dino.SPECIAL_TOKENS``): a tokenizer must give them these ids.
CLS_ID, SEP_ID, DOT_ID, QUESTION_ID = 101, 102, 1012, 1029

# a few hundred common nouns and adjectives, for tiny prompts
_WORDS_TEXT = """
a an the of and with on in at near under over behind front left right top bottom
person man woman boy girl child baby people face head hair eye eyes hand hands arm leg
shirt dress hat coat jacket shoe shoes bag glasses helmet suit tie uniform
dog cat bird horse sheep cow elephant bear zebra giraffe mouse rabbit fish duck chicken
animal pet puppy kitten monkey lion tiger deer
car bus truck train bicycle bike motorcycle airplane plane boat ship rocket vehicle wheel
road street sidewalk building house wall window door roof bridge tower fence sign light
pole bench chair table desk sofa couch bed pillow lamp shelf cabinet clock vase plant
flower tree grass bush leaf leaves sky cloud clouds sun moon star mountain hill rock stone
water sea ocean lake river beach sand snow ice field forest garden park ground floor
cup mug glass bottle plate bowl fork knife spoon food pizza cake bread sandwich apple
banana orange fruit vegetable coffee tea saucer drink wine
laptop computer keyboard phone screen television tv camera book paper box bag toy ball
kite umbrella suitcase frame picture painting window mirror towel sink toilet oven
refrigerator microwave
red green blue yellow orange purple pink brown black white gray grey gold silver
big small large little tall short long round square old new young wooden metal striped
dark bright open closed empty full wet dry hot cold soft
space suit flag astronaut spacesuit
"""


def tiny_vocab() -> dict[str, int]:
    """A BERT WordPiece vocabulary laid out like bert-base-uncased where it matters:
    [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, the ASCII punctuation, digits and
    lowercase letters from 999 ("." = 1012, "?" = 1029), then a few hundred common words
    and "##" letters, so any lowercase word tokenizes (letter by letter at worst)."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 99 + 999 - len(tokens))]
    tokens += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    seen = set(tokens)
    for word in [
        *_WORDS_TEXT.split(),
        *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
        "##s",
        "##es",
    ]:
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert (vocab["[CLS]"], vocab["[SEP]"], vocab["."], vocab["?"]) == (
        CLS_ID,
        SEP_ID,
        DOT_ID,
        QUESTION_ID,
    )
    return vocab


def grounder_processor(shortest_edge: int = 800, longest_edge: int = 1333) -> Any:
    """A GroundingDinoProcessor built in code: the released image preprocessing (bilinear
    resize keeping the aspect ratio, ImageNet normalisation) at the given size and a BERT
    tokenizer on :func:`tiny_vocab` (bert-base-uncased's special ids)."""
    from transformers import BertTokenizer, GroundingDinoImageProcessor, GroundingDinoProcessor

    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    )
    tokenizer = BertTokenizer(vocab=tiny_vocab(), do_lower_case=True)
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _config(
    swin_width: int,
    swin_depths: list[int],
    swin_heads: list[int],
    window: int,
    image_size: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    d_model: int,
    queries: int,
    layers: tuple[int, int],
    heads: int,
    points: int,
) -> Any:
    """A Grounding DINO layout: a Swin backbone read at its last three stages, a BERT
    text encoder over :func:`tiny_vocab`, ``layers`` (encoder, decoder; the decoder needs
    >= 2) of width ``d_model`` with FFNs of ``4 * d_model``."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin = SwinConfig(
        image_size=image_size,
        embed_dim=swin_width,
        depths=swin_depths,
        num_heads=swin_heads,
        window_size=window,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=4 * text_width,
        max_position_embeddings=256,
    )
    return GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        num_queries=queries,
        d_model=d_model,
        encoder_layers=layers[0],
        decoder_layers=layers[1],
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_n_points=points,
        decoder_n_points=points,
    )


def tiny_grounder_config() -> Any:
    """A ~0.5M-parameter Grounding DINO: Swin backbone of four 1-block stages (16..128
    channels), a 1-layer BERT, d_model 32, 30 queries, 1 encoder and 2 decoder layers.
    Mechanics only."""
    return _config(16, [1, 1, 1, 1], [1, 2, 2, 4], 4, 128, 32, 1, 2, 32, 30, (1, 2), 2, 2)


def mid_grounder_config() -> Any:
    """A ~12M-parameter Grounding DINO for CPU benchmarks with random weights: Swin of
    64..512 channels (1, 1, 3, 1 blocks), a 2-layer BERT of width 256, d_model 128, 300
    queries, 3 + 3 layers (Grounding DINO-T: Swin-T, BERT-base, d_model 256, 900 queries,
    6 + 6; ~172M)."""
    return _config(64, [1, 1, 3, 1], [2, 4, 8, 16], 7, 224, 256, 2, 4, 128, 300, (3, 3), 4, 4)


def _usable_random_outputs(model: Any) -> None:
    """Random weights give box-token logits spread over +-10 (a dot product of two
    LayerNorm outputs), so every box would pass or fail by chance, and boxes that are the
    encoder's smallest proposals (5% of the image). Two fixes, for random builds only:

    - the LayerNorms whose outputs make the logits (the decoder's final norm and the last
      text-enhancer norm) get a shared constant bias and a small gain: the logit is then
      ``RANDOM_TEXT_LOGIT + g^2 * <x, y>`` (a constant bias is orthogonal to every
      normalised vector), about sigmoid(1) = 0.73 with a small spread (measured: max
      sigmoid ~0.9): default thresholds keep boxes, 0.95 keeps none;
    - the decoder box heads' last bias (zero-initialised, as in DETR; one head shared by
      all layers by default) grows the width and height logits by ``RANDOM_BOX_WH_LOGIT``
      over the decoder's refinements, so boxes cover about a quarter to most of the image.
    """
    decoder_norm = model.model.decoder.layer_norm
    text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
    d = decoder_norm.weight.numel()
    gain = math.sqrt(RANDOM_LOGIT_SPREAD / math.sqrt(d))
    bias = math.sqrt(RANDOM_TEXT_LOGIT / d)  # |bias vector|^2 = RANDOM_TEXT_LOGIT
    with torch.no_grad():
        for norm in (decoder_norm, text_norm):
            norm.weight.fill_(gain)
            norm.bias.fill_(bias)
        # each layer's head adds its bias once; a shared head is one tensor, seen once here
        heads = {id(h.layers[-1].bias): h.layers[-1].bias for h in model.bbox_embed}
        for b in heads.values():
            b[2:] += RANDOM_BOX_WH_LOGIT / len(model.bbox_embed)


def random_grounder(config: Any, seed: int = TINY_SEED) -> Any:
    """``config`` with seeded random weights and usable scores (the global RNG is left as it
    was). MEANINGLESS detections: mechanics only."""
    from transformers import GroundingDinoForObjectDetection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    _usable_random_outputs(model)
    return model.eval()


def save_random_grounder(
    folder: str | Path, config: Any = None, processor: Any = None, seed: int = TINY_SEED
) -> Path:
    """A random Grounding DINO + processor in the real ``save_pretrained`` format
    (safetensors, image processor and tokenizer files). Default: the tiny one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = random_grounder(config or tiny_grounder_config(), seed)
    model.save_pretrained(folder, safe_serialization=True)
    (processor or grounder_processor(*TINY_GROUNDER_SIZE)).save_pretrained(folder)
    return folder


def save_tiny_grounder(folder: str | Path) -> Path:
    """The ``random-tiny`` Grounding DINO saved to ``folder`` (same weights as in memory)."""
    return save_random_grounder(folder)


class Grounder:
    """Grounding DINO and its processor on one device: RGB images and per-image noun
    phrases in, boxes assigned to phrases out (see :func:`select_detections`)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: Any,
        dtype: Any,
        model_id: str,
        pad_multiple: int = PAD_MULTIPLE,
    ):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", True):
            raise CheckpointError("grounding tokenizer: a fast tokenizer is needed (offsets)")
        delimiters = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
        special = [int(t) for t in model.model.special_tokens.tolist()]
        if sorted(delimiters) != sorted(special):
            raise CheckpointError(
                f"grounding tokenizer gives [CLS] [SEP] . ? the ids {delimiters}, but the model "
                f"splits phrases at ids {special}: a bert-base-uncased vocabulary is needed"
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.model_id = model_id
        self.pad_multiple = pad_multiple
        self.max_text_len = int(model.config.max_text_len)

    @classmethod
    def load(
        cls, weights: str, *, device: str = "auto", dtype: str = "auto", seed: int = TINY_SEED
    ) -> Grounder:
        """``weights``: a local ``save_pretrained`` folder (offline, safetensors only) or
        ``random-tiny`` (meaningless detections; ``seed`` picks its random weights)."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if weights == RANDOM_TINY:
            model = random_grounder(tiny_grounder_config(), seed)
            return cls(model, grounder_processor(*TINY_GROUNDER_SIZE), dev, dt, RANDOM_TINY)
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        path = Path(weights)
        check_pretrained_folder(path, "grounding", PROCESSOR_FILES, TOKENIZER_FILES)
        model = GroundingDinoForObjectDetection.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dt
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, dev, dt, weights_id(weights))

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        """One image resized and normalised by the processor, unpadded: [3, h, w] float32."""
        out = self.processor.image_processor(
            images=[image], do_pad=False, return_tensors="pt", input_data_format="channels_last"
        )
        return out["pixel_values"][0]

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        m = self.pad_multiple
        return (-(-h // m) * m, -(-w // m) * m)

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray],
        phrases: Sequence[Sequence[str]],
        *,
        box_threshold: float,
        text_threshold: float,
        micro_batch: int,
        max_per_phrase: int = 5,
        nms_iou: float = 0.5,
    ) -> list[list[Detection]]:
        """Detections for each RGB uint8 ``[H, W, 3]`` image and its own phrase list.

        Images padded to the same size (their own resized size rounded up to
        ``pad_multiple``) run together, ``micro_batch`` per forward pass, their prompts
        padded to the longest. A phrase nothing matched has no Detection; an image without
        a (non-empty) phrase is not run.
        """
        if len(images) != len(phrases):
            raise ValueError(f"detect: {len(images)} images but {len(phrases)} phrase lists")
        prompts = [build_prompt(p) for p in phrases]
        todo = [i for i, (_, spans) in enumerate(prompts) if any(spans)]  # else: nothing to find
        pixels = {i: self._pixels(np.ascontiguousarray(images[i])) for i in todo}
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            groups.setdefault(self._padded_size(*pixels[i].shape[-2:]), []).append(i)
        out: list[list[Detection]] = [[] for _ in images]
        for (ph, pw), members in groups.items():
            for part in chunks(members, micro_batch):
                x = torch.zeros((len(part), 3, ph, pw), dtype=torch.float32)
                mask = torch.zeros((len(part), ph, pw), dtype=torch.long)
                for j, i in enumerate(part):
                    h, w = pixels[i].shape[-2:]
                    x[j, :, :h, :w] = pixels[i]
                    mask[j, :h, :w] = 1
                enc = self.tokenizer(
                    [prompts[i][0] for i in part],
                    padding="longest",
                    truncation=True,
                    max_length=self.max_text_len,
                    return_offsets_mapping=True,
                    return_token_type_ids=True,
                    return_tensors="pt",
                )
                result = self.model(
                    pixel_values=x.to(self.device, self.dtype),
                    pixel_mask=mask.to(self.device),
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device),
                    token_type_ids=enc["token_type_ids"].to(self.device),
                )
                probs = torch.sigmoid(result.logits.float()).cpu().numpy()
                boxes = result.pred_boxes.float().cpu().numpy()
                n_tokens = enc["attention_mask"].sum(dim=1).tolist()
                for j, i in enumerate(part):
                    spans = phrase_token_spans(
                        enc["offset_mapping"][j].tolist(), prompts[i][1], n_tokens[j]
                    )
                    height, width = images[i].shape[:2]
                    out[i] = select_detections(
                        probs[j, :, : n_tokens[j]],
                        cxcywh_to_xyxy(boxes[j], width, height),
                        spans,
                        box_threshold=box_threshold,
                        text_threshold=text_threshold,
                        max_per_phrase=max_per_phrase,
                        nms_iou=nms_iou,
                    )
        return out
