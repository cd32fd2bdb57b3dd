"""Captions and entity lists from a vision-language model (the paper recaptions every
image with a VLM and asks it for up to 10 entities, which the segment stage grounds).

One stage asks two questions of one model: a long caption (``prompt``) and a list
of entities (``entity_prompt``; null skips it). The caption becomes the sample's
``txt`` and ``caption``; the input's own caption, when it had one, is kept beside
it as ``source_caption`` (the training reader can mix the two). An answer with
fewer than ``min_words`` words is ``filtered`` (``ShortCaption``): nothing else
about the row is wrong. An empty entity list is not a failure here (the t2i sample
is fine without entities); the segment stage filters that row.

Model code is in ``datagen.stages.models.caption``, imported in :meth:`CaptionStage.setup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from datagen.params import ParamError
from datagen.stages.entities import MAX_ENTITIES, clean_caption, parse_entities, plain_captions
from datagen.stages.models.common import ModelStage, check_weights_path, decode_stored
from datagen.stages.protocol import Batch, Filtered, batch_len, failure_from

CAPTION_PROMPT = (
    "Describe this image in detail in 100 to 150 words: the main subjects, their "
    "appearance and actions, the background, the colours, the lighting and the style. "
    "Write one paragraph of plain sentences."
)
ENTITY_PROMPT = (
    "List the main objects and entities visible in this image, at most 10, as short "
    "noun phrases, one per line, without any other text."
)


@dataclass(frozen=True)
class CaptionParams:
    """``weights``: a local ``save_pretrained`` folder of an image-text-to-text model
    (LLaVA-NeXT by default, the paper's; Qwen2.5-VL, SmolVLM, Florence-2 by config), or
    ``random-tiny`` (word salad: mechanics only). ``max_new_tokens`` caps the caption
    (150 words ~ 200 tokens), ``entity_max_new_tokens`` the entity answer;
    ``max_image_tokens`` caps the image tokens per image (null: the model's own);
    ``micro_batch``: images per ``generate`` call (left-padded); ``group_views``: on a
    group, caption every view (an identity's photos) or the ``first`` only (one caption
    per scene). Prompts go through the
    model's chat template; Florence-2 has none and takes task tokens instead:
    ``prompt: "<MORE_DETAILED_CAPTION>"``, ``entity_prompt: null`` (its detection
    tokens answer with boxes, not a list)."""

    weights: str = "models/llava-v1.6-mistral-7b-hf"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prompt: str = CAPTION_PROMPT
    entity_prompt: str | None = ENTITY_PROMPT
    max_new_tokens: int = 256
    entity_max_new_tokens: int = 96
    max_entities: int = MAX_ENTITIES
    max_image_tokens: int | None = None
    micro_batch: int = 8
    min_words: int = 5
    repetition_penalty: float = 1.05
    group_views: Literal["all", "first"] = "all"

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ParamError("prompt: must not be empty")
        if self.entity_prompt is not None and not self.entity_prompt.strip():
            raise ParamError("entity_prompt: must not be empty (null skips the entity list)")
        for key in ("max_new_tokens", "entity_max_new_tokens", "micro_batch", "max_entities"):
            if getattr(self, key) < 1:
                raise ParamError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_entities > MAX_ENTITIES * 2:
            raise ParamError(f"max_entities: at most {MAX_ENTITIES * 2}, got {self.max_entities}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ParamError(f"max_image_tokens: must be >= 1 or null, got {self.max_image_tokens}")
        if self.min_words < 0:
            raise ParamError(f"min_words: must be >= 0, got {self.min_words}")
        if self.repetition_penalty <= 0:
            raise ParamError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")


def require_group_views(needs: dict[str, Any], want: str, why: str) -> None:
    """For a stage packing groups: refuse (``ParamError``) a caption stage among its
    ``needs`` that captions the wrong views of a group (``group_views``)."""
    caption = needs.get("caption")
    if caption is not None and caption.group_views != want:
        raise ParamError(
            f"stages.caption.params.group_views: {why}; set it to {want!r}, "
            f"not {caption.group_views!r}"
        )


class CaptionStage(ModelStage):
    name: ClassVar[str] = "caption"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    # After a face check when the DAG has one: photos it rejected are not captioned.
    optional_needs: ClassVar[tuple[str, ...]] = ("face",)
    reads: ClassVar[tuple[str, ...]] = ("jpg", "caption")
    produces: ClassVar[tuple[str, ...]] = (
        "txt",
        "caption",
        "source_caption",
        "caption_model",
        "entity_names",
    )
    Params: ClassVar[type] = CaptionParams

    def __init__(self, params: CaptionParams | None = None, seed: int = 0):
        super().__init__(params, seed)
        self.views_of_group = self.params.group_views
        self.model: Any = None  # loaded in setup(), on the worker

    def setup(self) -> None:
        check_weights_path(self.params.weights, "caption")
        from datagen.stages.models.caption import CaptionModel

        p = self.params
        self.model = CaptionModel.load(
            p.weights,
            device=p.device,
            dtype=p.dtype,
            max_image_tokens=p.max_image_tokens,
            seed=self.seed,
        )

    def _ask(self, images: list[np.ndarray], prompt: str, max_new_tokens: int) -> list[str]:
        p = self.params
        return self.model.generate(
            images,
            prompt,
            max_new_tokens=max_new_tokens,
            micro_batch=p.micro_batch,
            repetition_penalty=p.repetition_penalty,
        )

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        if self.model is None:
            raise RuntimeError("CaptionStage.setup() must load the model before it labels")
        p = self.params
        n = batch_len(batch)
        out: dict[str, list[Any]] = {"txt": [None] * n, "meta": [None] * n, "failure": [None] * n}
        decoded, failures = decode_stored(batch["jpg"], self.name)
        for i, failure in failures.items():
            out["failure"][i] = failure
        rows = sorted(decoded)
        images = [decoded[i] for i in rows]
        captions = self._ask(images, p.prompt, p.max_new_tokens) if rows else []
        answers: list[str | None] = [None] * len(rows)
        if p.entity_prompt is not None and rows:
            answers = list(self._ask(images, p.entity_prompt, p.entity_max_new_tokens))
        for i, text, answer in zip(rows, captions, answers, strict=True):
            try:
                out["txt"][i], out["meta"][i] = self._label(text, answer, batch["caption"][i])
            except Filtered as exc:
                out["failure"][i] = failure_from(exc)
        return out

    def _label(self, text: str, answer: str | None, source: Any) -> tuple[bytes, dict[str, Any]]:
        caption = clean_caption(text)
        words = len(caption.split())
        if words < self.params.min_words:
            raise Filtered(
                "ShortCaption",
                f"the caption has {words} words, fewer than min_words={self.params.min_words}",
            )
        meta: dict[str, Any] = {"caption": caption, "caption_model": self.model.model_id}
        if isinstance(source, str) and source.strip():
            meta["source_caption"] = source
        plain_captions(meta, "caption", "source_caption")
        if answer is not None:
            meta["entity_names"] = parse_entities(answer, self.params.max_entities)
        return meta["caption"].encode("utf-8"), meta
