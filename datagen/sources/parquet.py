"""Parquet manifests a user wrote: ``uri`` (and optional ``key``, ``caption``) per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.sources.base import Source, SourceError, manifest_table

# --- parquet manifests ---------------------------------------------------------------------

# Column -> (accepted type test, what to say when it fails).
_COLUMN_TYPES = {
    "key": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "uri": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "caption": (
        lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
        "string",
    ),
    "byte_offset": (lambda t: pa.types.is_integer(t) or pa.types.is_null(t), "integer"),
    "byte_size": (lambda t: pa.types.is_integer(t) or pa.types.is_null(t), "integer"),
}


def _read_parquet(path: str) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=None)
    except FileNotFoundError as exc:
        raise SourceError(f"parquet manifest {path} does not exist") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(
            f"parquet manifest {path} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc


def _checked_column(table: pa.Table, name: str, path: str) -> list[Any] | None:
    """The column as Python values, None if absent; a wrong type (``key`` as
    int64, ``uri`` as binary) is a one-line SourceError, not a traceback later."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    accepts, expected = _COLUMN_TYPES[name]
    if not accepts(column.type):
        raise SourceError(
            f"{path}: manifest column {name!r} has type {column.type}, expected {expected}"
        )
    return column.to_pylist()


def parquet_manifest(path: str) -> pa.Table:
    """A user's manifest: ``key``, ``uri`` and optionally ``caption``,
    ``byte_offset``, ``byte_size``. Its keys are the user's: duplicates are a
    SourceError (renaming them would change what a key means)."""
    table = _read_parquet(path)
    missing = {"key", "uri"} - set(table.column_names)
    if missing:
        raise SourceError(f"{path}: manifest lacks columns {sorted(missing)}")
    columns = {name: _checked_column(table, name, path) for name in _COLUMN_TYPES}
    n = table.num_rows
    rows = [
        {name: values[i] if values is not None else None for name, values in columns.items()}
        for i in range(n)
    ]
    try:
        return manifest_table(rows)
    except (pa.ArrowException, OverflowError) as exc:  # e.g. a uint64 offset beyond int64
        raise SourceError(
            f"{path}: manifest values do not fit: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class ParquetParams:
    kind: Literal["parquet"]
    path: str


class ParquetSource(Source):
    """``source: {kind: parquet, path: ...}``: :func:`parquet_manifest`."""

    kind: ClassVar[str] = "parquet"
    Params: ClassVar[type] = ParquetParams

    @classmethod
    def rows(cls, params: ParquetParams, work_dir: str, seed: int) -> pa.Table:
        return parquet_manifest(params.path)
