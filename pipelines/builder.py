"""Turn a DAG into a Ray Data plan: manifest -> stages (in ``needs`` order) -> shard sink.

Consecutive cheap CPU stages with the same resources become one task
``map_batches`` that runs them one after another (and the shard sink too when
they end the DAG), so rows stay Python objects from decode to shard; model stages
(and stages with an ``actors`` pool or GPUs) become actor ``map_batches``, so a
model is loaded once per actor, sees real batches of ``batch_size`` rows and can
ask for fractional GPUs. In-memory ``transient`` columns (the decoded image) never
cross an operator boundary; a stage reading one gets it back from the ``jpg``.
The sink writes shards from inside the tasks and emits summary rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from datagen.stages.decode import images_from_jpg
from datagen.stages.models.common import set_cpu_threads
from datagen.stages.protocol import Stage, batch_len, object_column, todo_column
from datagen.stages.runner import run_stage
from pipelines import dag
from pipelines.sink import write_batch


@dataclass(frozen=True)
class PlannedStage:
    """A stage with what the runner needs besides its spec: the subsets it serves."""

    spec: dag.StageSpec
    subsets: tuple[str, ...]  # a row runs this stage only if one of these is still to do


def planned_stages(what: dag.Dag) -> list[PlannedStage]:
    return [
        PlannedStage(s, tuple(sub.name for sub in what.subsets if s.name in sub.needs))
        for s in what.stages
    ]


def input_rows(manifest: pa.Table, todo: list[list[str]], subset_names: list[str]) -> pa.Table:
    """The manifest plus one ``todo.<subset>`` flag per subset (what each key still owes)."""
    for name in subset_names:
        flags = pa.array([name in t for t in todo], pa.bool_())
        manifest = manifest.append_column(todo_column(name), flags)
    return manifest


def process_rows(rows_table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    blocks = [
        rows_table.slice(i, rows_per_block) for i in range(0, rows_table.num_rows, rows_per_block)
    ]
    return ray.data.from_arrow(blocks or [rows_table])


def run_stages(stages: list[tuple[Stage, PlannedStage]], batch: dict[str, Any]) -> dict[str, Any]:
    """``stages`` one after another over one batch, rows kept as Python objects in
    between (a decoded image reaches the next stage as the same array); the in-memory
    ``transient`` columns are dropped at the end, before anything leaves the task."""
    columns: dict[str, Any] = dict(batch)
    n = batch_len(columns)
    transient: set[str] = set()
    for stage, planned in stages:
        if "image" in stage.reads and "image" not in columns:
            columns["image"] = images_from_jpg(list(columns["jpg"]))
            transient.add("image")
        flags = [columns[todo_column(s)] for s in planned.subsets]
        wanted = [any(bool(f[i]) for f in flags) for i in range(n)]
        out = run_stage(
            stage, columns, name=planned.spec.name, needs=planned.spec.needs, wanted=wanted
        )
        columns.update(out)
        transient.update(stage.transient)
    for c in transient:
        columns.pop(c, None)
    return columns


def to_numpy(columns: dict[str, Any]) -> dict[str, np.ndarray]:
    return {c: v if isinstance(v, np.ndarray) else object_column(v) for c, v in columns.items()}


def _built(stages: list[PlannedStage], seed: int) -> list[tuple[Stage, PlannedStage]]:
    return [(p.spec.build(seed), p) for p in stages]


def stages_task(
    batch: dict[str, np.ndarray], *, stages: list[PlannedStage], seed: int
) -> dict[str, np.ndarray]:
    """Several cheap stages in one ``map_batches`` call. Ray does fuse consecutive
    ``map_batches`` into one task, but converts each one's output batch to an Arrow
    block and back into numpy for the next (for the demo DAG, 20-40 ms per 16-row
    batch at each boundary, images included); one call has no boundary."""
    return to_numpy(run_stages(_built(stages, seed), batch))


def stages_and_sink_task(
    batch: dict[str, Any], *, stages: list[PlannedStage], seed: int, sink: dict[str, Any]
) -> dict[str, Any]:
    """The last cheap stages and the shard writer in one call: no Arrow round
    trip of images and encoded files between them."""
    return write_batch(run_stages(_built(stages, seed), batch), **sink)


class StageActor:
    """An actor of a model stage's pool: the model is set up once, then batches flow."""

    def __init__(self, stages: list[PlannedStage], seed: int):
        if any(p.spec.cls.uses_model for p in stages):
            set_cpu_threads()
        self.stages = _built(stages, seed)
        for stage, _ in self.stages:
            stage.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_numpy(run_stages(self.stages, batch))


def sink_kwargs(what: dag.Dag, out: str) -> dict[str, Any]:
    """:func:`write_batch`'s arguments, from the DAG."""
    return {
        "out": out,
        "subsets": list(what.subsets),
        "stage_names": [s.name for s in what.stages],
        "max_samples": what.shards.max_samples,
        "max_bytes": what.shards.max_bytes,
    }


def _groups(stages: list[PlannedStage], max_samples: int) -> list[list[PlannedStage]]:
    """Runs of consecutive task stages that ask for the same resources and batch size
    (the stages Ray would fuse into one task anyway); actor stages alone."""
    groups: list[list[PlannedStage]] = []
    for planned in stages:
        s = planned.spec
        last = groups[-1][-1].spec if groups else None
        if (
            last is not None
            and not s.actors
            and not last.actors
            and (s.num_cpus, s.num_gpus, s.batch_size or max_samples)
            == (last.num_cpus, last.num_gpus, last.batch_size or max_samples)
        ):
            groups[-1].append(planned)
        else:
            groups.append([planned])
    return groups


def build(what: dag.Dag, rows_table: pa.Table, out: str) -> ray.data.Dataset:
    """The whole plan; iterate it to run. ``out`` must be absolute (workers'
    working folders differ from the driver's)."""
    max_samples, seed = what.shards.max_samples, what.seed
    stages = planned_stages(what)
    sink = sink_kwargs(what, out)
    ds = process_rows(rows_table, max_samples)
    groups = _groups(stages, max_samples)
    sink_done = False
    for i, group in enumerate(groups):
        head = group[0].spec
        kwargs: dict[str, Any] = {
            "batch_size": head.batch_size or max_samples,
            "batch_format": "numpy",
            "num_cpus": head.num_cpus,
        }
        if head.num_gpus:
            kwargs["num_gpus"] = head.num_gpus
        if head.actors:
            lo, hi = head.actors
            ds = ds.map_batches(
                StageActor,
                fn_constructor_kwargs={"stages": group, "seed": seed},
                # What ``concurrency=(lo, hi)`` meant, without its deprecation warning.
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                **kwargs,
            )
        elif i == len(groups) - 1 and not head.num_gpus and kwargs["batch_size"] == max_samples:
            ds = ds.map_batches(
                stages_and_sink_task,
                fn_kwargs={"stages": group, "seed": seed, "sink": sink},
                **kwargs,
            )
            sink_done = True
        else:
            ds = ds.map_batches(stages_task, fn_kwargs={"stages": group, "seed": seed}, **kwargs)
    if not sink_done:
        ds = ds.map_batches(
            write_batch, fn_kwargs=sink, batch_size=max_samples, batch_format="numpy", num_cpus=1
        )
    if not any(p.spec.actors for p in stages):
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


def run_in_process(what: dag.Dag, rows_table: pa.Table, out: str) -> list[dict[str, Any]]:
    """The same plan without Ray: one process, block by block, the same per-row
    work as :func:`build`. The baseline of ``bench/datagen_throughput.py`` and
    a debugging aid (pdb works here)."""
    max_samples = what.shards.max_samples
    built = _built(planned_stages(what), what.seed)
    for stage, _ in built:
        stage.setup()
    sink = sink_kwargs(what, out)
    summaries: list[dict[str, Any]] = []
    for start in range(0, rows_table.num_rows, max_samples):
        block = rows_table.slice(start, max_samples).to_pydict()
        batch = {k: object_column(v) for k, v in block.items()}
        result = write_batch(run_stages(built, batch), **sink)
        n = batch_len(result)
        summaries.extend({c: result[c][i] for c in result} for i in range(n))
    return summaries
