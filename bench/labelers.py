"""Model labelers: the bare batched model loop vs the same labeler in the Ray pipeline.

For depth and for pose, side by side in one run, over the same JPEGs:

  (a) bare      the stage called in-process on batches of ``--batch-size`` rows
                (``datagen.stage.run_stage``: decode of the stored jpg, batched
                inference, rendering), no Ray;
  (b) pipeline  the DAG ``pipelines/<labeler>.yaml`` on a local Ray: read + decode
                tasks, the labeler in an actor pool (one actor, ``--actor-cpus``
                CPUs, the same batch size), the shard sink; as ``onegen datagen run``
                drives it.

Both load the same weights from disk in the real formats (saved here from random-init
models of a mid-size layout, so inference, not overhead, dominates as it does with
real weights). Fixed costs (model load, Ray actor start-up, imports in the actor) are
measured apart: each path runs ``--n`` and ``--n // 4`` images, and the steady-state
rate is the difference of images over the difference of seconds. Target: the
pipeline at >= 0.9x of the bare loop on 2 cores.

Run: ``.venv/bin/python bench/labelers.py [--n 48] [--which depth pose]``
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu_meter import CpuMeter, add_wait_quiet_arg, wait_quiet  # noqa: E402
from workdir import work_folder  # noqa: E402

from datagen import params as P  # noqa: E402
from datagen import shards, sources  # noqa: E402
from datagen.labelers import labeler  # noqa: E402
from datagen.stage import OK, run_stage, status_column  # noqa: E402
from orchestration.ray_runtime import apply_offline_env, init_ray  # noqa: E402
from pipelines import builder, dag  # noqa: E402


def depth_weights(work: Path) -> dict[str, Any]:
    """The DepthAnything-v2-Small layout, random init, saved as ``save_pretrained`` does."""
    from datagen.labelers import depth_model

    folder = depth_model.save_random(
        work / "depth-anything-v2-small-random", depth_model.small_config()
    )
    return {"weights": str(folder), "input_size": 266}


def pose_weights(work: Path) -> dict[str, Any]:
    """YOLO11n (its packaged layout) as ultralytics writes a ``.pt``, and a ViTPose-S
    layout saved as ``save_pretrained`` does; random init both."""
    from datagen.labelers import pose_model as pm

    pt = work / "yolo11n-random.pt"
    pm.save_yolo_checkpoint(pm.build_random_yolo(0), pt)
    folder = work / "vitpose-small-random"
    pm.save_vitpose(*pm.build_vitpose(pm.vitpose_small_config(), 0), folder)
    # The random detector finds a person in every box: held to 4 per image (photos of
    # people hold a few), which keeps ViTPose's share of the work realistic.
    return {"detector_weights": str(pt), "weights": str(folder), "max_people": 4}


LABELERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "depth": depth_weights,
    "pose": pose_weights,
}


def prepare_inputs(work: Path, n: int, max_side: int) -> Path:
    """The demo photos (people included) as a folder of JPEGs."""
    table = sources.demo(str(work / "demo"), n=n, max_side=max_side)
    folder = work / "inputs"
    folder.mkdir(exist_ok=True)
    for key, uri in zip(
        table.column("key").to_pylist(), table.column("uri").to_pylist(), strict=True
    ):
        shutil.copy(uri, folder / f"{key}.jpg")
    return folder


def bare(
    name: str, params: dict[str, Any], jpgs: list[bytes], batch_size: int
) -> tuple[float, int]:
    """(seconds, rows labelled ok): setup, then the stage over batches, in-process."""
    cls = labeler(name)
    start = time.perf_counter()
    stage = cls(P.build(cls.Params, params, name), seed=0)
    stage.setup()
    ok = 0
    for i in range(0, len(jpgs), batch_size):
        chunk = jpgs[i : i + batch_size]
        keys = [f"k{i + j}" for j in range(len(chunk))]
        out = run_stage(stage, {"key": keys, "jpg": chunk}, name=name, needs=())
        ok += sum(1 for s in out[status_column(name)] if s == OK)
    return time.perf_counter() - start, ok


def pipeline(
    name: str, params: dict[str, Any], folder: Path, out: Path, n: int, batch_size: int, cpus: int
) -> tuple[float, int]:
    """(seconds, samples written): the DAG over the first ``n`` inputs on local Ray."""
    overrides = [
        f"output={out}",
        "mlflow.enabled=false",
        f"shards.max_samples={batch_size}",
        f"stages.{name}.resources.batch_size={batch_size}",
        f"stages.{name}.resources.num_cpus={cpus}",
        f"stages.{name}.resources.actors=[1,1]",
        f"stages.{name}.resources.num_gpus=0",
        "stages.decode.resources.num_cpus=0.5",
        *(f"stages.{name}.params.{k}={v}" for k, v in params.items()),
    ]
    cfg = dag.load(
        ROOT / "pipelines" / f"{name}.yaml",
        overrides,
        source={"kind": "folder", "path": str(folder)},
    )
    manifest = sources.image_folder(str(folder)).slice(0, n)
    subsets = [s.name for s in dag.subsets(cfg)]
    rows = builder.input_rows(manifest, [subsets] * manifest.num_rows, subsets)
    start = time.perf_counter()
    for _ in builder.build(cfg, rows, str(out)).iter_rows():
        pass
    seconds = time.perf_counter() - start
    return seconds, shards.read_indexes(str(out), name).num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--actor-cpus", type=int, default=2, help="CPUs (torch threads) of the actor"
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
        for name in args.which:
            params = LABELERS[name](work)
            wait_quiet(args.wait_quiet)
            with CpuMeter() as meter:
                b_small, _ = bare(name, params, jpgs[:small], args.batch_size)
                b_full, b_ok = bare(name, params, jpgs, args.batch_size)
                p_small, _ = pipeline(
                    name,
                    params,
                    folder,
                    work / f"{name}-s",
                    small,
                    args.batch_size,
                    args.actor_cpus,
                )
                p_full, p_ok = pipeline(
                    name,
                    params,
                    folder,
                    work / f"{name}-f",
                    args.n,
                    args.batch_size,
                    args.actor_cpus,
                )
            extra = args.n - small
            bare_rate = extra / max(b_full - b_small, 1e-9)
            pipe_rate = extra / max(p_full - p_small, 1e-9)
            result = {
                "bare_images_per_s": round(bare_rate, 2),
                "pipeline_images_per_s": round(pipe_rate, 2),
                "ratio": round(pipe_rate / bare_rate, 3),
                "bare_s": [round(b_small, 2), round(b_full, 2)],
                "pipeline_s": [round(p_small, 2), round(p_full, 2)],
                "labelled_ok": {"bare": b_ok, "pipeline": p_ok},
                "other_cores": round(meter.other_cores, 2),
            }
            record[name] = result
            print(
                f"{name}: bare {bare_rate:.2f} images/s, pipeline {pipe_rate:.2f} images/s "
                f"-> {pipe_rate / bare_rate:.2f}x (steady state over {extra} images; with "
                f"fixed costs: bare {b_full:.1f}s, pipeline {p_full:.1f}s for {args.n})",
                flush=True,
            )
            if p_ok != b_ok:
                print(f"warning: {name}: bare labelled {b_ok}, the pipeline wrote {p_ok}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
