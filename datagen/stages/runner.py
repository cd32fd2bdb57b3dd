"""Running one stage over a Ray batch: rows still alive, groups unrolled into their views,
one bad row isolated from the rest of its batch, and the stage's typed failures and
seconds written back as columns every later stage and the sink read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from datagen.stages.protocol import (
    ERROR,
    FILTERED,
    MESSAGE_LIMIT,
    OK,
    Failure,
    Stage,
    batch_len,
    column_for,
    error_column,
    failure_from,
    is_group,
    is_view_list,
    message_column,
    meta_column,
    parse_failure,
    row_meta,
    seconds_column,
    status_column,
    succeeded,
)


def _one_per_view(value: Any, views: int) -> bool:
    """A column's value for a group row holds one entry per view (Arrow gives per-view
    numbers as numeric arrays), not one value for the whole group (a scene's caption, made
    once from view 0)."""
    return (is_view_list(value) or isinstance(value, np.ndarray)) and len(value) == views


def _units(
    stage: Stage, batch: Mapping[str, Sequence[Any]], rows: list[int]
) -> tuple[dict[str, list[Any]], list[tuple[int, int | None]]]:
    """The stage's input: one unit per item row, one per view of a group row (when the
    stage is per-view), and for each unit its (row, view)."""
    columns = ("key", *[c for c in stage.reads if c != "key"])
    # A source column a group manifest does not have (``caption``: see datagen.sources.groups).
    data = {c: batch[c] if c in batch else [None] * batch_len(batch) for c in columns}
    units: dict[str, list[Any]] = {c: [] for c in columns}
    where: list[tuple[int, int | None]] = []
    for i in rows:
        if stage.per_view and is_group(batch, i):
            first = stage.views_of_group == "first"
            views = int(batch["views"][i])
            for v in range(1 if first else views):
                units["key"].append(f"{batch['key'][i]}-v{v}")
                for c in columns[1:]:
                    value = data[c][i]
                    units[c].append(value[v] if _one_per_view(value, views) else value)
                where.append((i, None if first else v))
        else:
            for c in columns:
                units[c].append(data[c][i])
            where.append((i, None))
    return units, where


def _call(stage: Stage, units: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    """``stage(units)``; when the batched call raises, each unit again on its own, so
    one poisonous input fails its own row, not its batch's neighbours."""
    try:
        return _checked(stage, stage(units), n)
    except Exception:  # noqa: BLE001 - isolated below, unit by unit
        if n == 1:
            raise
    merged: dict[str, list[Any]] = {"failure": [None] * n}
    for j in range(n):
        try:
            one = _checked(stage, stage({c: v[j : j + 1] for c, v in units.items()}), 1)
        except Exception as exc:  # noqa: BLE001 - this unit's failure
            merged["failure"][j] = failure_from(exc)
            continue
        for column, values in one.items():
            merged.setdefault(column, [None] * n)[j] = values[0]
    return merged


def _checked(stage: Stage, out: Mapping[str, Sequence[Any]], n: int) -> dict[str, list[Any]]:
    for column, values in out.items():
        if len(values) != n:
            raise RuntimeError(
                f"stage {stage.name!r} returned {len(values)} values of {column!r} for {n} rows"
            )
    return {c: list(v) for c, v in out.items()}


def _failure(value: Any, stage: Stage) -> Failure | None:
    if value is None:
        return None
    if not isinstance(value, Failure):
        raise TypeError(f"stage {stage.name!r} returned a failure that is not a Failure: {value!r}")
    return value


def _with_read_meta(
    stage: Stage, batch: Mapping[str, Sequence[Any]], needs: Sequence[str], rows: list[int]
) -> Mapping[str, Sequence[Any]]:
    """``batch`` plus a column per metadata key the stage reads (not a column already),
    taken from its needs' metadata on the rows it will see (None elsewhere)."""
    keys = [c for c in stage.reads if c not in batch]
    if not keys or not rows:
        return batch
    extra: dict[str, list[Any]] = {c: [None] * batch_len(batch) for c in keys}
    for i in rows:
        meta = row_meta(batch, needs, i)
        for c in keys:
            extra[c][i] = meta.get(c)
    return {**batch, **extra}


def group_failure(batch: Mapping[str, Sequence[Any]], i: int) -> Failure | None:
    """The failure the source recorded for group row ``i`` (``"Class: message"`` in
    ``group_error`` or ``group_filter``), or None."""
    for column, kind in (("group_error", ERROR), ("group_filter", FILTERED)):
        text = batch[column][i] if column in batch else None
        if isinstance(text, str) and text:
            error, message = parse_failure(text)
            return Failure(kind, error, message[:MESSAGE_LIMIT])
    return None


def run_stage(
    stage: Stage,
    batch: Mapping[str, Sequence[Any]],
    *,
    name: str,
    needs: Sequence[str],
    wanted: Sequence[bool] | None = None,
) -> dict[str, list[Any]]:
    """Run ``stage`` (the DAG's stage ``name``, after the stages ``needs``) over the rows
    of ``batch`` that are ``wanted`` and whose needs succeeded; returns the columns to
    set on the batch: the stage's fields and transient columns (None / empty where
    it did not produce), and its bookkeeping columns."""
    n = batch_len(batch)
    rows = [
        i
        for i in range(n)
        if (wanted is None or wanted[i]) and all(succeeded(batch, s, i) for s in needs)
    ]
    status, error, message = [""] * n, [""] * n, [""] * n
    seconds, meta = [0.0] * n, [""] * n
    if not needs:  # a first stage reports what the source knew about a group
        known = {i: f for i in rows if (f := group_failure(batch, i)) is not None}
        for i, f in known.items():
            status[i], error[i], message[i] = f.kind, f.error, f.message
        rows = [i for i in rows if i not in known]
    batch = _with_read_meta(stage, batch, needs, rows)
    field_cols = [column_for(f) for f in stage.fields()]
    produced: dict[str, list[Any]] = {c: [None] * n for c in (*field_cols, *stage.transient)}
    if rows:
        units, where = _units(stage, batch, rows)
        started = time.perf_counter()
        out = _call(stage, units, len(where))
        per_unit = (time.perf_counter() - started) / len(where)
        none = [None] * len(where)
        failures, metas = out.get("failure", none), out.get("meta", none)
        values = {c: out.get(c, none) for c in produced}
        units_of: dict[int, list[int]] = {}  # row -> its units (one, or one per view)
        for j, (i, _) in enumerate(where):
            units_of.setdefault(i, []).append(j)
            seconds[i] += per_unit
        for i, js in units_of.items():
            failed = next(((j, f) for j in js if (f := _failure(failures[j], stage))), None)
            if failed is not None:
                j, f = failed
                view = where[j][1]
                status[i], error[i] = f.kind, f.error
                message[i] = f.message if view is None else f"view {view}: {f.message}"
                continue
            status[i] = OK
            row_metas = [metas[j] or {} for j in js]
            if where[js[0]][1] is None:  # an item
                for c in produced:
                    produced[c][i] = values[c][js[0]]
                merged = row_metas[0]
            else:  # a group: per-view lists
                for c in produced:
                    produced[c][i] = [values[c][j] for j in js]
                keys = sorted({k for m in row_metas for k in m})
                merged = {k: [m.get(k) for m in row_metas] for k in keys}
            meta[i] = json.dumps(merged, sort_keys=True) if merged else ""
    for c in field_cols:  # bytes columns stay bytes (Arrow binary), also where nothing was made
        produced[c] = [b"" if v is None else v for v in produced[c]]
    return {
        **produced,
        status_column(name): status,
        error_column(name): error,
        message_column(name): message,
        seconds_column(name): seconds,
        meta_column(name): meta,
    }
