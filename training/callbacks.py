"""Callbacks: throughput and MFU, sample grids, checkpoints tagged in MLflow, a state report.

Every callback here is safe under ``ModelParallelStrategy``: anything that runs a collective
(a reduce, a gather, an FSDP forward) runs on every rank in the same order; only rank 0 writes
files and talks to MLflow.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from model import flops_per_token
from model.flops import peak_bf16_flops
from training.inference.grid import (
    Row,
    camera_pose_row,
    conditional_row,
    render_grid,
    save_grid_image,
    text2image_rows,
)


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def step_done(pl_module: pl.LightningModule) -> bool:
    """True in on_train_batch_end right after an optimizer step (not mid-accumulation)."""
    return getattr(pl_module, "_micro", 0) == 0


class EveryNSteps(Callback):
    """Runs :meth:`on_step` after every ``self.every``-th optimizer step (not mid-accumulation,
    never at step 0; ``every`` <= 0: never)."""

    every: int = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.every <= 0 or not step_done(pl_module) or step == 0 or step % self.every:
            return
        self.on_step(trainer, pl_module, step)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        raise NotImplementedError


def mlflow_target(trainer: pl.Trainer) -> tuple[Any, str] | None:
    """(MlflowClient, run_id) of the trainer's MLFlowLogger, on rank 0 only."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger.experiment, logger.run_id
    return None


# --------------------------------------------------------------------------- throughput


class ThroughputMonitor(Callback):
    """samples/s, tokens/s, achieved TFLOP/s per device and MFU (CUDA), every N steps.

    FLOPs per image token are ``6 N + 12 L D S`` (``model.flops_per_token``; N without adaLN
    modulation and embedders). Counts are summed over ranks with one reduce per window; time
    is the wall clock between windows (CUDA is synchronised only at window ends).
    """

    def __init__(self, every_n_steps: int = 10, peak_flops: float | None = None) -> None:
        self.every = max(1, int(every_n_steps))
        self.peak_override = peak_flops
        self._flops_per_token: Any = None
        self._reset()

    def _reset(self) -> None:
        self._samples = 0
        self._tokens = 0
        self._flops = 0.0
        self._steps = 0
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One parameter walk per sequence length (buckets give a handful), not per step.
        self._flops_per_token = functools.lru_cache(maxsize=None)(
            functools.partial(flops_per_token, pl_module.model)
        )
        self._peak = peak_flops(pl_module.device, self.peak_override)
        self._reset()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stats = getattr(pl_module, "last_batch_stats", None) or {}
        tokens = stats.get("tokens", 0)
        self._samples += stats.get("samples", 0)
        self._tokens += tokens
        if tokens:
            self._flops += tokens * self._flops_per_token(int(stats["seq"]))
        if not step_done(pl_module):
            return
        self._steps += 1
        step = trainer.global_step
        if step % self.every:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        totals = torch.tensor([self._samples, self._tokens, self._flops], dtype=torch.float64)
        totals = trainer.strategy.reduce(totals.to(pl_module.device), reduce_op="sum").cpu()
        samples, tokens, flops = (float(x) for x in totals)
        world = trainer.world_size
        metrics = {
            "perf/samples_per_s": samples / dt,
            "perf/tokens_per_s": tokens / dt,
            "perf/step_time_s": dt / max(self._steps, 1),
            "perf/tflops_per_device": flops / dt / world / 1e12,
        }
        if self._peak:
            metrics["perf/mfu"] = flops / dt / (self._peak * world)
        pl_module.last_perf = metrics  # for the module's progress line, printed after this hook
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        self._reset()


# --------------------------------------------------------------------------- sample grids


class SampleGrid(EveryNSteps):
    """Every N steps, sample a fixed set of tasks with the EMA weights and log one labelled
    grid per task (``training.inference.grid``).

    ``text2image``: one row per configured prompt (the generated image). Any other task: the
    first training sample of that task this rank saw is kept (pixels, views, prompt, and a
    multiview sample's ray views); its row shows the condition views, the generated targets,
    then the ground-truth targets (``multiview``: the image views; ``camera_pose``: the
    images, then the estimated and the true ray directions as RGB). Each row
    has a header band with the task and the prompt, each panel a caption, panels are shown
    ``samples.cell`` pixels wide. Under FSDP every rank samples (each forward all-gathers),
    the tasks being those every rank has captured; rank 0 writes
    ``<out_dir>/step_XXXXXXXX/<task>.png`` and logs each grid with ``MlflowClient.log_image``
    under the key ``samples/<task>`` at the step (the MLflow UI's image step slider).
    """

    def __init__(self, cfg: Any, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.every = int(cfg.every_n_steps)
        self.tasks = [str(t) for t in cfg.tasks]
        self.cell = int(cfg.get("cell", 192) or 192)
        self.out_dir = Path(out_dir)
        self.captured: dict[str, dict[str, Any]] = {}

    @staticmethod
    def mlflow_key(task: str) -> str:
        """``samples/<task>``, with anything MLflow refuses in an image key as ``_``."""
        return "samples/" + re.sub(r"[^A-Za-z0-9_\-. ]", "_", task)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        wanted = [t for t in self.tasks if t != "text2image" and t not in self.captured]
        if not wanted or self.every <= 0:
            return
        for i, task in enumerate(batch["tasks"]):
            if task in wanted and task not in self.captured:
                self.captured[task] = {
                    "pixels": batch["pixels"][i : i + 1].detach().cpu().clone(),
                    "cond_mask": batch["cond_mask"][i : i + 1].detach().cpu().clone(),
                    "prompt": batch["prompts"][i],
                }
                if batch.get("rays") is not None:  # multiview: the ray views too
                    self.captured[task]["rays"] = batch["rays"][i : i + 1].detach().cpu().clone()

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self.render(trainer, pl_module, step)

    def _common_tasks(self, trainer: pl.Trainer) -> list[str]:
        mine = sorted(self.captured)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, mine)
            common = set(mine).intersection(*[set(x) for x in everyone])
            return [t for t in self.tasks if t in common]
        return [t for t in self.tasks if t in self.captured]

    @staticmethod
    def _row(pl_module: pl.LightningModule, task: str, item: dict[str, Any], seed: int) -> Row:
        """One captured sample, generated again: condition | generated | target images; a
        camera_pose sample shows its images and the estimated vs. true ray directions."""
        pixels, cond, prompt = item["pixels"], item["cond_mask"], item["prompt"]
        rays = item.get("rays")
        if rays is None:
            out = pl_module.generate([prompt], cond_pixels=pixels, cond_mask=cond, seed=seed)
            return conditional_row(task, prompt, pixels[0], cond[0], out[0].cpu())
        mv = pl_module.generate(
            [prompt], cond_pixels=pixels, cond_mask=cond, cond_rays=rays, seed=seed
        )
        if task == "camera_pose":
            return camera_pose_row(task, prompt, pixels[0], mv.rays[0].cpu(), rays[0])
        return conditional_row(task, prompt, pixels[0], cond[0, 0::2], mv.pixels[0].cpu())

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> list[Path]:
        grids: dict[str, list[Row]] = {}
        seed = int(self.cfg.get("seed", 0))
        if "text2image" in self.tasks and self.cfg.prompts:
            res = int(self.cfg.resolution)
            prompts = [str(p) for p in self.cfg.prompts]
            out = pl_module.generate(
                [f"[[text2image]] {p}" for p in prompts], views=1, size=(res, res), seed=seed
            )
            grids["text2image"] = text2image_rows(prompts, [img[0] for img in out])
        for task in self._common_tasks(trainer):
            grids[task] = [self._row(pl_module, task, self.captured[task], seed)]
        written: list[Path] = []
        if trainer.is_global_zero:
            folder = self.out_dir / f"step_{step:08d}"
            target = mlflow_target(trainer)
            for task, rows in grids.items():
                image = render_grid(rows, self.cell, step=step)
                written.append(save_grid_image(image, folder / f"{task}.png"))
                if target is not None:
                    client, run_id = target
                    # Synchronous: the image is in the store when the step's hooks are done.
                    client.log_image(
                        run_id, image, key=self.mlflow_key(task), step=step, synchronous=True
                    )
        return written


# --------------------------------------------------------------------------- checkpoints


class OneGenCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also records where each checkpoint went as MLflow tags
    (``checkpoint.latest``, ``checkpoint.step_XXXXXXXX``): sharded checkpoints are folders,
    which ``log_model`` does not handle, and copying them into the artifact store would double
    the storage of a large run."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        target = mlflow_target(trainer)
        if target is None:
            return
        client, run_id = target
        path = str(Path(filepath).resolve())
        client.set_tag(run_id, "checkpoint.latest", path)
        client.set_tag(run_id, f"checkpoint.step_{trainer.global_step:08d}", path)


# --------------------------------------------------------------------------- state report


class StateReport(Callback):
    """Debug/verification report (``debug.report_dir``): how the model is laid out on the
    ranks at train start, the zero-initialised parameters, and at train end the full
    (gathered) model + EMA + optimizer state for exact comparisons between runs."""

    ZERO_INIT = (
        "modulation.weight",
        "modulation.bias",
        "text_gate",
        "final.linear.weight",
        "final.linear.bias",
    )

    def __init__(self, out_dir: str | Path, save_state: bool = True) -> None:
        self.out = Path(out_dir)
        self.save_state = save_state
        self.losses: list[float] = []

    @staticmethod
    def _full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {}
        zero_init: dict[str, float] = {}
        ones: dict[str, float] = {}
        nonzero: dict[str, float] = {}
        for prefix, net in (("model", pl_module.model), ("ema", pl_module.ema)):
            for name, p in net.named_parameters():
                key = f"{prefix}.{name}"
                local = p.to_local() if hasattr(p, "to_local") else p
                params[key] = {
                    "type": type(p).__name__,
                    "placements": [str(x) for x in getattr(p, "placements", [])],
                    "global_shape": list(p.shape),
                    "local_shape": list(local.shape),
                    "local_sum": float(local.detach().double().sum()),
                }
                full = self._full(p.detach())
                if name.endswith(self.ZERO_INIT):
                    zero_init[key] = float(full.abs().max())
                elif name.endswith("norm_in.weight") or name.endswith("norm_out.weight"):
                    ones[key] = float((full - 1).abs().max())
                elif full.ndim == 2:
                    nonzero[key] = float(full.abs().max())
        ema_equal = all(
            torch.equal(self._full(a.detach()), self._full(b.detach()))
            for a, b in pl_module.ema_pairs()
        )
        gathered = [params]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, params)
        if trainer.is_global_zero:
            report = {
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "built_on_meta": bool(getattr(pl_module, "built_on_meta", False)),
                "ranks": gathered,
                "zero_init_max_abs": zero_init,
                "norm_weight_max_dev_from_1": ones,
                "linear_max_abs": nonzero,
                "ema_equals_model": ema_equal,
                "frozen_in_state_dict": any(
                    k.startswith(("frozen", "vae", "text")) for k in pl_module.state_dict()
                ),
                "n_optimizer_params": sum(
                    len(g["params"]) for g in trainer.optimizers[0].param_groups
                ),
                "n_model_params": len(list(pl_module.model.parameters())),
            }
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "start.json").write_text(json.dumps(report, indent=1))
        if self.save_state and trainer.global_step > 0:
            # Resumed: the restored state, to compare with the state that was saved. (Not on
            # a fresh start: reading an optimizer without state initialises it.)
            state = self.full_state(trainer, pl_module)
            if trainer.is_global_zero:
                torch.save(state, self.out / "start_state.pt")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    @staticmethod
    def full_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Model + EMA and optimizer state, gathered whole and keyed by parameter name: the
        same form whatever the number of processes (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(pl_module, options=opts)
        optim_sd = get_optimizer_state_dict(pl_module, trainer.optimizers[0], options=opts)
        return {"model": model_sd, "optimizer": optim_sd}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self.full_state(trainer, pl_module) if self.save_state else None
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            if state is not None:
                torch.save(state, self.out / "end_state.pt")
            (self.out / "end.json").write_text(
                json.dumps(
                    {
                        "global_step": trainer.global_step,
                        "losses": self.losses,
                        "logged": getattr(pl_module, "last_logged", {}),
                        "mlflow_run_id": pl_module.mlflow_run_id,
                    },
                    indent=1,
                )
            )
