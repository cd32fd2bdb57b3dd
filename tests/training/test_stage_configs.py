"""The paper's three stages as shipped configs (``training/configs/onediffusion-2.8b-stage*.yaml``):
each one resolves (``--print-config``) to the data and resolution its stage trains, and the
chain runs: stage 1 fits from random weights, stage 2 starts from stage 1's run folder and
stage 3 from stage 2's, each a new run with step 0, on the machine's limits (CPU, the tiny
model and encoders, small buckets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.helpers import depth_pose_shards as S

STAGES = {n: REPO / f"training/configs/onediffusion-2.8b-stage{n}.yaml" for n in (1, 2, 3)}
ALL_SUBSETS = ("t2i", "i2i", "semantic", "depth", "pose", "multiview", "faceid")


def _load(stage: int, *overrides: str):
    from training.config import load_config

    return load_config(STAGES[stage], list(overrides))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_prints_its_resolved_config(stage, capsys):
    from orchestration.cli import main

    code = main(["train", "fit", "--config", str(STAGES[stage]), "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"name: onediffusion-2.8b-stage{stage}" in out and "experiment: onegen-2.8b" in out


def test_stage1_trains_text_to_image_only_at_256_px():
    from training.data.index import mix_weights

    cfg = _load(1)
    assert not cfg.model.init_from and cfg.model.config == "onediffusion-2.8b"
    weights = mix_weights(list(ALL_SUBSETS), cfg.data.mix)
    assert weights["t2i"] == 1.0 and sum(weights.values()) == 1.0
    table = _data(cfg).bucket_table()
    assert (256, 256) in table.for_batch("t2i", 1)
    assert max(max(b) for b in table.for_batch("t2i", 1)) <= 320
    assert list(cfg.samples.tasks) == ["text2image"]


def test_stage2_trains_every_family_equally_at_its_own_resolution():
    from training.data.index import mix_weights

    cfg = _load(2)
    assert cfg.model.init_from and cfg.model.init_weights == "ema"
    weights = mix_weights(list(ALL_SUBSETS), cfg.data.mix)
    family = {"t2i": ("t2i",), "i2i": ("i2i", "semantic", "depth", "pose"),
              "ids": ("multiview", "faceid")}  # fmt: skip
    for members in family.values():
        assert sum(weights[s] for s in members) == pytest.approx(1 / 3)
    data = _data(cfg)
    table = data.bucket_table()
    assert (512, 512) in table.for_batch("t2i", 1)
    for subset in ("i2i", "semantic", "depth", "pose"):
        assert (256, 256) in table.for_batch(subset, 1) and (512, 512) not in table.for_batch(
            subset, 1
        )
    assert data.view_limits("faceid") == (2, 4)
    for views, side in ((2, 512), (3, 512), (4, 256)):
        assert (side, side) in table.for_batch("faceid", views), views
    assert (256, 256) in table.for_batch("multiview", 4)


def test_stage3_trains_text_to_image_at_1024_px_from_stage2():
    from training.data.index import mix_weights

    cfg = _load(3)
    assert cfg.model.init_from and cfg.samples.resolution == 1024
    assert mix_weights(list(ALL_SUBSETS), cfg.data.mix)["t2i"] == 1.0
    assert (1024, 1024) in _data(cfg).bucket_table().for_batch("t2i", 1)


def _data(cfg):
    from training.data.config import DataConfig

    return DataConfig.from_any(cfg.data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("stage_shards") / "out")
    for subset in ("t2i", "depth", "faceid"):
        S.write(out, subset, [6])
    return out


def _cpu(tmp: Path, shards: str, run_name: str, *extra: str) -> list[str]:
    """The machine's limits only: what a stage trains (mix, tasks, families) is the file's."""
    return [
        "model.config=tiny", "model.compile=false", "model.activation_checkpointing=false",
        "model.param_dtype=float32", "encoders.kind=tiny", "encoders.text_max_length=24",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2",
        f"data.paths={shards}", "data.batch_size=1", "data.num_workers=0",
        "samples.every_n_steps=0", "throughput.every_n_steps=1", "mlflow.system_metrics=false",
        f"runs_dir={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"run_name={run_name}", f"data.faceid_max_views={S.FACE_VIEWS}", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_the_three_stages_chain_each_from_the_last_run_folder(shards, tmp_path):
    """Stage 3 runs at lr 0, so its weights at the end are exactly what it started from:
    stage 2's EMA."""
    from model import NextDiT, get_config
    from training.checkpoint_io import load_weights
    from training.fit import fit

    first = fit(_load(1, *_cpu(tmp_path, shards, "s1", "data.buckets=[[32,32]]")))
    # stage 1's second phase, as its header says: the same run, other buckets, more steps
    one = fit(_load(1, *_cpu(tmp_path, shards, "s1", "resume=s1", "data.buckets=[[48,48]]",
                             "trainer.max_steps=4", "checkpoint.every_n_steps=4")))  # fmt: skip
    assert one.run_dir == first.run_dir and one.global_step == 4
    table = (
        '{default: [[32,32]], text2image: [[48,48]], faceid: {"2-3": [[48,48]], "4-": [[32,32]]}}'
    )
    two = fit(_load(2, *_cpu(tmp_path, shards, "s2", f"model.init_from={one.run_dir}",
                             f"data.buckets={table}")))  # fmt: skip
    report = tmp_path / "report"
    three = fit(_load(3, *_cpu(tmp_path, shards, "s3", f"model.init_from={two.run_dir}",
                               "data.buckets=[[48,48]]", "optim.lr=0.0",
                               f"debug.report_dir={report}")))  # fmt: skip
    runs = [one, two, three]
    assert len({r.run_dir for r in runs}) == 3 and two.global_step == three.global_step == 2
    for prev, nxt, step in ((one, two, 4), (two, three, 2)):
        record = json.loads((Path(nxt.run_dir) / "init_from.json").read_text())
        assert record["kind"] == "checkpoint" and record["weights"] == "ema"
        assert record["source_run_id"] == prev.run_id
        newest = Path(prev.checkpoint_dir) / f"step{step:08d}.ckpt"
        assert record["path"] == str(newest.resolve())
    ema = NextDiT(get_config("tiny"))
    load_weights(Path(two.checkpoint_dir) / "step00000002.ckpt", ema, "ema")
    end = torch.load(report / "end_state.pt", weights_only=True)["model"]
    for name, t in ema.state_dict().items():
        assert torch.equal(end[f"model.{name}"], t), name
