"""Turn a DAG into a Ray Data plan: manifest -> stages -> shard sink.

Cheap CPU stages become task ``map_batches`` (Ray fuses consecutive ones into
one task: no serialisation between them); stages with an ``actors`` pool
become actor ``map_batches`` so a model is loaded once per actor and can ask
for (fractional) GPUs. The sink writes shards from inside the tasks and emits
summary rows only.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import ray.data
from omegaconf import DictConfig

from pipelines import dag
from pipelines.sink import write_batch
from pipelines.stage import StageFn, stage_task


def input_rows(manifest: pa.Table, todo: list[list[str]]) -> pa.Table:
    """The manifest plus the bookkeeping columns every stage carries."""
    n = manifest.num_rows
    return (
        manifest.append_column("todo", pa.array([json.dumps(t) for t in todo], pa.string()))
        .append_column("failures", pa.array(["{}"] * n, pa.string()))
        .append_column("timings", pa.array(["{}"] * n, pa.string()))
        .append_column("meta", pa.array(["{}"] * n, pa.string()))
    )


def process_rows(rows_table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    blocks = [rows_table.slice(i, rows_per_block) for i in range(0, rows_table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [rows_table])


def build(cfg: DictConfig, rows_table: pa.Table, out: str) -> ray.data.Dataset:
    """The whole plan; iterate it to run. ``out`` must be absolute (workers'
    working folders differ from the driver's)."""
    max_samples = int(cfg.shards.max_samples)
    stages = dag.stages(cfg)
    first = stages[0].name
    ds = process_rows(rows_table, max_samples)
    for stage in stages:
        needs = (first,) if stage.name != first else ()
        kwargs: dict[str, Any] = {
            "batch_size": stage.batch_size or max_samples,
            "batch_format": "numpy",
            "num_cpus": stage.num_cpus,
        }
        if stage.num_gpus:
            kwargs["num_gpus"] = stage.num_gpus
        args = {"op_name": stage.op, "stage": stage.name, "params": stage.params,
                "seed": int(cfg.seed), "needs": needs}
        if stage.actors:
            ds = ds.map_batches(StageFn, fn_constructor_kwargs=args, concurrency=stage.actors, **kwargs)
        else:
            ds = ds.map_batches(stage_task, fn_kwargs=args, **kwargs)
    return ds.map_batches(
        write_batch,
        fn_kwargs={
            "out": out,
            "subsets": dag.subsets(cfg),
            "first_stage": first,
            "max_samples": max_samples,
            "max_bytes": int(cfg.shards.max_bytes),
        },
        batch_size=max_samples,
        batch_format="numpy",
        num_cpus=stages[-1].num_cpus if not stages[-1].actors else 1,
    )


def run_in_process(cfg: DictConfig, rows_table: pa.Table, out: str) -> list[dict[str, Any]]:
    """The same plan without Ray: one process, block by block. The baseline of
    ``bench/datagen_throughput.py`` and a debugging aid (pdb works here)."""
    from pipelines.stage import batch_to_rows, object_column

    max_samples = int(cfg.shards.max_samples)
    stages = dag.stages(cfg)
    first = stages[0].name
    fns = [StageFn(s.op, s.name, s.params, int(cfg.seed), (first,) if s.name != first else ())
           for s in stages]
    summaries: list[dict[str, Any]] = []
    for start in range(0, rows_table.num_rows, max_samples):
        block = rows_table.slice(start, max_samples).to_pydict()
        batch = {k: object_column(v) for k, v in block.items()}
        for fn in fns:
            batch = fn(batch)
        summaries.extend(batch_to_rows(write_batch(
            batch, out=out, subsets=dag.subsets(cfg), first_stage=first, max_samples=max_samples,
            max_bytes=int(cfg.shards.max_bytes))))
    return summaries

