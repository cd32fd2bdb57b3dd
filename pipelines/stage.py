"""Run one op over a batch of rows without ever losing a row.

A row that an op rejects is kept, with the failure recorded under the stage's
name in its ``failures`` column; later stages skip it and the shard writer
turns it into quarantine records. Per-stage seconds go into ``timings`` so
the driver can report per-stage throughput without a second pass.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from datagen.decode import BadInput
from pipelines.ops import Op, build_op

MESSAGE_LIMIT = 500


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    return [{c: batch[c][i] for c in columns} for i in range(n)]


def object_column(values: list[Any]) -> np.ndarray:
    """An object column: keeps bytes intact (no NUL stripping) and ragged arrays."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns: list[str] = []
    for row in rows:
        for c in row:
            if c not in columns:
                columns.append(c)
    return {c: object_column([row.get(c) for row in rows]) for c in columns}


def failure_record(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, BadInput):
        return {"error": exc.error, "message": exc.message[:MESSAGE_LIMIT]}
    return {"error": type(exc).__name__, "message": str(exc)[:MESSAGE_LIMIT]}


def apply_op(
    op: Op, stage: str, needs: tuple[str, ...], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Apply ``op`` to every row whose ``needs`` stages all succeeded."""
    for row in rows:
        failures = json.loads(row["failures"])
        timings = json.loads(row["timings"])
        result: dict[str, Any] = {}
        if not any(n in failures for n in needs):
            start = time.perf_counter()
            try:
                result = op(row)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a quarantine record
                failures[stage] = failure_record(exc)
                result = {}
            timings[stage] = time.perf_counter() - start
        meta_update = result.pop("meta", None)
        if meta_update:
            meta = json.loads(row["meta"])
            meta.update(meta_update)
            row["meta"] = json.dumps(meta)
        for column, default in op.outputs.items():
            row[column] = result.get(column, default)
        row["failures"] = json.dumps(failures)
        row["timings"] = json.dumps(timings)
    return rows


def apply_stages(
    stages: list[tuple[Op, str, tuple[str, ...]]], batch: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``(op, stage, needs)`` after one another over one batch, the rows kept
    as Python objects in between: a decoded image reaches the next stage as
    the same array, not converted to Arrow and back."""
    rows = batch_to_rows(batch)
    for op, stage, needs in stages:
        rows = apply_op(op, stage, needs, rows)
    return rows_to_batch(rows)


class StageFn:
    """The callable handed to ``map_batches``: a task function for cheap CPU
    stages, an actor class for model stages (the op is built once per actor)."""

    def __init__(
        self, op_name: str, stage: str, params: dict[str, Any], seed: int, needs: tuple[str, ...]
    ):
        self.op = build_op(op_name, seed, params)
        self.stage = stage
        self.needs = needs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return apply_stages([(self.op, self.stage, self.needs)], batch)


def stages_task(
    batch: dict[str, np.ndarray], *, stages: list[dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Several cheap stages in one ``map_batches`` call. Ray does fuse
    consecutive ``map_batches`` into one task, but converts each one's output
    batch to an Arrow block and back into numpy for the next (for the demo
    DAG, 20-40 ms per 16-row batch at each boundary, images included); one
    call has no boundary. ``stages``: dicts of :class:`StageFn`'s arguments."""
    ops = [
        (build_op(s["op_name"], int(s["seed"]), s["params"]), s["stage"], tuple(s["needs"]))
        for s in stages
    ]
    return apply_stages(ops, batch)
