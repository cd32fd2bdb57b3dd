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


def apply_op(op: Op, stage: str, needs: tuple[str, ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


class StageFn:
    """The callable handed to ``map_batches``: a task function for cheap CPU
    stages, an actor class for model stages (the op is built once per actor)."""

    def __init__(self, op_name: str, stage: str, params: dict[str, Any], seed: int, needs: tuple[str, ...]):
        self.op = build_op(op_name, seed, params)
        self.stage = stage
        self.needs = needs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return rows_to_batch(apply_op(self.op, self.stage, self.needs, batch_to_rows(batch)))


def stage_task(batch: dict[str, np.ndarray], *, op_name: str, stage: str, params: dict[str, Any],
               seed: int, needs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Task form of :class:`StageFn`; cheap ops are rebuilt per batch so Ray can
    fuse consecutive CPU stages into one task with no copies between them."""
    return StageFn(op_name, stage, params, seed, needs)(batch)
