"""``HeldOutEval``: the fit's held-out metrics (the ``eval`` section), every N steps.

At train start every rank builds the same held-out items from the datamodule's
``data.holdout`` part (``heldout.held_out_items``); every ``eval.every_n_steps`` steps each
rank generates its share with the EMA weights, the scores are gathered, and rank 0 logs
``eval/<task>/<metric>`` at the step, writes ``<run>/eval/step<N>.json`` (also an MLflow
artifact, ``eval/step<N>.json``) and prints one ``eval`` line with each task's headline.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from training.callbacks import EveryNSteps, mlflow_target
from training.errors import warn
from training.evaluation.heldout import EvalItem, headline, held_out_items, merge_totals, run_items
from training.evaluation.scored import scorable_tasks
from training.evaluation.scorers import Scorers
from training.inference.generate import SamplerSettings
from training.run.folders import log_line


class HeldOutEval(EveryNSteps):
    def __init__(self, cfg: Any, out_dir: str | Path) -> None:
        self.cfg = cfg  # the fit config
        self.every = int(cfg.eval.every_n_steps)
        self.out_dir = Path(out_dir)
        self.items: list[EvalItem] = []
        self.scorers: Any = None
        self.last: dict[str, dict[str, float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = self.cfg.eval
        dm = trainer.datamodule
        dm.setup("fit")
        tasks = list(e.tasks) if e.tasks is not None else None
        folders = {k: (e[f"{k}_path"], f"eval.{k}_path") for k in ("clip", "lpips", "face")}
        self.scorers = Scorers.load(folders, str(pl_module.device))
        scorable = scorable_tasks(e.clip_path, e.face_path)
        self.items, problems = held_out_items(
            dm.cfg, dm.held_out, tasks, int(e.num_samples), scorable
        )
        found = sorted({item.task for item in self.items})
        held = sum(index.num_samples for index in dm.held_out.values())
        if problems:
            warn(f"eval: {sum(problems.values())} held-out samples could not be used: {problems}")
        if not self.items:
            warn(
                f"eval: none of the {held} held-out samples carries a scored task "
                f"{'in ' + str(tasks) if tasks else ''}: no held-out metrics this fit"
            )
        elif tasks is not None and set(tasks) - set(found):
            warn(f"eval: no held-out sample for {sorted(set(tasks) - set(found))}")

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.items:
            self.evaluate(trainer, pl_module, step)

    @torch.no_grad()
    def evaluate(
        self, trainer: pl.Trainer, pl_module: Any, step: int
    ) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        settings = SamplerSettings.from_config(
            self.cfg, steps=int(e.steps), guidance=e.guidance, seed=int(e.seed)
        )
        start = time.perf_counter()
        generate = functools.partial(pl_module.generate, settings=settings)
        local = run_items(
            generate, self.items, trainer.global_rank, trainer.world_size, int(e.seed),
            self.scorers,
        )  # fmt: skip
        parts = [local]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        results = merge_totals(parts)
        seconds = time.perf_counter() - start
        self.last = results
        if trainer.is_global_zero:
            self._publish(trainer, step, results, seconds)
        return results

    def _publish(self, trainer: pl.Trainer, step: int, results: dict, seconds: float) -> None:
        metrics = {
            f"eval/{task}/{name}": float(v)
            for task, per in results.items()
            for name, v in per.items()
            if name != "n"
        }
        metrics["eval/seconds"] = seconds
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        table = {
            "step": step,
            "seconds": seconds,
            "steps": int(self.cfg.eval.steps),
            "tasks": results,
            "keys": {t: [i.key for i in self.items if i.task == t] for t in results},
        }
        name = f"step{step:08d}.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / name).write_text(json.dumps(table, indent=2) + "\n")
        target = mlflow_target(trainer)
        if target is not None:
            client, run_id = target
            client.log_dict(run_id, table, f"eval/{name}")
        line = f"eval step {step} | {headline(results)} | {seconds:.1f}s"
        if trainer.progress_bar_callback is None:
            print(line, flush=True)
        if self.cfg.run_dir:
            log_line(self.cfg.run_dir, line)
