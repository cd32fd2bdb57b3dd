"""pipelines.stage: failures are recorded, never dropped; batches keep bytes intact."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from datagen.decode import BadInput
from pipelines.ops import Op
from pipelines.stage import (
    MESSAGE_LIMIT,
    StageFn,
    apply_op,
    batch_to_rows,
    failure_record,
    object_column,
    rows_to_batch,
    stages_task,
)


def _row(key: str, failures: dict | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "key": key,
        "uri": f"/nowhere/{key}.jpg",
        "meta": json.dumps({"source": "test"}),
        "failures": json.dumps(failures or {}),
        "timings": json.dumps({}),
        **extra,
    }


class PickyOp(Op):
    """Doubles ``n``; rejects odd keys with a BadInput, 'boom' keys with a RuntimeError."""

    outputs: ClassVar[dict[str, Any]] = {"doubled": -1, "blob": b"", "arr": None}

    def __init__(self, seed: int = 0, **params: Any):
        super().__init__(seed, **params)
        self.calls: list[str] = []

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(row["key"])
        if row["key"].startswith("boom"):
            raise RuntimeError("exploded " + "x" * 2000)
        if row["n"] % 2:
            raise BadInput("OddNumber", f"{row['n']} is odd")
        return {
            "doubled": 2 * row["n"],
            "blob": bytes([row["n"]]) + b"\x00\x00",
            "arr": np.full((2, 2), row["n"]),
            "meta": {"n": row["n"]},
        }


def test_failures_are_recorded_and_rows_kept():
    rows = [_row("r0", n=0), _row("r1", n=1), _row("boom2", n=2), _row("r4", n=4)]
    op = PickyOp()
    out = apply_op(op, "pick", (), rows)
    assert [r["key"] for r in out] == ["r0", "r1", "boom2", "r4"]  # every row, same order
    assert op.calls == ["r0", "r1", "boom2", "r4"]

    failures = [json.loads(r["failures"]) for r in out]
    assert failures[0] == {} and failures[3] == {}
    assert failures[1] == {"pick": {"error": "OddNumber", "message": "1 is odd"}}
    assert failures[2]["pick"]["error"] == "RuntimeError"
    assert failures[2]["pick"]["message"].startswith("exploded xxx")
    assert len(failures[2]["pick"]["message"]) == MESSAGE_LIMIT

    # declared outputs: computed for good rows, the op's defaults for failed ones
    assert [r["doubled"] for r in out] == [0, -1, -1, 8]
    assert [r["blob"] for r in out] == [b"\x00\x00\x00", b"", b"", b"\x04\x00\x00"]
    assert out[1]["arr"] is None and out[2]["arr"] is None
    assert np.array_equal(out[3]["arr"], np.full((2, 2), 4))

    # meta merged only where the op succeeded
    metas = [json.loads(r["meta"]) for r in out]
    assert metas[0] == {"source": "test", "n": 0}
    assert metas[1] == {"source": "test"} and metas[2] == {"source": "test"}
    assert metas[3] == {"source": "test", "n": 4}

    # every attempted row is timed, failed or not
    for r in out:
        timings = json.loads(r["timings"])
        assert set(timings) == {"pick"} and timings["pick"] >= 0


def test_rows_whose_needed_stage_failed_are_skipped():
    earlier = {"decode": {"error": "CorruptImage", "message": "truncated"}}
    other = {"caption": {"error": "Timeout", "message": "slow"}}
    rows = [
        _row("a", n=2),
        _row("b", failures=earlier, n=4),
        _row("c", failures=other, n=6),
        _row("d", n=3),
    ]
    op = PickyOp()
    out = apply_op(op, "pick", ("decode",), rows)
    assert op.calls == ["a", "c", "d"]  # b's decode failed; c's failure is not a need
    assert len(out) == 4
    b = out[1]
    assert json.loads(b["failures"]) == earlier  # the original failure stays, nothing added
    assert json.loads(b["timings"]) == {}  # not attempted
    assert b["doubled"] == -1 and b["blob"] == b"" and b["arr"] is None
    assert json.loads(out[2]["failures"]) == other
    assert out[2]["doubled"] == 12
    assert set(json.loads(out[3]["failures"])) == {"pick"}


def test_needs_is_any_of_several_stages():
    rows = [
        _row("a", failures={"depth": {"error": "E", "message": "m"}}, n=2),
        _row("b", n=2),
    ]
    op = PickyOp()
    out = apply_op(op, "pick", ("decode", "depth"), rows)
    assert op.calls == ["b"]
    assert [r["doubled"] for r in out] == [-1, 4]


def test_failure_record():
    assert failure_record(BadInput("EmptyFile", "zero bytes")) == {
        "error": "EmptyFile",
        "message": "zero bytes",
    }
    assert failure_record(KeyError("image")) == {"error": "KeyError", "message": "'image'"}
    long = failure_record(BadInput("X", "y" * 10_000))
    assert long["message"] == "y" * MESSAGE_LIMIT


# --- batches -----------------------------------------------------------------------------


def test_rows_batch_round_trip_keeps_trailing_nul_bytes():
    values = [b"abc\x00", b"\x00\x00", b"", b"\xff\xd8\xff\xd9\x00\x00\x00"]
    rows = [{"key": f"k{i}", "data": v, "n": i} for i, v in enumerate(values)]
    batch = rows_to_batch(rows)
    assert all(col.dtype == object for col in batch.values())
    assert len(batch["data"]) == len(values)
    back = batch_to_rows(batch)
    assert [r["data"] for r in back] == values
    assert all(type(r["data"]) is bytes for r in back)
    assert [r["key"] for r in back] == ["k0", "k1", "k2", "k3"]
    assert [r["n"] for r in back] == [0, 1, 2, 3]
    # a plain numpy bytes column would have lost them: this is what the object column avoids
    assert np.array(values)[0] != values[0]


def test_rows_batch_round_trip_ragged_arrays_and_missing_columns():
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    b = np.zeros((5, 1, 3), np.uint8)
    rows = [{"key": "x", "image": a}, {"key": "y", "image": b, "extra": "only here"}]
    batch = rows_to_batch(rows)
    assert list(batch) == ["key", "image", "extra"]
    back = batch_to_rows(batch)
    assert np.array_equal(back[0]["image"], a)
    assert back[1]["image"].shape == (5, 1, 3)
    assert back[0]["extra"] is None and back[1]["extra"] == "only here"


def test_same_shape_arrays_stay_one_object_per_row():
    rows = [{"image": np.full((2, 2, 3), i, np.uint8)} for i in range(3)]
    col = rows_to_batch(rows)["image"]
    assert col.shape == (3,)
    assert [int(v[0, 0, 0]) for v in col] == [0, 1, 2]


def test_object_column_and_empty_batch():
    col = object_column([b"a\x00", None, np.zeros(3)])
    assert col.dtype == object and col.shape == (3,)
    assert col[0] == b"a\x00" and col[1] is None
    assert rows_to_batch([]) == {}
    assert batch_to_rows({}) == []


# --- the callable handed to Ray, run without Ray ------------------------------------------


def test_stage_fn_decode_over_a_batch(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (80, 70), (10, 20, 30)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    rows = [
        {**_row("good"), "uri": str(good), "caption": "c", "byte_offset": None, "byte_size": None},
        {
            **_row("empty"),
            "uri": str(empty),
            "caption": None,
            "byte_offset": None,
            "byte_size": None,
        },
        {
            **_row("gone"),
            "uri": str(tmp_path / "gone.jpg"),
            "caption": None,
            "byte_offset": None,
            "byte_size": None,
        },
    ]
    batch = rows_to_batch(rows)
    for result in (
        StageFn("decode", "decode", {}, 0, ())(batch),
        stages_task(
            batch, stages=[dict(op_name="decode", stage="decode", params={}, seed=0, needs=())]
        ),
    ):
        out = batch_to_rows(result)
        assert [r["key"] for r in out] == ["good", "empty", "gone"]
        assert out[0]["image"].shape == (70, 80, 3)
        assert out[0]["jpg"][:3] == b"\xff\xd8\xff"
        assert json.loads(out[0]["meta"])["width"] == 80
        assert json.loads(out[1]["failures"])["decode"]["error"] == "EmptyFile"
        assert json.loads(out[2]["failures"])["decode"]["error"] == "MissingFile"
        for r in out[1:]:
            assert r["jpg"] == b"" and r["txt"] == b"" and r["image"].shape == (1, 1, 3)


def test_stage_fn_degrade_skips_rows_whose_decode_failed(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    rows = [
        _row("ok", image=image),
        _row(
            "bad",
            failures={"decode": {"error": "EmptyFile", "message": "zero bytes"}},
            image=np.zeros((1, 1, 3), np.uint8),
        ),
    ]
    out = batch_to_rows(StageFn("degrade", "degrade", {}, 5, ("decode",))(rows_to_batch(rows)))
    assert out[0]["canny_png"][:4] == b"\x89PNG" and out[0]["mask_png"][:4] == b"\x89PNG"
    assert "degradations" in json.loads(out[0]["meta"])
    assert all(
        out[1][c] == b""
        for c in ("canny_png", "hed_png", "blur_jpg", "lowres_jpg", "masked_jpg", "mask_png")
    )
    assert json.loads(out[1]["failures"]) == {
        "decode": {"error": "EmptyFile", "message": "zero bytes"}
    }
    assert "degrade" not in json.loads(out[1]["timings"])


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        StageFn("nope", "s", {}, 0, ())
