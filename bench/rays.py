"""Cost of building Plücker rays against one training step, side by side.

For one multiview batch (B = 1 sample of 4 views at 512 px, rays on the 64x64 latent grid)
three things are timed, interleaved round by round so drift in the machine's speed hits all:

1. ``datagen.cameras.cameras_to_plucker`` (vectorised numpy) for the batch's 4 cameras,
2. the same rays from a straightforward per-pixel Python loop written here (for the record;
   it must agree with (1) to 1e-5),
3. one training step of the tiny model on CPU for the same batch (``OneGenModule``:
   online encoding, flow-matching loss, backward, AdamW) as the reader hands it over:
   ``pixels`` of the N image views, ``"rays"`` [B, N, 16, h, w], a novel-view ``cond_mask``
   over the 2N interleaved views.

The report is the median of each and the ratio ray building / training step (target < 2%).

    .venv/bin/python bench/rays.py [--repeats 5] [--views 4] [--resolution 512] [--threads 1]

One torch thread by default, as in bench/step_overhead.py. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_meter import CpuMeter  # noqa: E402  (bench/ is on sys.path)
from workdir import work_folder  # noqa: E402

from datagen.cameras import (  # noqa: E402
    RAY_SCALE,
    cameras_to_plucker,
    intrinsics_from_focal,
    normalize_cameras,
    orbit_cameras,
)
from training.config import load_config  # noqa: E402
from training.data.synthetic import synthetic_batch
from training.data.tasks import multiview_layout
from training.module import OneGenModule  # noqa: E402

TARGET = 0.02


def loop_rays(c2w: np.ndarray, K: np.ndarray, size: tuple[int, int], grid: tuple[int, int]):
    """The per-pixel reference: plain Python floats, one ray at a time, tiled to 16."""
    (H, W), (h, w) = size, grid
    out = np.zeros((len(c2w), 16, h, w), dtype=np.float32)
    for v in range(len(c2w)):
        fx, fy, cx, cy = K[v, 0, 0], K[v, 1, 1], K[v, 0, 2], K[v, 1, 2]
        R = c2w[v, :3, :3].tolist()
        ox, oy, oz = c2w[v, :3, 3].tolist()
        for i in range(h):
            for j in range(w):
                x = ((j + 0.5) * W / w - cx) / fx
                y = ((i + 0.5) * H / h - cy) / fy
                d = [R[r][0] * x + R[r][1] * y + R[r][2] for r in range(3)]
                n = math.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
                dx, dy, dz = d[0] / n, d[1] / n, d[2] / n
                ray = (dx, dy, dz, oy * dz - oz * dy, oz * dx - ox * dz, ox * dy - oy * dx)
                for c in range(16):
                    out[v, c, i, j] = ray[c % 6] * RAY_SCALE
    return out


class Step:
    """One optimisation step of ``OneGenModule`` outside a Trainer (what a fit does per
    batch, minus Lightning's bookkeeping, which bench/step_overhead.py measures)."""

    def __init__(self, module: OneGenModule) -> None:
        self.module = module
        opt = module.configure_optimizers()
        self.opt = opt["optimizer"] if isinstance(opt, dict) else opt
        if isinstance(self.opt, list | tuple):
            self.opt = self.opt[0]

    def __call__(self, batch: dict) -> float:
        loss = self.module.training_step(batch, 0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds, each timing all three")
    ap.add_argument("--ray-runs", type=int, default=20, help="vectorised runs per round")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    args = ap.parse_args()
    with work_folder(None, keep=False, prefix="onegen-rays-") as run_dir:
        return measure(args, run_dir)


def measure(args: argparse.Namespace, run_dir: Path) -> int:
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    res, views = args.resolution, args.views
    size, grid = (res, res), (res // 8, res // 8)

    c2w, _ = normalize_cameras(orbit_cameras(np.linspace(0, 360, views, endpoint=False), 20.0, 3.0))
    K = np.stack([intrinsics_from_focal(1.2 * res, size)] * views)

    cfg = load_config(None, [f"run_dir={run_dir}", "mlflow.enabled=false", "optim.warmup_steps=0"])
    images = synthetic_batch(
        0, 0, 0, batch_size=1, resolution=res, max_views=views, tasks=["canny2image"]
    )
    layout = multiview_layout("multiview", views, 0.5)  # img0 (and img1) clean, every ray
    step_batch = {
        **images,
        "rays": torch.from_numpy(cameras_to_plucker(c2w, K, size, grid))[None],
        "cond_mask": torch.tensor([layout.cond_mask]),
        "prompts": ["[[multiview]] a small scene"],
        "tasks": [layout.name],
    }
    torch.manual_seed(0)
    module = OneGenModule(cfg)
    module.configure_model()
    step = Step(module)

    vec: list[float] = []
    loop: list[float] = []
    train: list[float] = []
    worst = 0.0
    with CpuMeter() as meter:
        for _ in range(args.repeats):
            for _ in range(args.ray_runs):
                t0 = time.perf_counter()
                fast = cameras_to_plucker(c2w, K, size, grid)
                vec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            slow = loop_rays(c2w, K, size, grid)
            loop.append(time.perf_counter() - t0)
            worst = max(worst, float(np.abs(fast - slow).max()))
            t0 = time.perf_counter()
            step(step_batch)
            train.append(time.perf_counter() - t0)

    mv, ml, mt = (statistics.median(x) for x in (vec, loop, train))
    ratio = mv / mt
    ok = ratio < TARGET
    print(
        f"threads {torch.get_num_threads()}, batch 1 x {views} views x {res}px, rays "
        f"{grid[0]}x{grid[1]}x16, {args.repeats} rounds (interleaved); other processes used "
        f"{meter.other_cores:.2f} cores meanwhile"
    )
    print(f"training step: {views} image + {views} ray views, task {step_batch['tasks'][0]}")
    print(f"{'what':<34}{'median':>12}{'n':>5}")
    print(f"{'cameras_to_plucker (vectorised)':<34}{mv * 1e3:>9.3f} ms{len(vec):>5}")
    print(f"{'per-pixel Python loop':<34}{ml * 1e3:>9.3f} ms{len(loop):>5}")
    print(f"{'training step (tiny, CPU)':<34}{mt * 1e3:>9.3f} ms{len(train):>5}")
    print(
        f"loop vs vectorised: max |diff| {worst:.2e} (<= 1e-5: {worst <= 1e-5}), "
        f"vectorised {ml / mv:.0f}x faster"
    )
    print(f"ratio rays / step {ratio:.4%}  (target < 2%: {'PASS' if ok else 'FAIL'})")
    print(
        json.dumps(
            {
                "bench": "rays",
                "rays_ms": round(mv * 1e3, 4),
                "loop_ms": round(ml * 1e3, 3),
                "step_ms": round(mt * 1e3, 3),
                "ratio": round(ratio, 6),
                "target": TARGET,
                "ok": ok,
                "loop_max_diff": worst,
                "step_views": 2 * views,
                "threads": torch.get_num_threads(),
                "batch": [1, views, res],
                "other_cores": round(meter.other_cores, 3),
            }
        )
    )
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
