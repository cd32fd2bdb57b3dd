"""Open-vocabulary grounding for the segment labeler: Grounding DINO (through
transformers) turns an image and its noun phrases into boxes, each assigned to one
phrase. Imported only in ``SegmentStage.setup()`` on a worker.

Weights two ways: a local ``save_pretrained`` folder (safetensors only, offline), or
``random-tiny``: a tiny model with seeded random weights whose boxes and phrase
assignments are MEANINGLESS, built by :mod:`datagen.stages.models.tiny.grounding` (which
also writes it, and real architectures with random weights, in the real format).

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
from datagen.stages.models import offline  # noqa: F401

# isort: split

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.boxes import box_iou
from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    TINY_SEED,
    CheckpointError,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
    weights_id,
)

PAD_MULTIPLE = 64  # Grounding DINO inputs are padded to multiples of this (per image)
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
            from datagen.stages.models.tiny.grounding import (
                TINY_GROUNDER_SIZE,
                grounder_processor,
                random_grounder,
                tiny_grounder_config,
            )

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
