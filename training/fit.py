"""Compose a fit from its config: the run folder, the launcher's shape, the data, the module,
the strategy, the callbacks and the MLflow logger, then ``trainer.fit``.

    onegen train fit --config training/configs/demo.yaml [dotted.key=value ...]
    onegen train fit --config training/configs/demo.yaml --print-config
    python -m training.fit --config training/configs/demo.yaml trainer.max_steps=10

Config: ``training.config`` (typed, strict). Run folder, resume: ``training.run.folders``. Launchers:
``training.run.cluster`` (torchrun / SLURM set ``trainer.num_nodes`` and ``trainer.devices``).

Strategy: ``trainer.strategy: auto`` gives ``ModelParallelStrategy`` (FSDP2, tensor parallel 1,
sharded distributed checkpoints; gloo on CPU) when devices x nodes > 1 and a single-device
strategy otherwise; ``fsdp`` forces FSDP2 even on one device. Lightning launches the other
local processes itself by re-running this command line (``devices: 2`` on CPU works), or
picks up torchrun / SLURM environments on clusters. Either strategy resumes checkpoints
written by any number of processes (``training.checkpoint_io``: distributed checkpoints
reshard on load).

Data: ``data.kind: onegen`` streams shards (``training.data.datamodule.OneGenDataModule``); ``synthetic``
is ``training.data.synthetic``. Either derives its position from ``trainer.global_step`` when the
loader is built (after a checkpoint restore), so a resume continues the stream exactly where
it stopped (on the same number of processes; on another, each rank continues its own stream).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from common.overrides import parse_args_with_overrides
from training.config import (
    ConfigError,
    add_fit_arguments,
    config_from_args,
    from_checkpoint,
    to_yaml,
)
from training.errors import FitError, warn
from training.run.cluster import launch_shape
from training.run.folders import RunPlan, log_line, plan_run, prepare, shared_run_name


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    if cfg.data.kind == "synthetic":
        from training.data.synthetic import SyntheticDataModule

        return SyntheticDataModule(cfg)
    from training.config import model_config
    from training.data.datamodule import OneGenDataModule
    from training.encoders import vae_stride

    # Ray views are built by the loader on the latent grid: it needs the VAE's geometry.
    return OneGenDataModule(
        cfg.data,
        latent_stride=vae_stride(cfg),
        latent_channels=model_config(cfg).in_channels,
    )


# --------------------------------------------------------------------------- trainer


def apply_launcher(cfg: DictConfig) -> None:
    """torchrun / SLURM say how many nodes and processes per node there are: they win over
    the config (a note says so when they differ)."""
    shape = launch_shape()
    if shape is None:
        return
    t = cfg.trainer
    if (t.num_nodes, t.devices) != (shape.num_nodes, shape.devices):
        warn(
            f"{shape.launcher}: {shape.num_nodes} node(s) x {shape.devices} process(es); "
            f"trainer.num_nodes={t.num_nodes} trainer.devices={t.devices} from the config "
            "are replaced"
        )
    t.num_nodes, t.devices = shape.num_nodes, shape.devices


def devices(cfg: DictConfig) -> int:
    t = cfg.trainer
    if str(t.devices) == "auto":
        if str(t.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    return int(t.devices)


def world_size(cfg: DictConfig) -> int:
    return devices(cfg) * int(cfg.trainer.num_nodes)


def use_fsdp(cfg: DictConfig) -> bool:
    kind = str(cfg.trainer.strategy)
    return kind == "fsdp" or (kind == "auto" and world_size(cfg) > 1)


def build_strategy(cfg: DictConfig) -> Any:
    from training.checkpoint_io import SafeModelParallelStrategy, SafeSingleDeviceStrategy

    t = cfg.trainer
    if not use_fsdp(cfg):
        accel = str(t.accelerator)
        cuda = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
        return SafeSingleDeviceStrategy(torch.device("cuda", 0) if cuda else torch.device("cpu"))
    backend = t.process_group_backend or ("gloo" if str(t.accelerator) == "cpu" else None)
    return SafeModelParallelStrategy(
        data_parallel_size=world_size(cfg),
        tensor_parallel_size=1,
        save_distributed_checkpoint=True,
        process_group_backend=backend,
    )


def precision(cfg: DictConfig) -> str:
    p = str(cfg.trainer.precision)
    if p != "auto":
        return p
    # Under FSDP2 mixed precision is the sharding's MixedPrecisionPolicy, not autocast.
    if use_fsdp(cfg) or str(cfg.trainer.accelerator) == "cpu":
        return "32-true"
    return "bf16-mixed"


def build_callbacks(cfg: DictConfig, plan: RunPlan, init: Any = None) -> list[pl.Callback]:
    """``init``: the checked ``model.init_from`` source a new run starts from (recorded)."""
    from training.callbacks import OneGenCheckpoint, SampleGrid, StateReport, ThroughputMonitor
    from training.run.tracking import TrackingCallback

    c = cfg.checkpoint
    keep = int(c.keep)
    callbacks: list[pl.Callback] = [
        OneGenCheckpoint(
            dirpath=str(plan.checkpoint_dir),
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(c.every_n_steps),
            save_top_k=keep,
            monitor="step" if keep > 0 else None,
            mode="max",
            save_last=bool(c.save_last),
            save_on_train_epoch_end=False,
        ),
        ThroughputMonitor(
            every_n_steps=int(cfg.throughput.every_n_steps or cfg.trainer.log_every_n_steps),
            peak_flops=cfg.throughput.peak_flops,
        ),
    ]
    if int(cfg.samples.every_n_steps or 0) > 0:
        callbacks.append(SampleGrid(cfg.samples, plan.run_dir / "samples"))
    if int(cfg.eval.every_n_steps) > 0 and cfg.data.kind == "synthetic":
        warn("eval: synthetic data holds no sample out: no held-out metrics this fit")
    elif int(cfg.eval.every_n_steps) > 0:
        from training.evaluation.callback import HeldOutEval

        callbacks.append(HeldOutEval(cfg, plan.run_dir / "eval"))
    if cfg.mlflow.enabled:
        callbacks.append(TrackingCallback(cfg, plan.resume_from, init))
    if cfg.debug.report_dir:
        callbacks.append(StateReport(cfg.debug.report_dir, bool(cfg.debug.save_state)))
    return callbacks


def build_trainer(cfg: DictConfig, logger: Any, callbacks: list[pl.Callback]) -> pl.Trainer:
    t = cfg.trainer
    # OneGenModule moves only the batch's tensors (transfer_batch_to_device); Lightning warns
    # whenever a module overrides it and a datamodule is given, which is the intent here.
    warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device`")
    return pl.Trainer(
        accelerator=str(t.accelerator),
        devices=devices(cfg),
        num_nodes=int(t.num_nodes),
        strategy=build_strategy(cfg),
        precision=precision(cfg),
        max_steps=int(t.max_steps),
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        log_every_n_steps=int(t.log_every_n_steps),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=True,
        enable_progress_bar=bool(t.progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=str(cfg.run_dir),
        enable_autolog_hparams=False,
    )


# --------------------------------------------------------------------------- the fit


@dataclass
class FitResult:
    run_id: str | None
    tracking_uri: str | None
    global_step: int
    run_dir: str
    checkpoint_dir: str
    is_global_zero: bool
    resumed_from: str | None


def check_lora_resume(cfg: DictConfig, plan: RunPlan, init: Any) -> None:
    """A LoRA checkpoint resumes only a LoRA fit of the same rank and targets, on the base
    it was trained on (the same files by sha256): one line naming what differs."""
    meta = plan.resume_meta
    saved = from_checkpoint(meta["config"]).lora if meta.get("config") else None
    if saved is None:
        return
    now = cfg.lora
    for key in ("rank", "targets"):
        if saved[key] != now[key]:
            raise ConfigError(
                f"resume: {plan.resume_from} was trained with lora.{key} {saved[key]}, this fit "
                f"has {now[key]}"
            )
    base = meta.get("lora_base") or {}
    if int(now.rank) and init is not None and base.get("sha256") != init.record()["sha256"]:
        raise ConfigError(
            f"resume: {plan.resume_from} trained adapters on the base {base.get('path')!r}; "
            f"model.init_from {str(init.path)!r} holds other weights (sha256 differ)"
        )


def check_resume(cfg: DictConfig, plan: RunPlan, init: Any = None) -> None:
    """What a checkpoint can be resumed into: the same model and (LoRA) base (one line
    naming what differs when not); another process count is fine (resharded), with a note."""
    if not plan.resume_from:
        return
    from training.config import model_config

    meta = plan.resume_meta
    if meta.get("config"):
        saved = model_config(from_checkpoint(meta["config"]))
        now = model_config(cfg)
        if saved != now:
            diff = [
                f"{k} {getattr(saved, k)} -> {getattr(now, k)}"
                for k in vars(now)
                if getattr(saved, k, None) != getattr(now, k)
            ]
            raise ConfigError(
                f"resume: {plan.resume_from} holds a different model ({', '.join(diff)}); "
                "a checkpoint resumes only into the model it was trained as"
            )
    check_lora_resume(cfg, plan, init)
    saved_world = int(meta.get("world_size") or 0)
    if saved_world and saved_world != world_size(cfg):
        warn(
            f"resume: {plan.resume_from} was written by {saved_world} process(es), this fit "
            f"runs {world_size(cfg)}: model, EMA and optimizer state are resharded; each rank "
            "continues its own data stream"
        )


def fit(cfg: DictConfig) -> FitResult:
    """Build everything from ``cfg`` and run ``trainer.fit`` (every process runs this)."""
    from training.init_from import prepare_init
    from training.lora import check_targets
    from training.module import OneGenModule
    from training.run.tracking import (
        build_logger,
        disable_telemetry,
        ensure_tracking,
        read_run_file,
    )

    disable_telemetry()
    apply_launcher(cfg)
    init = prepare_init(cfg)  # checked, architecture resolved: before any folder is made
    check_targets(cfg)  # LoRA's targets against that architecture
    plan = plan_run(cfg, warn)
    cfg.run_dir, cfg.run_name = str(plan.run_dir), plan.run_name
    check_resume(cfg, plan, init)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ensure_tracking(cfg, warn=warn)
    prepare(plan, cfg, to_yaml(cfg))
    run_id = cfg.mlflow.run_id
    if plan.resume_from and not run_id:
        run_id = plan.resume_meta.get("mlflow_run_id") or None
        if not run_id:
            info = read_run_file(plan.run_dir)
            run_id = info.get("run_id") if info else None
    logger = build_logger(cfg, run_id=run_id)
    # A resume (resume=auto finding the run's own checkpoint) restores its weights instead;
    # a LoRA fit's base is not in its checkpoints: loaded on every start.
    start = init if not plan.resume_from or int(cfg.lora.rank) else None
    module = OneGenModule(cfg, init_source=start)
    datamodule = build_datamodule(cfg)
    trainer = build_trainer(cfg, logger, build_callbacks(cfg, plan, start))
    with shared_run_name(plan.run_name), one_process_group_closed():
        # weights_only: Lightning's meta.pt / checkpoint loads (checked already, loaded again).
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.resume_from, weights_only=True)
    result = FitResult(
        run_id=module.mlflow_run_id if trainer.is_global_zero else None,
        tracking_uri=str(cfg.mlflow.tracking_uri) if logger is not None else None,
        global_step=trainer.global_step,
        run_dir=str(plan.run_dir),
        checkpoint_dir=str(plan.checkpoint_dir),
        is_global_zero=trainer.is_global_zero,
        resumed_from=plan.resume_from,
    )
    if trainer.is_global_zero:
        log_line(plan.run_dir, result_text(result))
    return result


# What Lightning writes into os.environ when it opens a process group itself.
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@contextlib.contextmanager
def one_process_group_closed() -> Iterator[None]:
    """A process group of one that the fit opened (``trainer.strategy=fsdp`` on one device)
    is closed when it ends, and the rendezvous variables Lightning set are put back: left
    open, its store keeps the port listening, and a later fit in this process or a child
    that inherits ``MASTER_PORT`` cannot bind it. Real distributed runs are left alone
    (``end_process`` ends them)."""
    import torch.distributed as dist

    opened_before = dist.is_available() and dist.is_initialized()
    env = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    try:
        yield
    finally:
        opened = not opened_before and dist.is_available() and dist.is_initialized()
        if opened and dist.get_world_size() == 1:
            dist.destroy_process_group()
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def result_text(result: FitResult) -> str:
    lines = [f"done: step {result.global_step}; run folder {result.run_dir}"]
    lines.append(f"checkpoints: {result.checkpoint_dir}")
    if result.run_id:
        lines.append(f"mlflow run: {result.run_id} ({result.tracking_uri})")
        lines.append(f"review: mlflow ui --backend-store-uri {result.tracking_uri}")
    return "\n".join(lines)


def print_result(result: FitResult) -> None:
    if result.is_global_zero:
        print(result_text(result), flush=True)


# --------------------------------------------------------------------------- entry


def run(cfg: DictConfig, prog: str, verbose: bool = False) -> int:
    """Exit codes: 2 a config that cannot start (a run folder or checkpoint that does not
    fit it: nothing trained), 1 a fit that failed for a reason outside the code (a
    checkpoint, the MLflow server, the data), 0 done. The libraries' INFO lines stay off
    the console unless ``verbose`` (:mod:`common.console`)."""
    from common.console import quiet_library_logs
    from datagen.shards.layout import ShardFileError

    quiet_library_logs(verbose)

    try:
        result = fit(cfg)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return end_process(2, finished=False)
    except (FitError, FileNotFoundError, ShardFileError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return end_process(1, finished=False)
    print_result(result)
    return end_process(0, finished=True)


def end_process(code: int, *, finished: bool) -> int:
    """A fit's process ends here. Single-process: ``code`` is returned. Distributed, the
    process exits now with ``code``, after a barrier when every rank ``finished`` (rank 0
    holds the store the others still talk to): Lightning leaves the process group open,
    and a gloo worker thread that frees a finished collective's tensors while Python
    finalises cannot take the GIL and aborts the process ("terminate called without an
    active exception", exit 134) after a fit that succeeded, about one run in ten. A group
    of one process (an fsdp fit on one device, in this process) has no peer to wait for: it
    is closed and ``code`` returned, so a later fit in the same process (a notebook, a test)
    neither inherits it nor ends the process."""
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    if dist.get_world_size() == 1:
        dist.destroy_process_group()
        return code
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.split("\n")[0])
    add_fit_arguments(p)
    prog = "python -m training.fit"
    args = parse_args_with_overrides(p, argv)
    cfg = config_from_args(args, prog)
    return cfg if isinstance(cfg, int) else run(cfg, prog, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
