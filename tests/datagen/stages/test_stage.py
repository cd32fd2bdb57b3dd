"""The Stage protocol (datagen.stages.protocol, datagen.stages.runner): who sees which row, typed failures, groups,
batches that isolate a poisonous row, and exact accounting through Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle
import numpy as np
import pytest

from datagen import stages as labelers
from datagen.stages.protocol import (
    ERROR,
    FILTERED,
    OK,
    Failure,
    Filtered,
    RowStage,
    Stage,
    column_for,
    error_column,
    message_column,
    meta_column,
    status_column,
)
from datagen.stages.runner import run_stage
from tests.helpers import REPO, toy_stages


class Doubler(Stage):
    """Batched: doubles ``n``; a batch holding ``n == 13`` raises as a whole."""

    name: ClassVar[str] = "doubler"
    reads: ClassVar[tuple[str, ...]] = ("n",)
    produces: ClassVar[tuple[str, ...]] = ("jpg", "doubled")

    def __init__(self, params: Any = None, seed: int = 0):
        super().__init__(params, seed)
        self.batches: list[list[str]] = []

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        self.batches.append(list(batch["key"]))
        if 13 in list(batch["n"]):
            raise RuntimeError("13 poisons the whole batch")
        return {
            "jpg": [bytes([n]) + b"\x00" for n in batch["n"]],
            "meta": [{"doubled": 2 * n} for n in batch["n"]],
        }


def _batch(keys: list[str], **columns: list[Any]) -> dict[str, Any]:
    return {"key": keys, **columns}


def test_batched_call_sees_only_wanted_rows_whose_needs_succeeded():
    batch = _batch(
        ["a", "b", "c", "d"],
        n=[1, 2, 3, 4],
        **{status_column("decode"): [OK, ERROR, FILTERED, OK]},
    )
    stage = Doubler()
    out = run_stage(
        stage, batch, name="doubler", needs=("decode",), wanted=[True, True, True, False]
    )
    assert stage.batches == [["a"]]  # one batch: b failed, c was filtered, d not wanted
    assert out[status_column("doubler")] == [OK, "", "", ""]
    assert out["jpg"] == [b"\x01\x00", b"", b"", b""]  # bytes stay bytes, NULs kept
    assert json.loads(out[meta_column("doubler")][0]) == {"doubled": 2}


def test_a_poisonous_row_fails_alone():
    stage = Doubler()
    out = run_stage(stage, _batch(["a", "b", "c"], n=[1, 13, 3]), name="doubler", needs=())
    assert out[status_column("doubler")] == [OK, ERROR, OK]
    assert out[error_column("doubler")][1] == "RuntimeError"
    assert "poisons" in out[message_column("doubler")][1]
    assert out["jpg"][0] == b"\x01\x00" and out["jpg"][2] == b"\x03\x00"


class Picky(RowStage):
    name: ClassVar[str] = "picky"
    reads: ClassVar[tuple[str, ...]] = ("n",)
    produces: ClassVar[tuple[str, ...]] = ("txt",)

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["n"] < 0:
            raise Filtered("Negative", f"{row['n']} < 0")
        if row["n"] == 0:
            raise ValueError("zero " + "x" * 2000)
        return {"txt": str(row["n"]).encode()}


def test_row_failures_are_typed_and_messages_bounded():
    out = run_stage(Picky(), _batch(["a", "b", "c"], n=[-1, 0, 5]), name="picky", needs=())
    assert out[status_column("picky")] == [FILTERED, ERROR, OK]
    assert out[error_column("picky")][:2] == ["Negative", "ValueError"]
    assert len(out[message_column("picky")][1]) <= 500
    assert out["txt"] == [b"", b"", b"5"]
    with pytest.raises(ValueError, match="kind"):
        Failure("oops", "E", "m")


def test_groups_run_per_view_and_fail_as_a_whole():
    batch = _batch(["g1", "g2", "item"], n=[[1, 2], [3, -4, 5], 7], views=[2, 3, 0])
    out = run_stage(Picky(), batch, name="picky", needs=())
    assert out[status_column("picky")] == [OK, FILTERED, OK]
    assert out["txt"][0] == [b"1", b"2"] and out["txt"][2] == b"7"
    assert out[message_column("picky")][1] == "view 1: -4 < 0"


def test_a_group_the_source_refused_fails_at_the_first_stage_only():
    """``group_filter`` / ``group_error`` ("Class: message") are reported by a first stage
    without running it on the group; stages with needs never see the row."""
    batch = _batch(
        ["g1", "g2", "g3"],
        n=[[1, 2], [3, 4], [5, 6]],
        views=[2, 2, 2],
        group_filter=[None, "TooFewImages: identity x has 2 images", None],
        group_error=[None, None, "bad text without a class"],
    )
    stage = Doubler()
    out = run_stage(stage, batch, name="doubler", needs=())
    assert out[status_column("doubler")] == [OK, FILTERED, ERROR]
    assert out[error_column("doubler")][1:] == ["TooFewImages", "SourceError"]
    assert out[message_column("doubler")][1] == "identity x has 2 images"
    assert stage.batches == [["g1-v0", "g1-v1"]]
    batch.update(out)
    later = Doubler()
    again = run_stage(later, batch, name="later", needs=("doubler",))
    assert later.batches == [["g1-v0", "g1-v1"]]
    assert again[status_column("later")] == [OK, "", ""]


class FirstView(Doubler):
    """Runs on view 0 of a group only: its output belongs to the group."""

    views_of_group = "first"


def test_first_view_stages_label_the_group_once():
    batch = _batch(["g1", "item"], n=[[3, 4, 5], 7], views=[3, 0])
    stage = FirstView()
    out = run_stage(stage, batch, name="doubler", needs=())
    assert stage.batches == [["g1-v0", "item"]]
    assert out["jpg"] == [b"\x03\x00", b"\x07\x00"]  # one value, not a list per view
    assert json.loads(out[meta_column("doubler")][0]) == {"doubled": 6}


def test_a_value_made_once_per_group_reaches_every_view_whole():
    """A caption of view 0 (one string for the group) read by a per-view stage is handed to
    each view as it is, not indexed into characters."""

    class Reads(Picky):
        reads: ClassVar[tuple[str, ...]] = ("n", "scene_caption")

        def label(self, row: dict[str, Any]) -> dict[str, Any]:
            return {"txt": f"{row['n']}:{row['scene_caption']}".encode()}

    batch = _batch(["g"], n=[[1, 2]], views=[2], scene_caption=["a red cube"])
    out = run_stage(Reads(), batch, name="picky", needs=())
    assert out["txt"] == [[b"1:a red cube", b"2:a red cube"]]


def test_a_source_column_a_group_manifest_lacks_reads_as_none():
    class Reads(Picky):
        reads: ClassVar[tuple[str, ...]] = ("n", "caption")

        def label(self, row: dict[str, Any]) -> dict[str, Any]:
            assert row["caption"] is None
            return super().label(row)

    out = run_stage(Reads(), _batch(["g"], n=[[1, 2]], views=[2]), name="picky", needs=())
    assert out["txt"] == [[b"1", b"2"]]


class Source(Doubler):
    """Doubler reading a source column (what a DAG's first stage can read)."""

    name: ClassVar[str] = "doubler"
    reads: ClassVar[tuple[str, ...]] = ("uri",)


class NameReader(Stage):
    """Reads ``doubled``, a metadata key of the stage it needs, not a column."""

    name: ClassVar[str] = "reader"
    needs: ClassVar[tuple[str, ...]] = ("doubler",)
    reads: ClassVar[tuple[str, ...]] = ("doubled",)
    produces: ClassVar[tuple[str, ...]] = ("halved",)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        return {"meta": [{"halved": d // 2} for d in batch["doubled"]]}


def test_a_stage_reads_metadata_keys_of_its_needs():
    batch: dict[str, Any] = _batch(["a", "b", "c"], n=[1, 13, 4])
    batch.update(run_stage(Doubler(), batch, name="doubler", needs=()))
    assert batch[status_column("doubler")] == [OK, ERROR, OK]
    out = run_stage(NameReader(), batch, name="reader", needs=("doubler",))
    assert out[status_column("reader")] == [OK, "", OK]  # the failed row never runs
    assert [json.loads(m)["halved"] if m else None for m in out[meta_column("reader")]] == [
        1,
        None,
        4,
    ]


def test_dag_checks_metadata_reads_come_from_direct_needs():
    from pipelines import dag

    def spec(cls: type[Stage]) -> dag.StageSpec:
        return dag.StageSpec(cls.name, cls, cls.Params(), cls.needs, 1.0, 0.0, None, None)

    dag._check_reads([spec(Source), spec(NameReader)])

    class Unrelated(NameReader):
        name: ClassVar[str] = "unrelated"
        needs: ClassVar[tuple[str, ...]] = ()

    with pytest.raises(dag.DagError, match=r"stages.unrelated: reads \['doubled'\]"):
        dag._check_reads([spec(Source), spec(Unrelated)])


@dataclass(frozen=True)
class _Strict:
    limit: int = 3


def test_param_names_come_from_the_params_dataclass():
    class WithParams(Stage):
        Params: ClassVar[type] = _Strict

    assert WithParams.param_names() == ("limit",)
    assert WithParams().params == _Strict()


@pytest.fixture
def toy_labelers(monkeypatch):
    """The toy stages as registered labelers; pickled by value so Ray workers need not
    import the tests folder."""
    cloudpickle.register_pickle_by_value(toy_stages)
    monkeypatch.setitem(labelers.LABELERS, "toy_middle", "tests.helpers.toy_stages:MiddleStage")
    monkeypatch.setitem(labelers.LABELERS, "toy_last", "tests.helpers.toy_stages:LastStage")
    yield
    cloudpickle.unregister_pickle_by_value(toy_stages)


def _toy_dag(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(
        f"""
name: toy
source: {{kind: demo, n: 12, max_side: 96, cache_dir: {tmp_path / "inputs"}}}
output: {tmp_path / "out"}
max_error_rate: 1.0
shards: {{max_samples: 4}}
stages:
  - name: decode
    params: {{min_side: 16}}
  - name: toy_middle
    params: {{fail_every: 3, filter_every: 4}}
    resources: {{actors: [1, 1], num_cpus: 0.5, batch_size: 4}}
  - name: toy_last
subsets: [t2i, i2i]
mlflow: {{tracking_uri: "sqlite:///{tmp_path / "mlflow.db"}"}}
"""
    )
    return path


@pytest.mark.slow
def test_three_stages_middle_one_failing_keep_exact_accounting(ray_local, toy_labelers, tmp_path):
    """decode -> toy_middle (an actor pool; errors on n % 3 == 1, filters n % 4 == 2) ->
    toy_last (raises if it ever sees a rejected row): t2i does not need toy_middle,
    i2i does; every key lands exactly once in each."""
    from datagen import shards
    from orchestration.datagen_job import run
    from pipelines import dag

    cfg = dag.load(_toy_dag(tmp_path))
    assert [s.needs for s in cfg.subsets] == [
        ("decode",),
        ("decode", "toy_middle", "toy_last"),
    ]
    result = run(cfg, log=lambda *_: None)
    numbers = range(12)
    errors = {n for n in numbers if n % 3 == 1}
    filtered = {n for n in numbers if n % 4 == 2 and n not in errors}
    i2i = result.subsets["i2i"]
    assert (i2i["written"], i2i["quarantined"], i2i["filtered"]) == (
        12 - len(errors) - len(filtered),
        len(errors),
        len(filtered),
    )
    assert not i2i["problems"]
    assert (result.subsets["t2i"]["written"], result.subsets["t2i"]["quarantined"]) == (12, 0)
    out = Path(result.output)
    q = shards.read_quarantine(str(out), "i2i").to_pylist()
    assert {(r["key"], r["stage"], r["kind"]) for r in q} == {
        *((f"demo_{n:06d}", "toy_middle", ERROR) for n in errors),
        *((f"demo_{n:06d}", "toy_middle", FILTERED) for n in filtered),
    }
    written = {
        k
        for tar in (out / "i2i").glob("*.tar")
        for k, _ in shards.read_tar_samples(tar.read_bytes())
    }
    assert written == {f"demo_{n:06d}" for n in numbers} - {
        f"demo_{n:06d}" for n in errors | filtered
    }
    assert shards.verify(str(out)).ok
    # The rejected rows' failures rate only errors against max_error_rate.
    assert result.error_rate == pytest.approx(len(errors) / 24)


def test_unknown_stage_parameter_fails_before_anything_is_written(tmp_path, capsys):
    from orchestration.cli import main as cli

    out = tmp_path / "never"
    code = cli(
        [
            "datagen",
            "run",
            str(REPO / "pipelines" / "demo.yaml"),
            "--output",
            str(out),
            "stages.degrade.params.canny_hi=3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "stages.degrade.params.canny_hi: unknown key 'canny_hi'; did you mean 'canny_high'?" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_field_columns():
    assert column_for("depth.png") == "depth_png" and column_for("img{i}.jpg") == "img_jpg"
    assert np.asarray(run_stage(Picky(), _batch([], n=[]), name="picky", needs=())["txt"]).size == 0
