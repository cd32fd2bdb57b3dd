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
(:mod:`datagen.sources.groups`); a per-view stage runs on each view as if it were an item
(or on view 0 only, ``views_of_group = "first"``: one caption per scene), and the
group fails when any of its views does. A group the source already knows cannot be a
sample (``group_error`` / ``group_filter``) fails at the first stage, named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datagen.io import BadInput
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


def parse_failure(text: str) -> tuple[str, str]:
    """``"Class: message"`` (a source's ``source_error`` / ``group_error``) -> (error, message);
    text without an identifier before ``": "`` is a ``SourceError`` with the whole text."""
    error, sep, message = text.partition(": ")
    if not sep or not error.isidentifier():
        return "SourceError", text
    return error, message


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


def is_group(batch: Mapping[str, Sequence[Any]], i: int) -> bool:
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
