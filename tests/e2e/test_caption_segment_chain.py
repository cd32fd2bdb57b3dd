"""Three chained labelers (decode -> caption -> segment) keep exact accounting: a row the
caption stage fails or filters never reaches the segment stage, a row without entities
is filtered there, and every input key ends up written, quarantined or filtered exactly
once per subset, with the stage and reason that stopped it.

The VLM's answers are scripted per image width (a test double at the model boundary,
so which rows fail is known exactly); decode, the stages' own logic, the tiny random
Grounding DINO and SAM, the runner and the shard sink are the real ones.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from datagen import shards, sources
from datagen.stages.caption import ENTITY_PROMPT, CaptionStage
from datagen.stages.protocol import object_column
from datagen.stages.segment import SegmentStage
from pipelines import builder, dag
from pipelines.sink import write_batch
from tests.helpers import REPO

GOOD_CAPTION = "A small brown dog plays with a cat on green grass."
# width -> (caption answer, entity answer); widths not listed answer GOOD_CAPTION, "dog, cat"
SCRIPT = {
    101: ("", "dog"),  # an empty caption: filtered at caption (ShortCaption)
    102: ("Too short.", "dog"),  # filtered at caption too
    103: (GOOD_CAPTION, "none"),  # no entity: t2i written, semantic filtered at segment
    104: (GOOD_CAPTION, "1. \n2. "),  # an empty list in another layout
}


class ScriptedVLM:
    model_id = "scripted"

    def generate(self, images, prompt, *, max_new_tokens, micro_batch, repetition_penalty=1.0):
        col = 1 if prompt == ENTITY_PROMPT else 0
        return [SCRIPT.get(im.shape[1], (GOOD_CAPTION, "dog, cat"))[col] for im in images]


class SeenByGrounder:
    """Wraps the real grounder, recording the image widths it was given."""

    def __init__(self, grounder):
        self.grounder, self.widths = grounder, []
        self.model_id = grounder.model_id

    def detect(self, images, phrases, **kw):
        self.widths += [im.shape[1] for im in images]
        return self.grounder.detect(images, phrases, **kw)


def _name(key: str) -> str:
    """``w101_jpg-<hash>`` (a folder source's key) -> ``w101``."""
    return key.split("_jpg")[0]


def _inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for width in range(100, 110):
        image = cv2.resize(rng.integers(0, 255, (6, 6, 3), np.uint8), (width, 80))
        cv2.imwrite(str(folder / f"w{width}.jpg"), image)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")


def test_chained_stages_skip_failed_rows_and_account_exactly(tmp_path):
    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    cfg = dag.load(
        REPO / "pipelines" / "semantic.yaml",
        [
            "weights=random-tiny",
            "source.kind=folder",
            f"source.path={tmp_path / 'in'}",
            f"output={out}",
            "max_error_rate=1.0",
            "shards.max_samples=4",
        ],
    )
    assert [s.name for s in cfg.stages] == ["decode", "caption", "segment"]
    built = [(p.spec.build(0), p) for p in builder.planned_stages(cfg)]
    for stage, _ in built:
        if isinstance(stage, CaptionStage):
            stage.model = ScriptedVLM()
        else:
            stage.setup()
    segment = next(s for s, _ in built if isinstance(s, SegmentStage))
    segment.grounder = SeenByGrounder(segment.grounder)

    manifest = sources.resolve(cfg.source_spec)
    names = [s.name for s in cfg.subsets]
    rows = builder.input_rows(manifest, [names] * manifest.num_rows, names)
    sink = builder.sink_kwargs(cfg, str(out))
    for start in range(0, rows.num_rows, 4):  # blocks of 4 rows, as Ray would batch them
        block = rows.slice(start, 4).to_pydict()
        write_batch(
            builder.run_stages(built, {k: object_column(v) for k, v in block.items()}), **sink
        )

    # The detector saw exactly the rows whose caption succeeded with entities: not the
    # caption's failures (101, 102), not the rows without entities (103, 104, filtered
    # by the segment stage before its models run), nor the undecodable input.
    assert sorted(segment.grounder.widths) == [100, *range(105, 110)]
    status = shards.status(str(out))
    for subset in ("t2i", "semantic"):
        s = status[subset]
        assert s["written"] + s["quarantined"] + s["filtered"] == 11, (subset, s)
    reasons = {
        subset: Counter(
            (_name(r["key"]), r["stage"], r["kind"], r["error"])
            for r in shards.read_quarantine(str(out), subset).to_pylist()
        )
        for subset in ("t2i", "semantic")
    }
    caption_stops = {
        ("w101", "caption", "filtered", "ShortCaption"),
        ("w102", "caption", "filtered", "ShortCaption"),
        ("broken", "decode", "error", "NotAnImage"),
    }
    assert set(reasons["t2i"]) == caption_stops and max(reasons["t2i"].values()) == 1
    segment_stops = {
        ("w103", "segment", "filtered", "NoEntities"),
        ("w104", "segment", "filtered", "NoEntities"),
    }
    assert caption_stops | segment_stops <= set(reasons["semantic"])
    assert max(reasons["semantic"].values()) == 1
    assert status["t2i"]["written"] == 8
    written = {
        _name(key)
        for tar in sorted((out / "semantic").glob("*.tar"))
        for key, _ in shards.read_tar_samples(tar.read_bytes())
    }
    quarantined = {r[0] for r in reasons["semantic"]}
    assert written | quarantined == {f"w{w}" for w in range(100, 110)} | {"broken"}
    assert not written & quarantined
