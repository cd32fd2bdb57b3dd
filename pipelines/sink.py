"""The last stage: rows -> validated samples per subset -> committed shards.

It returns small summary rows (counts, shard names, per-stage timings),
never payloads, so the driver can report progress and account for every key.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from datagen.schema import SUBSETS, SchemaError, make_meta, validate_sample
from datagen.shards import commit_quarantine, commit_shard, split_shards
from pipelines.dag import SubsetSpec
from pipelines.stage import batch_to_rows, rows_to_batch


def column_for(field_name: str) -> str:
    """Row column holding a schema field: ``canny.png`` -> ``canny_png``."""
    return field_name.replace("{i}", "").replace(".", "_")


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.dtype == object:
        return None
    data = bytes(value)
    return data or None


def build_sample(subset_name: str, row: dict[str, Any]) -> dict[str, bytes]:
    """The files of one sample of ``subset_name`` from a processed row."""
    subset = SUBSETS[subset_name]
    files: dict[str, bytes] = {}
    for f in subset.fields:
        if f.name == "json":
            continue
        value = row.get(column_for(f.name))
        if f.per_view:
            for i, view in enumerate(value if value is not None else []):
                data = _as_bytes(view)
                if data:
                    files[f.name.replace("{i}", str(i))] = data
        else:
            data = _as_bytes(value)
            if data:
                files[f.name] = data
    meta = json.loads(row["meta"])
    extra = {k: meta[k] for k in subset.meta_keys if k in meta}
    files["json"] = json.dumps(
        make_meta(str(row["key"]), subset_name, str(row["uri"]), list(subset.tasks), **extra),
        sort_keys=True,
    ).encode("utf-8")
    return files


def first_failure(
    failures: dict[str, dict[str, str]], first_stage: str, needs: tuple[str, ...]
) -> tuple[str, dict[str, str]] | None:
    for stage in (first_stage, *needs):
        if stage in failures:
            return stage, failures[stage]
    return None


def write_batch(
    batch: dict[str, np.ndarray],
    *,
    out: str,
    subsets: list[SubsetSpec],
    first_stage: str,
    max_samples: int,
    max_bytes: int,
) -> dict[str, np.ndarray]:
    rows = sorted(batch_to_rows(batch), key=lambda r: str(r["key"]))
    summaries: list[dict[str, Any]] = []
    for spec in subsets:
        samples: list[tuple[str, dict[str, bytes]]] = []
        quarantine: list[dict[str, Any]] = []
        for row in rows:
            if spec.name not in json.loads(row["todo"]):
                continue
            key, uri = str(row["key"]), str(row["uri"])
            failed = first_failure(json.loads(row["failures"]), first_stage, spec.needs)
            if failed is not None:
                stage, record = failed
                quarantine.append(
                    {"key": key, "uri": uri, "subset": spec.name, "stage": stage, **record}
                )
                continue
            try:
                files = build_sample(spec.name, row)
                validate_sample(spec.name, {"__key__": key, **files})
            except (SchemaError, TypeError, ValueError) as exc:
                quarantine.append(
                    {
                        "key": key,
                        "uri": uri,
                        "subset": spec.name,
                        "stage": "schema",
                        "error": type(exc).__name__,
                        "message": str(exc)[:500],
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
        summaries.append(
            {
                "subset": spec.name,
                "written": len(samples),
                "quarantined": len(quarantine),
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
            "bytes": 0,
            "shards": "[]",
            "errors": "{}",
            "stages": json.dumps(stage_stats(rows)),
        }
    )
    return rows_to_batch(summaries)


def stage_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage: rows it ran on, rows it rejected, seconds it spent."""
    stats: dict[str, dict[str, float]] = {}
    for row in rows:
        failures = json.loads(row["failures"])
        for stage, seconds in json.loads(row["timings"]).items():
            entry = stats.setdefault(stage, {"in": 0, "quarantined": 0, "seconds": 0.0})
            entry["in"] += 1
            entry["quarantined"] += int(stage in failures)
            entry["seconds"] += seconds
    return stats
