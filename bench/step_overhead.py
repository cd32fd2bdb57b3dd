"""Per-step overhead of the Lightning fit against a plain PyTorch loop, side by side.

Both sides train the same tiny Next-DiT (same initial weights, same frozen tiny VAE and T5,
same fixed batch, same per-step noise seeds) with the same work per step: online encoding,
flow-matching loss, backward, global-norm clipping, AdamW, LR schedule, EMA update. The
Lightning side is ``Trainer`` + ``OneGenModule`` on a single CPU device (no logger, no
checkpointing, no progress bar); the plain side is a hand-written loop.

Repeats are interleaved (Lightning segment, plain segment, Lightning, ...) so drift in the
machine's speed hits both; the first ``--warmup`` steps of every segment are dropped; the
report is the median step time of each side and their ratio (target <= 1.05x). Step times
on the Lightning side are the intervals between consecutive ``on_train_batch_end`` calls,
so they include Lightning's data fetching, hooks and logging; on the plain side each step
includes fetching the batch from an iterator.

    .venv/bin/python bench/step_overhead.py [--steps 30] [--repeats 5] [--resolution 64] [--threads 1]

One torch thread by default: on a small shared machine, steps then contend less with other
processes and the two sides stay comparable.

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402
from workdir import work_folder  # noqa: E402  (bench/ is on sys.path)

from model import NextDiT  # noqa: E402
from model.flow import flow_matching_loss  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data.seeding import mix_seed
from training.data.synthetic import synthetic_batch
from training.encoders import build_encoders  # noqa: E402
from training.module import OneGenModule  # noqa: E402
from training.optim import lr_lambda  # noqa: E402


class Repeat(IterableDataset):
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        if len(self.losses) < 3:
            self.losses.append(float(outputs["loss"]))


def lightning_segment(
    module: OneGenModule, batch: dict, steps: int
) -> tuple[list[float], list[float]]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[timer],
        enable_autolog_hparams=False,
    )
    loader = DataLoader(Repeat(batch), batch_size=None, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    return [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)], timer.losses


class PlainLoop:
    """The same step, written by hand."""

    def __init__(self, cfg, init_state: dict, frozen) -> None:
        self.cfg = cfg
        self.model = NextDiT(init_state["config"])
        self.model.load_state_dict(init_state["model"])
        self.ema = NextDiT(init_state["config"])
        self.ema.load_state_dict(init_state["model"])
        self.ema.requires_grad_(False)
        self.frozen = frozen
        o = cfg.optim
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(o.weight_decay)},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(o.lr),
            betas=tuple(float(b) for b in o.betas),
            eps=float(o.eps),
            foreach=True,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lr_lambda(int(o.warmup_steps), str(o.schedule), int(cfg.trainer.max_steps), 0.0),
        )
        self.step_count = 0
        self.params = list(self.model.parameters())
        self.ema_params = list(self.ema.parameters())  # walked once, as the module caches it

    def step(self, batch: dict) -> float:
        with torch.no_grad():
            latents = self.frozen.vae.encode(batch["pixels"])
            text, mask = self.frozen.text(list(batch["prompts"]))
        cond = batch["cond_mask"].bool()
        gen = torch.Generator().manual_seed(mix_seed(int(self.cfg.seed), 0, self.step_count))
        out = flow_matching_loss(
            self.model,
            latents,
            text,
            mask,
            view_mask=~cond,
            cond_mask=cond,
            shift=float(self.cfg.loss.shift),
            generator=gen,
        )
        has = (out.n_views > 0).to(out.loss.dtype)
        loss = (out.loss * has).sum() / has.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg.optim.grad_clip), foreach=True)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - float(self.cfg.ema.decay))
        self.step_count += 1
        return loss.detach()


def plain_segment(loop: PlainLoop, batch: dict, steps: int) -> tuple[list[float], list[float]]:
    it = iter(Repeat(batch))
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loop.step(next(it))
        times.append(time.perf_counter() - t0)
        if len(losses) < 3:
            losses.append(float(loss))
    return times, losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="steps per segment")
    ap.add_argument("--repeats", type=int, default=5, help="segments per side, interleaved")
    ap.add_argument("--warmup", type=int, default=3, help="steps dropped per segment")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--run-dir", help="the run's folder (default: a private temp one, removed)")
    args = ap.parse_args()
    # Never a fixed name under /tmp, where anyone could plant a symlink first.
    keep = args.run_dir is not None
    with work_folder(args.run_dir, keep=keep, prefix="onegen-step-overhead-") as run_dir:
        return measure(args, run_dir)


def measure(args: argparse.Namespace, run_dir: Path) -> int:
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "mlflow.enabled=false",
            f"trainer.max_steps={args.steps}",
            "trainer.log_every_n_steps=10",
            "optim.warmup_steps=0",
        ],
    )
    batch = synthetic_batch(
        0,
        0,
        0,
        batch_size=args.batch,
        resolution=args.resolution,
        max_views=args.views,
        tasks=["canny2image"] if args.views > 1 else ["text2image"],
    )
    pl.seed_everything(0, verbose=False)
    module = OneGenModule(cfg)
    module.configure_model()
    init = {
        "config": module.net_config,
        "model": {k: v.clone() for k, v in module.model.state_dict().items()},
    }
    frozen = build_encoders(cfg, module.net_config.caption_dim, run_dir / "vocab")
    loop = PlainLoop(cfg, init, frozen)

    light: list[float] = []
    plain: list[float] = []
    first_losses: dict[str, list[float]] = {}
    for r in range(args.repeats):
        t, losses = lightning_segment(module, batch, args.steps)
        light += t[max(0, args.warmup - 1) :]
        p, plosses = plain_segment(loop, batch, args.steps)
        plain += p[args.warmup :]
        if r == 0:
            first_losses = {"lightning": losses, "plain": plosses}
    ml, mp = statistics.median(light), statistics.median(plain)
    ratio = ml / mp
    same = all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b))
        for a, b in zip(first_losses["lightning"], first_losses["plain"], strict=True)
    )
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch} x {args.views} views x "
        f"{args.resolution}px, {args.repeats} x {args.steps} steps per side (interleaved)"
    )
    print(f"first losses  lightning {first_losses['lightning']}")
    print(f"              plain     {first_losses['plain']}  (same computation: {same})")
    print(
        f"lightning  median {ml * 1e3:8.2f} ms/step  (p10 {_q(light, 0.1) * 1e3:.2f}, "
        f"p90 {_q(light, 0.9) * 1e3:.2f}, n={len(light)})"
    )
    print(
        f"plain      median {mp * 1e3:8.2f} ms/step  (p10 {_q(plain, 0.1) * 1e3:.2f}, "
        f"p90 {_q(plain, 0.9) * 1e3:.2f}, n={len(plain)})"
    )
    print(f"ratio      {ratio:.3f}x  (target <= 1.05x: {'OK' if ratio <= 1.05 else 'MISSED'})")
    print(
        json.dumps(
            {
                "bench": "step_overhead",
                "lightning_ms": round(ml * 1e3, 3),
                "plain_ms": round(mp * 1e3, 3),
                "ratio": round(ratio, 4),
                "target": 1.05,
                "ok": ratio <= 1.05,
                "same_losses": same,
                "steps_per_side": len(light),
                "threads": torch.get_num_threads(),
                "batch": [args.batch, args.views, args.resolution],
            }
        )
    )
    return 0


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


if __name__ == "__main__":
    sys.exit(main())
