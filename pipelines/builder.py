"""Turn a DAG into a Ray Data plan: manifest -> stages -> shard sink.

Consecutive cheap CPU stages with the same resources become one task
``map_batches`` that runs them one after another (and the shard sink too when
they end the DAG), so rows stay Python objects from decode to shard; stages
with an ``actors`` pool become actor ``map_batches`` so a model is loaded once
per actor and can ask for (fractional) GPUs. The sink writes shards from
inside the tasks and emits summary rows only.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import ray.data
from omegaconf import DictConfig

from pipelines import dag
from pipelines.ops import build_op
from pipelines.sink import write_batch
from pipelines.stage import StageFn, stages_task


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
    blocks = [
        rows_table.slice(i, rows_per_block) for i in range(0, rows_table.num_rows, rows_per_block)
    ]
    return ray.data.from_arrow(blocks or [rows_table])


def _task_groups(stages: list[dag.Stage], max_samples: int) -> list[list[dag.Stage]]:
    """Runs of consecutive task stages that ask for the same resources and batch
    size (the stages Ray would fuse into one task anyway); actor stages alone."""
    groups: list[list[dag.Stage]] = []
    for stage in stages:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and not stage.actors
            and not last.actors
            and (stage.num_cpus, stage.num_gpus, stage.batch_size or max_samples)
            == (last.num_cpus, last.num_gpus, last.batch_size or max_samples)
        ):
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def stages_and_sink_task(
    batch: dict[str, Any], *, stages: list[dict[str, Any]], sink: dict[str, Any]
) -> dict[str, Any]:
    """The last cheap stages and the shard writer in one call: no Arrow round
    trip of images and encoded files between them."""
    return write_batch(stages_task(batch, stages=stages), **sink)


def sink_kwargs(cfg: DictConfig, out: str) -> dict[str, Any]:
    """:func:`write_batch`'s arguments, resolved once from the DAG."""
    return {
        "out": out,
        "subsets": dag.subsets(cfg),
        "first_stage": dag.stages(cfg)[0].name,
        "max_samples": int(cfg.shards.max_samples),
        "max_bytes": int(cfg.shards.max_bytes),
    }


def _needs(stage: dag.Stage, first: str) -> tuple[str, ...]:
    """Every stage after the first skips rows whose first stage (decode) failed."""
    return (first,) if stage.name != first else ()


def build(cfg: DictConfig, rows_table: pa.Table, out: str) -> ray.data.Dataset:
    """The whole plan; iterate it to run. ``out`` must be absolute (workers'
    working folders differ from the driver's)."""
    max_samples = int(cfg.shards.max_samples)
    stages = dag.stages(cfg)
    first = stages[0].name
    sink = sink_kwargs(cfg, out)
    ds = process_rows(rows_table, max_samples)
    groups = _task_groups(stages, max_samples)
    sink_done = False
    for i, group in enumerate(groups):
        head = group[0]
        kwargs: dict[str, Any] = {
            "batch_size": head.batch_size or max_samples,
            "batch_format": "numpy",
            "num_cpus": head.num_cpus,
        }
        if head.num_gpus:
            kwargs["num_gpus"] = head.num_gpus
        args = [
            {
                "op_name": s.op,
                "stage": s.name,
                "params": s.params,
                "seed": int(cfg.seed),
                "needs": _needs(s, first),
            }
            for s in group
        ]
        if head.actors:
            ds = ds.map_batches(
                StageFn, fn_constructor_kwargs=args[0], concurrency=head.actors, **kwargs
            )
        elif i == len(groups) - 1 and not head.num_gpus and kwargs["batch_size"] == max_samples:
            ds = ds.map_batches(
                stages_and_sink_task, fn_kwargs={"stages": args, "sink": sink}, **kwargs
            )
            sink_done = True
        else:
            ds = ds.map_batches(stages_task, fn_kwargs={"stages": args}, **kwargs)
    if not sink_done:
        ds = ds.map_batches(
            write_batch,
            fn_kwargs=sink,
            batch_size=max_samples,
            batch_format="numpy",
            num_cpus=stages[-1].num_cpus if not stages[-1].actors else 1,
        )
    if not any(s.actors for s in stages):
        # One task operator whose outputs are a few summary rows: nothing for
        # Ray Data's per-operator resource reservation to balance, and it costs
        # throughput (Ray 2.60, measured on 2 cores): it admits a single task
        # until its first view of the cluster's CPUs (~1 s), and afterwards a
        # freed CPU waits for the executor's next scheduling round (0.15-0.2 s
        # idle per task). Without it, tasks wait in Ray's own queue and each
        # starts the moment a CPU frees. Plans with actor stages keep it: it
        # bounds what upstream stages buffer ahead of a slower model stage.
        # ``ds.context`` is this plan's own copy, not the global DataContext.
        ds.context.op_resource_reservation_enabled = False
    else:
        # An actor stage emits blocks in completion order, and the sink groups
        # whatever arrives into shards: without ordered output the same inputs
        # could land in differently composed (differently named) shards from run
        # to run. Ordered output keeps shard composition a function of the inputs.
        ds.context.execution_options.preserve_order = True
    return ds


def run_in_process(cfg: DictConfig, rows_table: pa.Table, out: str) -> list[dict[str, Any]]:
    """The same plan without Ray: one process, block by block, the same per-row
    work as :func:`build`. The baseline of ``bench/datagen_throughput.py`` and
    a debugging aid (pdb works here)."""
    from pipelines.stage import apply_stages, batch_to_rows, object_column

    max_samples = int(cfg.shards.max_samples)
    stages = dag.stages(cfg)
    first = stages[0].name
    ops = [(build_op(s.op, int(cfg.seed), s.params), s.name, _needs(s, first)) for s in stages]
    sink = sink_kwargs(cfg, out)
    summaries: list[dict[str, Any]] = []
    for start in range(0, rows_table.num_rows, max_samples):
        block = rows_table.slice(start, max_samples).to_pydict()
        batch = {k: object_column(v) for k, v in block.items()}
        summaries.extend(batch_to_rows(write_batch(apply_stages(ops, batch), **sink)))
    return summaries
