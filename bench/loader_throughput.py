"""Training loader throughput: OneGenDataModule vs bare tar read + decode, same shards.

Shards: the no-model DAG (``pipelines/captioned.yaml``: t2i and i2i) written in-process
with ``pipelines.builder.run_in_process`` into a temp folder (no Ray).

Paths, each with 1 and 2 DataLoader worker processes, measured side by side
in one run (alternating order, best of ``--repeats``):

  loader      ``OneGenDataModule`` (default mix t2i/i2i 50/50, buckets
              256x256 / 256x384 / 384x256): windowed byte-range reads, schema
              check, task/prompt, decode, resize-to-cover + crop, float
              [-1, 1] batches ``[B, V, 3, H, W]`` shipped to the main process.
  bare-all    plain ``tarfile`` iteration over every tar of both subsets,
              ``cv2.imdecode`` of EVERY image field (t2i: 1, i2i: 6), no resize,
              nothing shipped but a count. The baseline the target refers to.
  bare-used   the same, decoding only what the loader uses per sample (the
              image + one condition for i2i, cycling through the four
              condition fields): a stricter baseline, reported alongside.

Rates are samples per second (a loader sample is a training-ready sample,
all its views), timed in steady state: worker start-up and the prefetched
backlog are consumed before the clock starts. Ratio = loader / baseline at
the same worker count. Target: loader >= 0.85x bare-all. Also printed: CPU
milliseconds per sample of this process tree, which holds steadier than wall
time when other processes share the cores (flagged in the output).

Run: ``.venv/bin/python bench/loader_throughput.py [--n 240] [--batch-size 16] [--repeats 3]``
The last line printed is a JSON record: ``{"bench": "loader_throughput", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from cpu_meter import CpuMeter, add_wait_quiet_arg, wait_quiet  # noqa: E402  (bench/ is on sys.path)
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402
from workdir import work_folder  # noqa: E402

from datagen import shards  # noqa: E402
from datagen.sources.demo import demo as demo_source  # noqa: E402
from pipelines import builder, dag  # noqa: E402
from training.data.datamodule import OneGenDataModule  # noqa: E402

DAG = ROOT / "pipelines" / "captioned.yaml"
IMAGE_EXTS = ("jpg", "jpeg", "png")
I2I_CONDITIONS = ("canny.png", "hed.png", "blur.jpg", "masked.jpg")
PREFETCH = (
    2  # DataLoader prefetch_factor of every path; the backlog it builds is skipped before timing
)


# --- the bare baseline -----------------------------------------------------------------------


def _decode(data: bytes, name: str) -> np.ndarray:
    flags = cv2.IMREAD_COLOR if name.rsplit(".", 1)[-1] in ("jpg", "jpeg") else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError(f"{name}: does not decode")
    return img


class BareTars(IterableDataset):
    """Worker w reads tars w, w+W, ... with tarfile and decodes image fields;
    yields one int (the sample's decoded pixel count) per sample."""

    def __init__(self, tars: list[str], mode: str):
        super().__init__()
        self.tars, self.mode = tars, mode

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        i2i_turn = 0
        for path in self.tars[w::n]:
            with tarfile.open(path, mode="r:") as tar:
                current, files = None, {}
                for member in [*tar, None]:
                    key = None if member is None else member.name.partition(".")[0]
                    if key != current and current is not None:
                        yield self._sample(files, i2i_turn)
                        i2i_turn += 1
                        files = {}
                    if member is None:
                        break
                    current = key
                    files[member.name.partition(".")[2]] = tar.extractfile(member).read()

    def _sample(self, files: dict[str, bytes], turn: int) -> int:
        names = [f for f in files if f.rsplit(".", 1)[-1] in IMAGE_EXTS]
        if self.mode == "used":
            conds = [c for c in I2I_CONDITIONS if c in files]
            names = ["jpg"] + ([conds[turn % len(conds)]] if conds else [])
        return sum(_decode(files[f], f).size for f in names)


def run_bare(tars: list[str], mode: str, workers: int, total: int) -> tuple[float, int, CpuMeter]:
    loader = DataLoader(
        BareTars(tars, mode),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
    )
    it = iter(loader)
    skip = (PREFETCH + 1) * max(1, workers)  # start-up and the prefetched backlog, not timed
    for _ in range(skip):
        next(it)
    meter = CpuMeter().start()
    count = 0
    for _ in range(total - skip):  # stop before the workers exit, so their CPU time is counted
        next(it)
        count += 1
    meter.stop()
    if next(it, None) is not None:
        raise RuntimeError("the tars hold more samples than their manifests say")
    return count / meter.wall, count, meter


# --- the loader ------------------------------------------------------------------------------


def run_loader(
    out: str, workers: int, batch_size: int, batches: int, seed: int
) -> tuple[float, int, CpuMeter]:
    dm = OneGenDataModule(
        {
            "paths": out,
            "batch_size": batch_size,
            "num_workers": workers,
            "seed": seed,
            "prefetch_factor": PREFETCH,
            "persistent_workers": False,
            "caption_dropout": 0.1,
        }
    )
    dm.setup()
    it = iter(dm.loader())
    for _ in range(
        (PREFETCH + 1) * max(1, workers)
    ):  # start-up and the prefetched backlog, not timed
        next(it)
    meter = CpuMeter().start()
    samples, skipped = 0, 0
    for _ in range(batches):
        batch = next(it)
        samples += batch["pixels"].shape[0]
        skipped += batch["skipped"]
    meter.stop()
    del it
    if skipped:
        raise RuntimeError(f"the loader skipped {skipped} samples of clean demo shards")
    return samples / meter.wall, samples, meter


def make_shards(work: Path, n: int, max_side: int, shard_size: int) -> str:
    cfg = dag.load(
        DAG, [f"shards.max_samples={shard_size}", "mlflow.enabled=false", "subsets=[t2i,i2i]"]
    )
    manifest = demo_source(str(work / "inputs"), n=n, max_side=max_side)
    rows = builder.input_rows(manifest, [["t2i", "i2i"]] * manifest.num_rows, ["t2i", "i2i"])
    out = str(work / "out")
    builder.run_in_process(cfg, rows, out)
    for subset in ("t2i", "i2i"):
        shards.write_manifest(out, subset, {})
    if not shards.verify(out).ok:
        raise RuntimeError(f"demo shards fail verify: {shards.verify(out).defects[:3]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--n", type=int, default=240, help="demo inputs (samples per subset; default 240)"
    )
    parser.add_argument("--max-side", type=int, default=512, help="demo image size (default 512)")
    parser.add_argument("--shard-size", type=int, default=16, help="samples per shard (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="loader batch size (default 16)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measured runs per path, best kept (default 3)"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    add_wait_quiet_arg(parser)
    parser.add_argument(
        "--workdir", default=None, help="folder for the shards (default: a temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    with work_folder(args.workdir, keep=args.keep, prefix="onegen-loader-bench-") as work:
        return _bench(args, work)


def _bench(args: argparse.Namespace, work: Path) -> int:
    t0 = time.perf_counter()
    out = make_shards(work, args.n, args.max_side, args.shard_size)
    tars = sorted(str(p) for p in Path(out).glob("*/*.tar"))
    total = sum(
        json.loads((Path(out) / s / "manifest.json").read_text())["written"] for s in ("t2i", "i2i")
    )
    print(
        f"shards: {len(tars)} tars, {total} samples (t2i + i2i, demo max side {args.max_side}) made in "
        f"{time.perf_counter() - t0:.1f}s; os.cpu_count()={os.cpu_count()}, cv2 threads={cv2.getNumThreads()}",
        flush=True,
    )
    batches = max(4, total // args.batch_size)  # about as many samples as one pass of the baseline
    worker_counts = [int(w) for w in args.workers.split(",")]
    for path in tars:  # warm the page cache for everyone
        Path(path).read_bytes()

    rates: dict[str, dict[int, list[float]]] = {
        p: {w: [] for w in worker_counts} for p in ("loader", "bare-all", "bare-used")
    }
    cpu_ms: dict[str, dict[int, list[float]]] = {p: {w: [] for w in worker_counts} for p in rates}
    other: list[float] = []
    for r in range(args.repeats):
        for w in worker_counts:
            order = ["loader", "bare-all", "bare-used"]
            order = order if r % 2 == 0 else order[::-1]
            for path in order:
                if args.wait_quiet > 0:
                    wait_quiet(args.wait_quiet)
                if path == "loader":
                    rate, count, meter = run_loader(out, w, args.batch_size, batches, seed=r)
                else:
                    rate, count, meter = run_bare(tars, path.split("-")[1], w, total)
                rates[path][w].append(rate)
                cpu_ms[path][w].append(1e3 * meter.own_cores * meter.wall / count)
                other.append(meter.other_cores)
                print(
                    f"  run {r + 1}/{args.repeats} workers={w} {path:9s} {count:5d} samples "
                    f"{meter.wall:6.2f}s {rate:7.1f} samples/s {cpu_ms[path][w][-1]:6.2f} CPU ms/sample   "
                    f"cores: bench {meter.own_cores:.2f}, others {meter.other_cores:.2f}",
                    flush=True,
                )

    best = {p: {w: max(v) for w, v in d.items()} for p, d in rates.items()}
    print()
    print(
        f"{'workers':>7s} {'loader':>9s} {'bare-all':>9s} {'bare-used':>9s} {'ratio/all':>9s} "
        f"{'ratio/used':>10s}   (samples/s, best of {args.repeats}; batch {args.batch_size})"
    )
    record: dict[str, Any] = {"bench": "loader_throughput"}
    for w in worker_counts:
        ra, ru = best["loader"][w] / best["bare-all"][w], best["loader"][w] / best["bare-used"][w]
        print(
            f"{w:7d} {best['loader'][w]:9.1f} {best['bare-all'][w]:9.1f} {best['bare-used'][w]:9.1f} "
            f"{ra:8.2f}x {ru:9.2f}x"
        )
        record[f"workers{w}"] = {
            "loader": round(best["loader"][w], 1),
            "bare_all": round(best["bare-all"][w], 1),
            "bare_used": round(best["bare-used"][w], 1),
            "ratio_all": round(ra, 3),
            "ratio_used": round(ru, 3),
        }
    # CPU cost per sample (this process tree's CPU seconds / samples): steadier than
    # wall time when other processes share the cores.
    cost = {p: {w: min(v) for w, v in d.items()} for p, d in cpu_ms.items()}
    print(
        f"{'workers':>7s} {'loader':>9s} {'bare-all':>9s} {'bare-used':>9s} {'ratio/all':>9s} "
        f"{'ratio/used':>10s}   (CPU ms per sample, lowest; ratio = bare / loader)"
    )
    for w in worker_counts:
        ca, cu = cost["bare-all"][w] / cost["loader"][w], cost["bare-used"][w] / cost["loader"][w]
        print(
            f"{w:7d} {cost['loader'][w]:9.2f} {cost['bare-all'][w]:9.2f} {cost['bare-used'][w]:9.2f} "
            f"{ca:8.2f}x {cu:9.2f}x"
        )
        record[f"workers{w}"].update(
            {
                "cpu_ms_loader": round(cost["loader"][w], 3),
                "cpu_ms_bare_all": round(cost["bare-all"][w], 3),
                "cpu_ms_bare_used": round(cost["bare-used"][w], 3),
                "cpu_ratio_all": round(ca, 3),
                "cpu_ratio_used": round(cu, 3),
            }
        )
    ratio = min(record[f"workers{w}"]["ratio_all"] for w in worker_counts)
    print(
        f"ratio loader / bare tar+decode (all fields): min over worker counts {ratio:.2f}x (target >= 0.85x)"
    )
    if max(other) > 0.2:
        print(
            f"WARNING: other processes used up to {max(other):.2f} cores during a measured run; "
            "rerun on a quiet machine"
        )
    record.update(
        {
            "ratio": round(ratio, 3),
            "samples": total,
            "batch_size": args.batch_size,
            "batches_per_run": batches,
            "repeats": args.repeats,
            "max_side": args.max_side,
            "shard_size": args.shard_size,
            "cpu_count": os.cpu_count(),
            "other_cores_max": round(max(other), 3),
        }
    )
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
