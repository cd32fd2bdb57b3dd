"""The last stage: rows -> validated samples per subset -> committed shards.

For each subset a row still owes, the row becomes a sample (every stage the subset
needs succeeded), a quarantine record (the first of those stages that failed, with
its kind: ``error``, or ``filtered`` for an expected non-sample), or a schema
quarantine record (the sample breaks the contract). It returns small summary rows
(counts, shard names, per-stage timings), never payloads, so the driver can report
progress and account for every key.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from datagen.schema import SUBSETS, SchemaError, make_meta, validate_sample
from datagen.shards.write import commit_quarantine, commit_shard, split_shards
from datagen.stages.protocol import (
    ERROR,
    FILTERED,
    MESSAGE_LIMIT,
    batch_len,
    column_for,
    failure_of,
    object_column,
    row_meta,
    seconds_column,
    status_column,
    succeeded,
    todo_column,
)
from pipelines.dag import SubsetSpec

Columns = Mapping[str, Sequence[Any]]


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.dtype == object:
        return None
    data = bytes(value)
    return data or None


def row_source(batch: Columns, i: int) -> str:
    """Where row ``i`` came from: its ``uri``, or a group's ``source`` (its views' uris are a
    list)."""
    if "source" in batch and batch["source"][i]:
        return str(batch["source"][i])
    return str(batch["uri"][i])


def build_sample(
    subset_name: str, needs: Sequence[str], batch: Columns, i: int
) -> dict[str, bytes]:
    """The files of row ``i`` as a sample of ``subset_name`` (its ``needs`` all succeeded)."""
    subset = SUBSETS[subset_name]
    files: dict[str, bytes] = {}
    for f in subset.fields:
        if f.name == "json":
            continue
        value = batch[column_for(f.name)][i] if column_for(f.name) in batch else None
        if f.per_view:
            for v, view in enumerate(value if value is not None else []):
                data = _as_bytes(view)
                if data:
                    files[f.name.replace("{i}", str(v))] = data
        else:
            data = _as_bytes(value)
            if data:
                files[f.name] = data
    meta = row_meta(batch, needs, i)
    extra = {k: meta[k] for k in (*subset.meta_keys, *subset.optional_meta_keys) if k in meta}
    key, uri = str(batch["key"][i]), row_source(batch, i)
    files["json"] = json.dumps(
        make_meta(key, subset_name, uri, list(subset.tasks), **extra), sort_keys=True
    ).encode("utf-8")
    return files


def _record(spec: SubsetSpec, batch: Columns, i: int) -> dict[str, Any] | None:
    """The quarantine record of row ``i`` in ``spec``'s subset, or None when it can be a
    sample: the first needed stage (in run order) that failed."""
    for stage in spec.needs:
        failure = failure_of(batch, stage, i)
        if failure is not None:
            return {
                "stage": stage,
                "kind": failure.kind,
                "error": failure.error,
                "message": failure.message,
            }
        if not succeeded(batch, stage, i):
            raise RuntimeError(
                f"{batch['key'][i]}: stage {stage!r} neither ran nor failed for subset {spec.name}"
            )
    return None


def write_batch(
    batch: dict[str, np.ndarray],
    *,
    out: str,
    subsets: list[SubsetSpec],
    stage_names: list[str],
    max_samples: int,
    max_bytes: int,
) -> dict[str, np.ndarray]:
    order = sorted(range(batch_len(batch)), key=lambda i: str(batch["key"][i]))
    summaries: list[dict[str, Any]] = []
    for spec in subsets:
        samples: list[tuple[str, dict[str, bytes]]] = []
        quarantine: list[dict[str, Any]] = []
        for i in order:
            if not batch[todo_column(spec.name)][i]:
                continue
            key, uri = str(batch["key"][i]), row_source(batch, i)
            base = {"key": key, "uri": uri, "subset": spec.name}
            record = _record(spec, batch, i)
            if record is not None:
                quarantine.append({**base, **record})
                continue
            try:
                files = build_sample(spec.name, spec.needs, batch, i)
                validate_sample(spec.name, {"__key__": key, **files})
            except (SchemaError, TypeError, ValueError) as exc:
                quarantine.append(
                    {
                        **base,
                        "stage": "schema",
                        "kind": ERROR,
                        "error": type(exc).__name__,
                        "message": str(exc)[:MESSAGE_LIMIT],
                    }
                )
                continue
            samples.append((key, files))
        shards = [
            commit_shard(out, spec.name, group)
            for group in split_shards(samples, max_samples, max_bytes)
        ]
        if quarantine:
            commit_quarantine(out, spec.name, quarantine)
        errors = [q for q in quarantine if q["kind"] != FILTERED]
        summaries.append(
            {
                "subset": spec.name,
                "written": len(samples),
                "quarantined": len(errors),
                "filtered": len(quarantine) - len(errors),
                "bytes": sum(s.tar_bytes for s in shards),
                "shards": json.dumps([s.name for s in shards]),
                "errors": json.dumps(Counter(f"{q['stage']}:{q['error']}" for q in quarantine)),
                "stages": "{}",
            }
        )
    summaries.append(
        {
            "subset": "",
            "written": 0,
            "quarantined": 0,
            "filtered": 0,
            "bytes": 0,
            "shards": "[]",
            "errors": "{}",
            "stages": json.dumps(stage_stats(batch, stage_names)),
        }
    )
    return {c: object_column([s[c] for s in summaries]) for c in summaries[0]}


def stage_stats(batch: Columns, stage_names: list[str]) -> dict[str, dict[str, float]]:
    """Per stage: rows it ran on, rows it failed (errors) or filtered, seconds it spent.
    Every stage has an entry (``in`` 0 when nothing of this batch needed it), and ``rows``
    counts the batch's rows, so the driver can count progress from any entry."""
    n = batch_len(batch)
    stats: dict[str, dict[str, float]] = {}
    for stage in stage_names:
        status = batch[status_column(stage)]
        stats[stage] = {
            "rows": n,
            "in": sum(1 for s in status if s),
            "quarantined": sum(1 for s in status if s == ERROR),
            "filtered": sum(1 for s in status if s == FILTERED),
            "seconds": float(sum(batch[seconds_column(stage)])),
        }
    return stats
