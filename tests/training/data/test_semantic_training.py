"""Training reads the semantic subset the semantic DAG writes (tiny random models, on a
local Ray): all four tasks, semanticmap2image, boundingbox2image and their reverses,
with the colour tags in the prompt exactly as the released inference code expects
them (``[[semanticmap2image]] <#FFFF00 yellow mask: dog> <caption>``), maps kept in
their palette colours, and the VLM / source caption mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import shards
from datagen.schema import PALETTE, palette_rgb
from tests.helpers import REPO

pytestmark = pytest.mark.slow
SIZE = 64  # the demo inputs are resized so their long side is 64: one bucket, no crop


@pytest.fixture(scope="module")
def semantic_out(ray_local, tmp_path_factory) -> str:
    from orchestration.datagen_job import run
    from pipelines import dag

    tmp = tmp_path_factory.mktemp("semantic")
    config = dag.load(
        REPO / "pipelines" / "semantic.yaml",
        [
            "weights=random-tiny",
            f"output={tmp / 'out'}",
            "source.n=8",
            f"source.cache_dir={tmp / 'inputs'}",
            f"source.max_side={SIZE}",
            "stages.decode.params.min_side=32",
            "shards.max_samples=4",
            "stages.caption.params.max_new_tokens=24",
            "stages.caption.params.entity_max_new_tokens=16",
            *(
                f"stages.{s}.resources.{k}"
                for s in ("caption", "segment")
                for k in ("num_gpus=0", "actors=[1,1]", "batch_size=4")
            ),
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        ],
    )
    out = run(config, log=lambda *_: None).output
    assert shards.status(out)["semantic"]["written"] >= 3
    return out


def _metas(out: str) -> dict[str, dict]:
    found = {}
    for tar in sorted((Path(out) / "semantic").glob("*.tar")):
        for key, files in shards.read_tar_samples(tar.read_bytes()):
            found[key] = json.loads(files["json"])
    return found


def _stream(out: str, task: str, **kw):
    from training.data.datamodule import OneGenDataModule

    cfg = {
        "paths": {"semantic": out},
        "batch_size": 2,
        "num_workers": 0,
        "seed": 0,
        "buckets": [[SIZE, SIZE]],
        "caption_dropout": 0.0,
        "tasks": [task],
        **kw,
    }
    dm = OneGenDataModule(cfg)
    dm.setup()
    return dm.stream(start_batch=0, rank=0)


@pytest.mark.parametrize(
    ("task", "kind", "map_view"),
    [
        ("semanticmap2image", "mask", 1),
        ("image2semanticmap", "mask", 0),
        ("boundingbox2image", "boundingbox", 1),
        ("image2boundingbox", "boundingbox", 0),
    ],
)
def test_all_four_tasks_with_the_released_prompt_format(semantic_out, task, kind, map_view):
    metas = _metas(semantic_out)
    token = "[[semanticmap2image]]" if kind == "mask" else "[[boundingbox2image]]"
    stream = _stream(semantic_out, task)
    for k in range(3):
        batch = stream.make_batch(k)
        assert batch["tasks"] == [task] * 2 and batch["skipped"] == 0
        assert batch["cond_mask"].tolist() == [[False, True]] * 2  # view 0 is the target
        for b, key in enumerate(batch["keys"]):
            meta = metas[key]
            tags = [e["mask_tag" if kind == "mask" else "box_tag"] for e in meta["entities"]]
            # token, the sample's colour tags in order, then the (VLM) caption
            assert batch["prompts"][b] == " ".join([token, *tags, meta["caption"]])
            for e in meta["entities"]:
                assert f"<{e['hex']} {e['color']} {kind}: {e['label']}>" in batch["prompts"][b]
            pixels = batch["pixels"][b, map_view]
            rgb = torch.round((pixels + 1) * 127.5).to(torch.int64).permute(1, 2, 0)
            colours = {tuple(c) for c in rgb.reshape(-1, 3).tolist()}
            assert len(colours) > 1  # something was drawn on the black
            if kind == "mask":  # semantic maps resize nearest: only black and their colours
                entity_rgb = (
                    palette_rgb(PALETTE.index((e["hex"], e["color"]))) for e in meta["entities"]
                )
                assert colours <= {(0, 0, 0), *entity_rgb}
            else:  # box outlines resize bilinearly (thin lines survive): mostly black
                assert (rgb.sum(-1) == 0).float().mean() > 0.5


def test_source_caption_mix(semantic_out):
    """data.source_caption_prob: the input's own caption replaces the VLM's that often."""
    metas = _metas(semantic_out)
    assert all(m["source_caption"] != m["caption"] for m in metas.values())
    for prob, expect_source in ((0.0, False), (1.0, True)):
        batch = _stream(semantic_out, "semanticmap2image", source_caption_prob=prob).make_batch(0)
        for key, prompt in zip(batch["keys"], batch["prompts"], strict=True):
            caption = metas[key]["source_caption" if expect_source else "caption"]
            assert prompt.endswith(" " + caption)
    mixed = _stream(semantic_out, "semanticmap2image", source_caption_prob=0.5)
    sources = [
        prompt.endswith(" " + metas[key]["source_caption"])
        for k in range(8)
        for key, prompt in zip(
            *(lambda b: (b["keys"], b["prompts"]))(mixed.make_batch(k)), strict=True
        )
    ]
    assert 0 < sum(sources) < len(sources)
    assert np.isfinite(sum(sources))
