"""The Stage protocol: one shape for every labeler, cheap or model-based.

A stage reads some columns of a batch and produces schema fields (``depth.png``)
and metadata keys (``depth_min``). The runner here (no Ray: the builder in
``pipelines`` wraps it into ``map_batches``, benches and tests call it directly)
hands a stage only the rows it should see: rows some still-pending subset needs it
for, whose ``needs`` stages all succeeded. A row the stage cannot label gets a typed
:class:`Failure` (``error``: quarantined; ``filtered``: an expected non-sample, such
as a photo with no person) and is never shown to a stage that needs this one.

Bookkeeping travels in plain typed columns per stage (``<stage>.status``,
``.error``, ``.message``, ``.seconds``, and ``.meta``, the stage's metadata as the
JSON text it will become in the sample's ``json``), so it crosses Arrow blocks
between Ray operators as strings and floats, never as pickled objects.

Rows are items or groups. A group (a scene's views, an identity's images) has a
``views`` count > 0 and holds a list of per-view values in every per-view column
(:mod:`datagen.groups`); a per-view stage runs on each view as if it were an item
(or on view 0 only, ``views_of_group = "first"``: one caption per scene), and the
group fails when any of its views does. A group the source already knows cannot be a
sample (``group_error`` / ``group_filter``) fails at the first stage, named.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datagen.decode import BadInput
from datagen.schema import SUBSETS

ERROR = "error"
FILTERED = "filtered"
OK = "ok"
MESSAGE_LIMIT = 500

# Every field name the schema knows ("jpg", "depth.png", "img{i}.jpg"): what a stage
# ``produces`` is a field when it is one of these, a metadata key otherwise.
SCHEMA_FIELDS: frozenset[str] = frozenset(
    f.name for s in SUBSETS.values() for f in s.fields if f.name != "json"
)
# Columns the source gives every row (datagen.sources): what a first stage can read.
SOURCE_COLUMNS: tuple[str, ...] = (
    "key",
    "uri",
    "caption",
    "byte_offset",
    "byte_size",
    "source_error",
)

Batch = dict[str, Sequence[Any]]


@dataclass(frozen=True)
class Failure:
    """Why one row got no output from a stage. ``kind``: ``error`` (quarantined,
    counted against ``max_error_rate``) or ``filtered`` (an expected outcome,
    reported apart). ``stage`` is filled in by the runner."""

    kind: str
    error: str
    message: str
    stage: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (ERROR, FILTERED):
            raise ValueError(f"failure kind must be {ERROR!r} or {FILTERED!r}, got {self.kind!r}")


class Filtered(Exception):
    """Raised by per-row code: this row is not a sample of this stage's kind."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error, self.message = error, message


def failure_from(exc: BaseException) -> Failure:
    if isinstance(exc, Filtered):
        return Failure(FILTERED, exc.error, exc.message[:MESSAGE_LIMIT])
    if isinstance(exc, BadInput):
        return Failure(ERROR, exc.error, exc.message[:MESSAGE_LIMIT])
    return Failure(ERROR, type(exc).__name__, str(exc)[:MESSAGE_LIMIT])


@dataclass(frozen=True)
class NoParams:
    """Params of a stage that takes none."""


class Stage:
    """Base of every labeler. Subclasses set the class attributes and implement
    ``__call__``; model stages load their model in :meth:`setup` (once per actor),
    never in ``__init__`` (which also runs on the driver to validate the DAG).

    ``__call__(batch)`` gets ``key`` plus the ``reads`` columns, one entry per row
    (per view for groups). A ``reads`` name is a column (a source column, a field or
    transient column of a stage it needs) or a metadata key one of its direct
    ``needs`` produces (``entity_names`` from the caption stage), handed over as the
    decoded value. It returns, one entry per row:

    - a column per produced field (``column_for("depth.png") == "depth_png"``): bytes;
    - ``meta``: a dict of produced metadata keys, merged into the sample's json;
    - ``failure``: a :class:`Failure` or None (rows with a failure produce nothing);
    - any ``transient`` column (an in-memory value for stages fused behind it).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bump when outputs change: recorded in manifests and digests
    needs: ClassVar[tuple[str, ...]] = ()
    # Stages this one runs after, and whose outputs it uses, when the DAG has them (a face
    # check before identities are packed, a VLM caption before a scene is packed).
    optional_needs: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    transient: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False  # model stages run in an actor pool
    per_view: ClassVar[bool] = True  # labels single images: runs on each view of a group
    # On a group: "all" views, or the "first" only (its outputs then belong to the group).
    views_of_group: str = "all"
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None, seed: int = 0):
        self.params = params if params is not None else self.Params()
        self.seed = seed

    @classmethod
    def check_needs(cls, params: Any, needs: dict[str, Any]) -> None:
        """Refuse (``ParamError``) parameters of the stages it needs (by name) that cannot
        give it what it reads; called once on the driver when the DAG is validated."""

    def setup(self) -> None:
        """Load models (offline, from a local path or a tiny config); once per worker."""

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        raise NotImplementedError

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(p for p in cls.produces if p in SCHEMA_FIELDS)

    @classmethod
    def meta_keys(cls) -> tuple[str, ...]:
        return tuple(p for p in cls.produces if p not in SCHEMA_FIELDS)

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Params))


class RowStage(Stage):
    """A stage written one row at a time (cheap CPU work): :meth:`label` returns the
    row's columns and ``meta``, or raises (:class:`Filtered`, ``BadInput``, any
    exception) to fail that row alone."""

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        n = batch_len(batch)
        out: dict[str, list[Any]] = {"failure": [None] * n, "meta": [None] * n}
        for i in range(n):
            try:
                result = self.label({c: batch[c][i] for c in batch})
            except Exception as exc:  # noqa: BLE001 - the row's failure, not the batch's
                out["failure"][i] = failure_from(exc)
                continue
            for column, value in result.items():
                out.setdefault(column, [None] * n)[i] = value
        return out


# -- bookkeeping columns ---------------------------------------------------------------


def column_for(field_name: str) -> str:
    """Row column holding a schema field: ``canny.png`` -> ``canny_png``, ``img{i}.jpg``
    -> ``img_jpg`` (a list of per-view values)."""
    return field_name.replace("{i}", "").replace(".", "_")


def status_column(stage: str) -> str:
    return f"{stage}.status"


def error_column(stage: str) -> str:
    return f"{stage}.error"


def message_column(stage: str) -> str:
    return f"{stage}.message"


def seconds_column(stage: str) -> str:
    return f"{stage}.seconds"


def meta_column(stage: str) -> str:
    return f"{stage}.meta"


def todo_column(subset: str) -> str:
    return f"todo.{subset}"


def batch_len(batch: Mapping[str, Sequence[Any]]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def object_column(values: Sequence[Any]) -> np.ndarray:
    """An object column: keeps bytes intact (no NUL stripping) and ragged arrays."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def failure_of(batch: Mapping[str, Sequence[Any]], stage: str, i: int) -> Failure | None:
    """Row ``i``'s failure at ``stage`` (None if it succeeded or never ran)."""
    status = batch[status_column(stage)][i]
    if status in (ERROR, FILTERED):
        return Failure(
            str(status),
            str(batch[error_column(stage)][i]),
            str(batch[message_column(stage)][i]),
            stage,
        )
    return None


def succeeded(batch: Mapping[str, Sequence[Any]], stage: str, i: int) -> bool:
    return batch[status_column(stage)][i] == OK


def row_meta(batch: Mapping[str, Sequence[Any]], stages: Sequence[str], i: int) -> dict[str, Any]:
    """The metadata row ``i`` got from ``stages``, later stages overriding earlier ones."""
    meta: dict[str, Any] = {}
    for stage in stages:
        text = batch[meta_column(stage)][i]
        if text:
            meta.update(json.loads(text))
    return meta


# -- the runner ----------------------------------------------------------------------


def _is_group(batch: Mapping[str, Sequence[Any]], i: int) -> bool:
    views = batch.get("views")
    return views is not None and int(views[i] or 0) > 0


def is_view_list(value: Any) -> bool:
    """A group's per-view values (a list, or Arrow's object array), not one item's value
    (its bytes, its image array)."""
    return isinstance(value, list | tuple) or (
        isinstance(value, np.ndarray) and value.dtype == object
    )


def view_values(value: Any, views: int) -> list[Any]:
    """A group's per-view metadata as ``views`` entries; None everywhere when there is none
    (the stage making it is not in the DAG) or it was made once for the whole group."""
    return list(value) if is_view_list(value) and len(value) == views else [None] * views


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
    # A source column a group manifest does not have (``caption``: see datagen.groups).
    data = {c: batch[c] if c in batch else [None] * batch_len(batch) for c in columns}
    units: dict[str, list[Any]] = {c: [] for c in columns}
    where: list[tuple[int, int | None]] = []
    for i in rows:
        if stage.per_view and _is_group(batch, i):
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
            error, sep, message = text.partition(": ")
            if not sep or not error.isidentifier():
                error, message = "SourceError", text
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
