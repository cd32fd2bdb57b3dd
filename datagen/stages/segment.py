"""Grounded SAM (the ``semantic`` subset): the caption stage's entity names -> boxes from
an open-vocabulary detector (Grounding DINO) -> SAM masks -> a semantic map and a box
map in palette colours on black, masks as RLE and the prompt tags in the json.

Batched twice: the detector sees every image of the batch with its own prompt in
one padded batch (``detector_batch`` per forward); SAM encodes each image once
(``micro_batch`` images per encoder pass) and decodes all its boxes together.
Entities the detector does not find, or whose masks are empty, are dropped and
listed in ``entities_dropped``; a row left with none is ``filtered``
(``NoEntityFound``), as is a row whose caption listed none (``NoEntities``).

Model code is in ``datagen.stages.models.grounding`` and ``.sam``, imported in
:meth:`SegmentStage.setup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from datagen.images import encode_png
from datagen.params import ParamError
from datagen.schema import PALETTE
from datagen.stages.models.common import ModelStage, check_weights_path, decode_stored
from datagen.stages.protocol import ERROR, FILTERED, Batch, Failure, batch_len
from datagen.stages.segment_render import (
    Entity,
    entity_colours,
    entity_record,
    render_boxes,
    render_semantic,
)


@dataclass(frozen=True)
class SegmentParams:
    """``detector_weights``: a Grounding DINO ``save_pretrained`` folder; ``weights``: a
    SAM ``.pth`` state dict (vit_b, vit_l or vit_h; the architecture is read from it);
    ``random-tiny`` for both: tiny random models, meaningless labels. A box is kept when
    its score is above ``box_threshold`` and its entity's token score above
    ``text_threshold`` (Grounding DINO's two thresholds), at most ``max_per_entity``
    boxes per entity after NMS at ``nms_iou``. ``min_mask_fraction``: an entity whose
    mask covers less of the image is dropped (SAM found nothing in its boxes)."""

    detector_weights: str = "models/grounding-dino-base"
    weights: str = "models/sam_vit_h_4b8939.pth"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_per_entity: int = 3
    nms_iou: float = 0.5
    min_mask_fraction: float = 0.0005
    detector_batch: int = 8
    micro_batch: int = 8

    def __post_init__(self) -> None:
        for key in ("box_threshold", "text_threshold", "nms_iou", "min_mask_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ParamError(f"{key}: must be within [0, 1], got {getattr(self, key)}")
        for key in ("max_per_entity", "detector_batch", "micro_batch"):
            if getattr(self, key) < 1:
                raise ParamError(f"{key}: must be >= 1, got {getattr(self, key)}")


class SegmentStage(ModelStage):
    name: ClassVar[str] = "segment"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("caption",)
    reads: ClassVar[tuple[str, ...]] = ("jpg", "entity_names")
    produces: ClassVar[tuple[str, ...]] = (
        "semantic.png",
        "boxes.png",
        "entities",
        "entities_dropped",
        "segment_model",
    )
    Params: ClassVar[type] = SegmentParams

    @classmethod
    def check_needs(cls, params: Any, needs: dict[str, Any]) -> None:
        caption = needs.get("caption")
        if caption is not None and getattr(caption, "entity_prompt", "") is None:
            raise ParamError(
                "grounds the caption stage's entity list, but "
                "stages.caption.params.entity_prompt is null (no list is asked for)"
            )

    def setup(self) -> None:
        from datagen.stages.models.grounding import Grounder
        from datagen.stages.models.sam import Segmenter

        p = self.params
        check_weights_path(p.detector_weights, "segment detector_weights")
        check_weights_path(p.weights, "segment weights")
        self.grounder = Grounder.load(
            p.detector_weights, device=p.device, dtype=p.dtype, seed=self.seed
        )
        self.segmenter = Segmenter.load(p.weights, device=p.device, dtype=p.dtype, seed=self.seed)
        self.model_id = f"{self.grounder.model_id}+{self.segmenter.model_id}"

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        p = self.params
        n = batch_len(batch)
        out: dict[str, list[Any]] = {
            "semantic_png": [None] * n,
            "boxes_png": [None] * n,
            "meta": [None] * n,
            "failure": [None] * n,
        }
        names: dict[int, list[str]] = {}
        for i in range(n):
            failure, labels = self._entity_names(batch["entity_names"][i])
            out["failure"][i] = failure
            if failure is None:
                names[i] = labels
        # Only rows with entities are decoded and shown to the models.
        wanted = sorted(names)
        decoded, failures = decode_stored([batch["jpg"][i] for i in wanted], self.name)
        for j, failure in failures.items():
            out["failure"][wanted[j]] = failure
        images = {wanted[j]: image for j, image in decoded.items()}
        rows = sorted(images)
        found = self.grounder.detect(
            [images[i] for i in rows],
            [names[i] for i in rows],
            box_threshold=p.box_threshold,
            text_threshold=p.text_threshold,
            micro_batch=p.detector_batch,
            max_per_phrase=p.max_per_entity,
            nms_iou=p.nms_iou,
        )
        boxes = [
            np.array([np.round(d.box, 1) for d in dets], np.float32).reshape(-1, 4)
            for dets in found
        ]
        masks = self.segmenter.segment([images[i] for i in rows], boxes, micro_batch=p.micro_batch)
        for i, dets, box, mask in zip(rows, found, boxes, masks, strict=True):
            key = str(batch["key"][i])
            label = self._label(key, names[i], dets, box, mask, images[i].shape[:2])
            if isinstance(label, Failure):
                out["failure"][i] = label
            else:
                out["semantic_png"][i], out["boxes_png"][i], out["meta"][i] = label
        return out

    def _entity_names(self, value: Any) -> tuple[Failure | None, list[str]]:
        if value is None:
            return Failure(ERROR, "NoEntityList", "the caption stage gave no entity list"), []
        labels = [str(v) for v in value if str(v).strip()][: len(PALETTE)]
        if not labels:
            return Failure(FILTERED, "NoEntities", "the VLM listed no entity in this image"), []
        return None, labels

    def _label(
        self,
        key: str,
        labels: list[str],
        dets: list[Any],
        boxes: np.ndarray,
        masks: np.ndarray,
        size: tuple[int, int],
    ) -> Failure | tuple[bytes, bytes, dict[str, Any]]:
        """One image's entities: each phrase's boxes and the union of their masks."""
        height, width = size
        min_pixels = self.params.min_mask_fraction * height * width
        kept: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        dropped: list[str] = []
        for phrase, label in enumerate(labels):
            mine = [j for j, d in enumerate(dets) if d.phrase == phrase]
            mask = np.zeros((height, width), bool)
            for j in mine:
                mask |= masks[j]
            if not mine or mask.sum() < max(1.0, min_pixels):
                dropped.append(label)
                continue
            scores = np.array([dets[j].score for j in mine], np.float64)
            kept.append((label, boxes[mine], scores, mask))
        if not kept:
            return Failure(
                FILTERED,
                "NoEntityFound",
                f"the detector found none of {labels} (box_threshold="
                f"{self.params.box_threshold:g}, text_threshold={self.params.text_threshold:g})",
            )
        colours = entity_colours(key, self.seed, len(kept))
        entities = [
            Entity(lbl, c, b, s, m) for (lbl, b, s, m), c in zip(kept, colours, strict=True)
        ]
        meta = {
            "entities": [entity_record(e) for e in entities],
            "entities_dropped": dropped,
            "segment_model": self.model_id,
        }
        semantic = encode_png(render_semantic(entities, width, height))
        box_map = encode_png(render_boxes(entities, width, height))
        return semantic, box_map, meta
