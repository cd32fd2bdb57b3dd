"""Model labelers: the bare batched model loop vs the same labeler in the Ray pipeline.

For depth, pose, caption and segment, side by side in one run, over the same JPEGs:

  (a) bare      the labeler called in-process on batches of ``--batch-size`` rows
                (``datagen.stages.runner.run_stage``: decode of the stored jpg, batched
                inference, rendering), no Ray;
  (b) pipeline  the labeler's DAG on a local Ray: read + decode tasks, the labeler in
                an actor pool (one actor, ``--actor-cpus`` CPUs, the same batch size),
                the shard sink; as ``onegen datagen run`` drives it. The DAGs (file and
                subset share the name): ``pipelines/depth.yaml``, ``pose.yaml``,
                ``t2i.yaml`` (caption), ``semantic.yaml`` (segment); only the labeler's
                subset is to do.

Both paths build their stages from the same loaded DAG (the same parameters) and load
the same weights from disk in the real formats, saved here from random-init models of
mid-size layouts, so inference, not overhead, dominates as it does with real weights:
DepthAnything-v2-Small; YOLO11n + ViTPose-S; a ~23M-parameter LLaVA-NeXT (a 32-token
caption and a 16-token entity list per image); a ~12M-parameter Grounding DINO and an
~8M-parameter SAM (see :func:`segment_weights`). Fixed costs (model load, Ray actor
start-up, imports in the actor) are measured apart: each path runs ``--n`` and
``--n // 4`` images, and the steady-state rate is the difference of images over the
difference of seconds; an untimed model-free DAG runs first, so that the first
labeler's pipeline runs do not pay for Ray Data's own start-up. Target: the pipeline at
>= 0.9x of the bare loop on 2 cores.

Segment grounds the entity list of the caption stage it needs. A random VLM's lists are
word salad of varying length (often none, and the row is filtered), so to give both
paths the same, realistic detector and SAM work:

- every input row carries a fixed ``entity_names`` column (:data:`ENTITIES`), which the
  runner hands to the segment stage in place of the caption's metadata key of that name
  (``datagen.stages.runner.run_stage``: a name a stage reads that is a column already is read
  from the column, not from its needs' metadata);
- the caption stage still runs on both paths (the pipeline cannot skip a stage segment
  needs), as the random-tiny VLM asked for one token per question; in the pipeline its
  actor has half a CPU. It is ~3% of the stage seconds, on both sides.

So the segment entry compares tiny caption + segment, bare vs pipeline: the same work on
both sides, nearly all of it segment's. ``stage_s`` (seconds inside each model stage,
as the runner books them; the pipeline's sink reports them) shows the split and the
stage's own speed in and out of Ray, and ``boxes_per_image`` (read back from the samples
each path made) shows that both paths grounded and segmented the same boxes.

Run: ``.venv/bin/python bench/labelers.py [--n 48] [--which depth pose caption segment]``
(all four by default: about 8-9 minutes on 2 idle cores, most of it caption, pose and
segment; ``--which`` picks some.)
The last line printed is a JSON record: ``{"bench": "labelers", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu_meter import CpuMeter, add_wait_quiet_arg, wait_quiet  # noqa: E402
from workdir import work_folder  # noqa: E402

from datagen import shards  # noqa: E402
from datagen.sources.demo import demo as demo_source  # noqa: E402
from datagen.sources.folders import image_folder  # noqa: E402
from datagen.stages.protocol import OK, meta_column, seconds_column, status_column  # noqa: E402
from datagen.stages.runner import run_stage  # noqa: E402
from orchestration.ray_runtime import apply_offline_env, init_ray  # noqa: E402
from pipelines import builder, dag  # noqa: E402

ENTITIES = ["person", "dog", "car"]  # the entity list segment grounds on every image


def depth_weights(work: Path) -> dict[str, Any]:
    """The DepthAnything-v2-Small layout, random init, saved as ``save_pretrained`` does."""
    from datagen.stages.models.tiny import depth as depth_model

    folder = depth_model.save_random(
        work / "depth-anything-v2-small-random", depth_model.small_config()
    )
    return {"weights": str(folder), "input_size": 266}


def pose_weights(work: Path) -> dict[str, Any]:
    """YOLO11n (its packaged layout) as ultralytics writes a ``.pt``, and a ViTPose-S
    layout saved as ``save_pretrained`` does; random init both."""
    from datagen.stages.models import pose as pm
    from datagen.stages.models.tiny import pose as tiny_pose

    pt = work / "yolo11n-random.pt"
    tiny_pose.save_yolo_checkpoint(tiny_pose.build_random_yolo(0), pt)
    folder = work / "vitpose-small-random"
    model = tiny_pose.build_random_vitpose(tiny_pose.vitpose_small_config(), 0)
    tiny_pose.save_vitpose(model, pm.processor_for(model.config), folder)
    # The random detector finds a person in every box: held to 4 per image (photos of
    # people hold a few), which keeps ViTPose's share of the work realistic.
    return {"detector_weights": str(pt), "weights": str(folder), "max_people": 4}


def caption_weights(work: Path) -> dict[str, Any]:
    """The ~23M-parameter LLaVA-NeXT layout (CLIP tower + Llama, anyres tiles of 64
    tokens), random init, saved as ``save_pretrained`` does; asked both questions, as the
    semantic DAG does (t2i.yaml skips the entity list), each answer held to a few words,
    and at most 300 image tokens per image (the base image + up to 3 tiles: the 2x2 grid
    would double the prefill, the bulk of the work, and the bench's run time)."""
    from datagen.stages.caption import ENTITY_PROMPT
    from datagen.stages.models.tiny import caption as caption_model

    folder = caption_model.save_random(work / "llava-next-mid-random", size="mid")
    return {
        "weights": str(folder),
        "entity_prompt": ENTITY_PROMPT,
        "max_new_tokens": 32,
        "entity_max_new_tokens": 16,
        "max_image_tokens": 300,
    }


def segment_weights(work: Path) -> dict[str, Any]:
    """The mid Grounding DINO above, its processor at 320 / 533 px (the released 800 /
    1333, scaled), saved as ``save_pretrained`` does, and an ~8M-parameter SAM (ViT 256
    wide, 4 blocks, two of them global, 384 px input: the inputs' long side; the released
    mask decoder) as the official ``.pth``; random init both. The random detector finds
    every phrase, ``max_per_entity`` (3) boxes each: 9 boxes per image for
    :data:`ENTITIES`, each decoded by SAM."""
    from datagen.stages.models.sam_arch import SamArch
    from datagen.stages.models.tiny import grounding as grounding_model
    from datagen.stages.models.tiny import sam as sam_model

    folder = grounding_model.save_random_grounder(
        work / "grounding-dino-mid-random",
        config=grounding_model.mid_grounder_config(),
        processor=grounding_model.grounder_processor(320, 533),
    )
    arch = SamArch(embed_dim=256, depth=4, num_heads=8, global_attn_indexes=(1, 3), img_size=384)
    pth = sam_model.save_random_sam(work / "sam-mid-random.pth", arch)
    return {"detector_weights": str(folder), "weights": str(pth)}


def tiny_caption(work: Path) -> dict[str, dict[str, Any]]:
    """The caption stage segment needs, at a token's cost (its entity list is not used:
    :data:`ENTITIES` is)."""
    return {
        "caption": {
            "weights": "random-tiny",
            "max_new_tokens": 1,
            "entity_max_new_tokens": 1,
            "min_words": 0,
        }
    }


def boxes(meta: dict[str, Any]) -> int:
    """Boxes in a segment sample's metadata (all its entities')."""
    return sum(len(e["boxes"]) for e in meta.get("entities", []))


@dataclass(frozen=True)
class Case:
    """How one labeler is benched: its parameters (weights saved under the work folder),
    its DAG (``pipelines/<dag>.yaml``, subset ``dag``), the parameters of the model stages
    between decode and it (``upstream``; their actors get ``upstream_cpus``), columns every
    input row carries on both paths, and a count of work per sample to check both paths
    did the same (``work``: its name and how to read it from the sample's metadata)."""

    weights: Callable[[Path], dict[str, Any]]
    dag: str
    upstream: Callable[[Path], dict[str, dict[str, Any]]] | None = None
    upstream_cpus: float = 0.5
    columns: dict[str, Any] = field(default_factory=dict)
    work: tuple[str, Callable[[dict[str, Any]], int]] | None = None


LABELERS: dict[str, Case] = {
    "depth": Case(depth_weights, "depth"),
    "pose": Case(pose_weights, "pose"),
    "caption": Case(caption_weights, "t2i"),
    "segment": Case(
        segment_weights,
        "semantic",
        upstream=tiny_caption,
        columns={"entity_names": ENTITIES},
        work=("boxes", boxes),
    ),
}


def prepare_inputs(work: Path, n: int, max_side: int) -> Path:
    """The demo photos (people included) as a folder of JPEGs."""
    table = demo_source(str(work / "demo"), n=n, max_side=max_side)
    folder = work / "inputs"
    folder.mkdir(exist_ok=True)
    for key, uri in zip(
        table.column("key").to_pylist(), table.column("uri").to_pylist(), strict=True
    ):
        shutil.copy(uri, folder / f"{key}.jpg")
    return folder


def load_dag(
    name: str,
    params: dict[str, dict[str, Any]],
    case: Case,
    folder: Path,
    out: Path,
    batch_size: int,
    cpus: int,
) -> dag.Dag:
    """The labeler's DAG with the bench's weights, batch size and resources (one actor per
    model stage, no GPU): what both paths build their stages from."""
    overrides = [f"output={out}", "mlflow.enabled=false", f"shards.max_samples={batch_size}"]
    for stage, values in params.items():
        overrides += [
            f"stages.{stage}.resources.batch_size={batch_size}",
            f"stages.{stage}.resources.num_cpus={cpus if stage == name else case.upstream_cpus}",
            f"stages.{stage}.resources.actors=[1,1]",
            f"stages.{stage}.resources.num_gpus=0",
            *(f"stages.{stage}.params.{k}={json.dumps(v)}" for k, v in values.items()),
        ]
    overrides.append("stages.decode.resources.num_cpus=0.5")
    return dag.load(
        ROOT / "pipelines" / f"{case.dag}.yaml",
        overrides,
        source={"kind": "folder", "path": str(folder)},
    )


def warm_up(folder: Path, out: Path, n: int) -> None:
    """A DAG without models (``captioned.yaml``, decode only) over ``n`` inputs, untimed:
    the first Ray Data run of a process pays for what later ones find ready (Ray Data's
    own actors, the pipeline code imported in the task workers), which would otherwise
    count as the first labeler's steady-state seconds (a fixed cost of its small run
    only)."""
    cfg = dag.load(
        ROOT / "pipelines" / "captioned.yaml",
        [f"output={out}", "mlflow.enabled=false", "stages.decode.resources.num_cpus=0.5"],
        source={"kind": "folder", "path": str(folder)},
    )
    rows = builder.input_rows(
        image_folder(str(folder)).slice(0, n),
        [["t2i"]] * n,
        cfg.subset_names,
    )
    for _ in builder.build(cfg, rows, str(out)).iter_rows():
        pass


def bare(
    cfg: dag.Dag, name: str, jpgs: list[bytes], columns: dict[str, Any], batch_size: int
) -> tuple[float, int, dict[str, float], list[dict[str, Any]]]:
    """(seconds, rows labelled ok, seconds per stage, metadata of the ok rows): setup, then
    the DAG's model stages one after another over batches, in-process."""
    specs = [s for s in cfg.stages if s.cls.uses_model]
    start = time.perf_counter()
    stages = [(s, s.build(cfg.seed)) for s in specs]
    for _, stage in stages:
        stage.setup()
    ok, metas = 0, []
    stage_s = dict.fromkeys((s.name for s in specs), 0.0)
    for i in range(0, len(jpgs), batch_size):
        chunk = jpgs[i : i + batch_size]
        batch: dict[str, list[Any]] = {
            "key": [f"k{i + j}" for j in range(len(chunk))],
            "jpg": chunk,
            "caption": [None] * len(chunk),
            **{c: [v] * len(chunk) for c, v in columns.items()},
        }
        ran: list[str] = []
        for spec, stage in stages:
            needs = tuple(s for s in spec.needs if s in ran)
            batch.update(run_stage(stage, batch, name=spec.name, needs=needs))
            stage_s[spec.name] += sum(batch[seconds_column(spec.name)])
            ran.append(spec.name)
        for status, meta in zip(batch[status_column(name)], batch[meta_column(name)], strict=True):
            if status == OK:
                ok += 1
                metas.append(json.loads(meta) if meta else {})
    return time.perf_counter() - start, ok, stage_s, metas


def pipeline(
    cfg: dag.Dag, subset: str, folder: Path, n: int, columns: dict[str, Any]
) -> tuple[float, int, dict[str, float], list[dict[str, Any]]]:
    """(seconds, samples written, seconds per stage, metadata of the samples): the DAG
    over the first ``n`` inputs on local Ray, only ``subset`` to do."""
    out = cfg.output
    manifest = image_folder(str(folder)).slice(0, n)
    for column, value in columns.items():
        manifest = manifest.append_column(column, pa.array([value] * manifest.num_rows))
    names = cfg.subset_names
    rows = builder.input_rows(manifest, [[subset]] * manifest.num_rows, names)
    stage_s: dict[str, float] = {}
    start = time.perf_counter()
    for row in builder.build(cfg, rows, out).iter_rows():
        for stage, stats in json.loads(row["stages"]).items():
            stage_s[stage] = stage_s.get(stage, 0.0) + stats["seconds"]
    seconds = time.perf_counter() - start
    metas = [
        json.loads(files["json"])
        for tar in sorted(Path(out, subset).glob("*.tar"))
        for _, files in shards.read_tar_samples(tar.read_bytes())
    ]
    return seconds, shards.read_indexes(out, subset).num_rows, stage_s, metas


def measure(
    name: str, work: Path, folder: Path, jpgs: list[bytes], small: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One labeler, both paths, ``small`` and all inputs each: its record entry."""
    case = LABELERS[name]
    params = {**(case.upstream(work) if case.upstream else {}), name: case.weights(work)}
    dag_to = partial(
        load_dag, name, params, case, folder, batch_size=args.batch_size, cpus=args.actor_cpus
    )
    bare_cfg = dag_to(work / f"{name}-b")
    wait_quiet(args.wait_quiet)
    with CpuMeter() as meter:
        b_small, *_ = bare(bare_cfg, name, jpgs[:small], case.columns, args.batch_size)
        b_full, b_ok, b_stage_s, b_meta = bare(bare_cfg, name, jpgs, case.columns, args.batch_size)
        p_small, *_ = pipeline(dag_to(work / f"{name}-s"), case.dag, folder, small, case.columns)
        p_full, p_ok, p_stage_s, p_meta = pipeline(
            dag_to(work / f"{name}-f"), case.dag, folder, args.n, case.columns
        )
    extra = args.n - small
    bare_rate = extra / max(b_full - b_small, 1e-9)
    pipe_rate = extra / max(p_full - p_small, 1e-9)
    result: dict[str, Any] = {
        "bare_images_per_s": round(bare_rate, 2),
        "pipeline_images_per_s": round(pipe_rate, 2),
        "ratio": round(pipe_rate / bare_rate, 3),
        "bare_s": [round(b_small, 2), round(b_full, 2)],
        "pipeline_s": [round(p_small, 2), round(p_full, 2)],
        "labelled_ok": {"bare": b_ok, "pipeline": p_ok},
        # seconds inside each model stage (all inputs), as the runner books them
        "stage_s": {
            "bare": {s: round(v, 2) for s, v in b_stage_s.items()},
            "pipeline": {s: round(p_stage_s.get(s, 0.0), 2) for s in b_stage_s},
        },
        "other_cores": round(meter.other_cores, 2),
    }
    note, warnings = "", []
    if p_ok != b_ok:
        warnings.append(f"warning: {name}: bare labelled {b_ok}, the pipeline wrote {p_ok}")
    if case.work is not None:
        what, count = case.work
        per_image = {
            side: round(sum(map(count, metas)) / max(len(metas), 1), 2)
            for side, metas in (("bare", b_meta), ("pipeline", p_meta))
        }
        result[f"{what}_per_image"] = per_image
        note = f"; {what} per image: bare {per_image['bare']}, pipeline {per_image['pipeline']}"
        if per_image["bare"] != per_image["pipeline"]:
            warnings.append(f"warning: {name}: the two paths did different work ({what})")
    print(
        f"{name}: bare {bare_rate:.2f} images/s, pipeline {pipe_rate:.2f} images/s "
        f"-> {pipe_rate / bare_rate:.2f}x (steady state over {extra} images; with "
        f"fixed costs: bare {b_full:.1f}s, pipeline {p_full:.1f}s for {args.n}{note})",
        flush=True,
    )
    for line in warnings:
        print(line)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--actor-cpus", type=int, default=2, help="CPUs (torch threads) of the labeler's actor"
    )
    parser.add_argument("--which", nargs="+", default=list(LABELERS), choices=list(LABELERS))
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    add_wait_quiet_arg(parser)
    args = parser.parse_args()
    apply_offline_env()
    small = max(args.batch_size, args.n // 4)
    record: dict[str, Any] = {"bench": "labelers", "n": args.n, "cores": os.cpu_count()}
    with work_folder(args.work, keep=args.keep, prefix="onegen-bench-labelers-") as work:
        folder = prepare_inputs(work, args.n, args.max_side)
        jpgs = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
        init_ray(num_cpus=4, quiet=True)
        warm_up(folder, work / "warm-up", small)
        for name in args.which:
            record[name] = measure(name, work, folder, jpgs, small, args)
    record["ratios"] = {name: record[name]["ratio"] for name in args.which}
    print(
        "pipeline / bare (target >= 0.9): "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in record["ratios"].items())
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
