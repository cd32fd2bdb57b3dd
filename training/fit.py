"""Build and run a fit from an OmegaConf config; sample from a checkpoint.

    python -m training.fit --config training/configs/demo.yaml [dotted.key=value ...]
    onegen train fit --config training/configs/demo.yaml trainer.max_steps=10
    onegen sample --checkpoint runs/demo/checkpoints/step00000040.ckpt --task text2image --out out/

Config = ``DEFAULTS`` (below) <- the YAML file <- dotted overrides (values parse as YAML).

Strategy: ``trainer.strategy: auto`` gives ``ModelParallelStrategy`` (FSDP2, tensor parallel
1, sharded distributed checkpoints; gloo on CPU) when devices x nodes > 1 and Lightning's
single-device strategy otherwise; ``fsdp`` forces FSDP2 even on one device. Lightning launches
the other local processes itself by re-running this command line (``devices: 2`` on CPU
works), or picks up torchrun / SLURM environments on clusters.

Data: ``data.kind: onegen`` uses ``training.data.OneGenDataModule(cfg)`` (imported lazily);
``synthetic`` uses ``SyntheticDataModule`` here: deterministic batches of the training batch
contract, batch k of rank r a pure function of (seed, r, k). Either source derives its
position from ``trainer.global_step`` when the loader is built (after a checkpoint restore),
so a resume continues the stream exactly where it stopped.

Resume: ``resume: last`` (newest checkpoint in ``checkpoint.dir``; an error when there is
none), ``auto`` (the newest, or a fresh start when there is none) or a checkpoint path. A newest
checkpoint that is cut short or incomplete is skipped with a warning for the one before it; a
named one must be whole. Checkpoints are read without unpickling code
(``training.checkpoint_io``). The checkpoint restores model, EMA, optimizer, scheduler and
step; the MLflow run id stored in the checkpoint (or ``<run_dir>/mlflow_run.json``) makes the
logger continue the same run.

MLflow: ``mlflow.tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db``); an HTTP server is checked at start-up with a short timeout and an
unreachable one stops the fit in seconds, or, with ``mlflow.required: false``, the fit runs
without tracking.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from training import skips
from training.config_tools import apply_overrides

DEFAULTS: dict[str, Any] = {
    "name": "onegen",
    "seed": 0,
    "run_dir": "runs/${name}",
    "resume": None,
    "model": {
        "config": "tiny",
        "overrides": {},
        "meta_init": True,
        "activation_checkpointing": False,
        "compile": False,
        "param_dtype": "bfloat16",  # FSDP2 compute dtype on CUDA (fp32 on CPU)
    },
    "encoders": {
        "kind": "tiny",
        "seed": 0,
        "vae_path": None,
        "text_path": None,
        "vae_dtype": None,
        "text_dtype": None,
        "vae_apply_shift": True,
        "text_max_length": 64,
    },
    "loss": {"shift": 3.0, "logit_mean": 0.0, "logit_std": 1.0},
    "optim": {
        "lr": 5e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "no_decay_1d": True,
        "warmup_steps": 0,
        "schedule": "constant",
        "min_lr_ratio": 0.0,
        "grad_clip": 1.0,
        "foreach": True,
    },
    "ema": {"enabled": True, "decay": 0.999, "warmup_steps": 0},
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "auto",
        "max_steps": 100,
        "accumulate_grad_batches": 1,
        "log_every_n_steps": 10,
        "progress_bar": False,
        "process_group_backend": None,
    },
    "checkpoint": {
        "dir": "${run_dir}/checkpoints",
        "every_n_steps": 50,
        "keep": -1,
        "save_last": False,
    },
    # kind: onegen -> training.data.OneGenDataModule(<this node without kind/synthetic>)
    "data": {
        "kind": "synthetic",
        "batch_size": 2,
        # Stop when a subset skipped more than this fraction of its samples (corrupt ones),
        # counted over the run once skip_rate_min_samples were read from it.
        "max_skip_rate": skips.MAX_SKIP_RATE,
        "skip_rate_min_samples": skips.SKIP_RATE_MIN_SAMPLES,
        "synthetic": {
            "resolution": 64,
            "max_views": 2,
            "tasks": ["text2image", "canny2image", "depth2image"],
            "multiview_fraction": 0.5,
        },
    },
    "samples": {
        "every_n_steps": 0,
        "tasks": ["text2image"],
        "prompts": ["a photo of a cat"],
        "resolution": 64,
        "steps": 8,
        "guidance": 1.0,
        "seed": 0,
    },
    "throughput": {"every_n_steps": None, "peak_flops": None},
    "mlflow": {
        "enabled": True,
        "tracking_uri": None,  # None: MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI
        "required": True,  # false: an unreachable server turns tracking off with a warning
        "experiment": "onegen-train",
        "run_name": None,
        "run_id": None,
        "synchronous": False,
        "system_metrics": True,
        "system_metrics_interval": 10,
    },
    "debug": {"report_dir": None, "save_state": True},
}


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    pass


# --------------------------------------------------------------------------- config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """DEFAULTS <- YAML file <- overrides, interpolations resolved."""
    cfg = OmegaConf.create(DEFAULTS)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    try:
        apply_overrides(cfg, list(overrides or []))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    OmegaConf.resolve(cfg)
    if not cfg.mlflow.get("tracking_uri"):
        # What MLflow itself and Lightning's MLFlowLogger would use; never a hard-coded store
        # over the user's environment.
        cfg.mlflow.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return cfg


# --------------------------------------------------------------------------- synthetic data


def _mix(*parts: int) -> int:
    from training.module import _mix_seed

    return _mix_seed(*parts)


def synthetic_batch(
    seed: int,
    rank: int,
    index: int,
    *,
    batch_size: int,
    resolution: int,
    max_views: int,
    tasks: list[str],
    multiview_fraction: float = 0.5,
) -> dict:
    """Batch ``index`` of rank ``rank``: a pure function of its arguments (CPU, float32).

    Smooth random images (4x4 noise, bilinear up), one shape per batch: either 1 view of
    ``text2image`` samples, or ``max_views`` views where views 1.. are conditions.
    """
    from model.encoders import TINY_WORDS

    g = torch.Generator().manual_seed(_mix(seed, 7, rank, index))
    i2i = [t for t in tasks if t != "text2image"]
    use_multi = (
        bool(i2i)
        and max_views > 1
        and ("text2image" not in tasks or float(torch.rand((), generator=g)) < multiview_fraction)
    )
    views = max_views if use_multi else 1
    low = torch.rand(batch_size, views, 3, 4, 4, generator=g) * 2 - 1
    pixels = torch.nn.functional.interpolate(
        low.flatten(0, 1), size=(resolution, resolution), mode="bilinear", align_corners=False
    ).unflatten(0, (batch_size, views))
    cond = torch.zeros(batch_size, views, dtype=torch.bool)
    if use_multi:
        cond[:, 1:] = True
        picks = torch.randint(len(i2i), (batch_size,), generator=g).tolist()
        names = [i2i[i] for i in picks]
    else:
        names = ["text2image"] * batch_size
    words = torch.randint(len(TINY_WORDS), (batch_size, 2), generator=g).tolist()
    prompts = [
        f"[[{t}]] a photo of a {TINY_WORDS[a]} {TINY_WORDS[b]}"
        for t, (a, b) in zip(names, words, strict=True)
    ]
    keys = [f"r{rank}-b{index:08d}-{i}" for i in range(batch_size)]
    return {
        "pixels": pixels.contiguous(),
        "cond_mask": cond,
        "prompts": prompts,
        "tasks": names,
        "subsets": ["synthetic"] * batch_size,
        "keys": keys,
    }


class SyntheticBatches(IterableDataset):
    """Endless deterministic batches from ``start``; see ``synthetic_batch``."""

    def __init__(self, seed: int, rank: int, start: int, **kwargs: Any) -> None:
        self.seed, self.rank, self.start, self.kwargs = seed, rank, start, kwargs

    def __iter__(self):
        index = self.start
        while True:
            yield synthetic_batch(self.seed, self.rank, index, **self.kwargs)
            index += 1


class SyntheticDataModule(pl.LightningDataModule):
    """Deterministic stand-in for ``OneGenDataModule`` (tests, benchmarks, smoke runs).

    Position = ``trainer.global_step * accumulate_grad_batches`` micro-batches, read when the
    loader is built, i.e. after Lightning restored the loops from a checkpoint."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.start_step = 0

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        if trainer is not None:
            self.start_step = trainer.global_step * trainer.accumulate_grad_batches
        d = self.cfg.data.synthetic
        ds = SyntheticBatches(
            int(self.cfg.seed),
            rank,
            self.start_step,
            batch_size=int(self.cfg.data.batch_size),
            resolution=int(d.resolution),
            max_views=int(d.max_views),
            tasks=[str(t) for t in d.tasks],
            multiview_fraction=float(d.get("multiview_fraction", 0.5)),
        )
        return DataLoader(ds, batch_size=None, num_workers=0)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    kind = str(cfg.data.kind)
    if kind == "synthetic":
        return SyntheticDataModule(cfg)
    if kind == "onegen":
        from training.data import OneGenDataModule  # lazily: heavy imports (cv2, fsspec)

        node = OmegaConf.to_container(cfg.data, resolve=True)
        node.pop("kind", None)
        node.pop("synthetic", None)
        return OneGenDataModule(node)
    raise ConfigError(f"data.kind must be 'onegen' or 'synthetic', got {kind!r}")


# --------------------------------------------------------------------------- trainer


def _devices(cfg: DictConfig) -> int:
    t = cfg.trainer
    if str(t.devices) == "auto":
        if str(t.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    return int(t.devices)


def use_fsdp(cfg: DictConfig) -> bool:
    kind = str(cfg.trainer.strategy)
    if kind not in ("auto", "fsdp", "single"):
        raise ConfigError(f"trainer.strategy must be auto, fsdp or single, got {kind!r}")
    return kind == "fsdp" or (kind == "auto" and _devices(cfg) * int(cfg.trainer.num_nodes) > 1)


def build_strategy(cfg: DictConfig) -> Any:
    if not use_fsdp(cfg):
        return "auto"
    from training.checkpoint_io import SafeModelParallelStrategy

    t = cfg.trainer
    backend = t.get("process_group_backend") or ("gloo" if str(t.accelerator) == "cpu" else None)
    return SafeModelParallelStrategy(
        data_parallel_size=_devices(cfg) * int(t.num_nodes),
        tensor_parallel_size=1,
        save_distributed_checkpoint=True,
        process_group_backend=backend,
    )


def _precision(cfg: DictConfig) -> str:
    p = str(cfg.trainer.precision)
    if p != "auto":
        return p
    # Under FSDP2 mixed precision is the sharding's MixedPrecisionPolicy, not autocast.
    if use_fsdp(cfg) or str(cfg.trainer.accelerator) == "cpu":
        return "32-true"
    return "bf16-mixed"


_STEP_RE = re.compile(r"step(\d+)")


def find_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints in ``ckpt_dir`` (files or sharded folders), oldest step first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.endswith(".ckpt") and _STEP_RE.search(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.search(p.name).group(1)))


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, checked whole and safe (``verify_checkpoint``).

    ``last`` / ``auto``: the newest whole checkpoint in ``checkpoint.dir``; broken newer ones
    are skipped with a warning naming each (a crash mid-save leaves one cut short), unsafe ones
    stop the fit. None found: ``last`` is an error, ``auto`` a fresh start."""
    from training.checkpoint_io import verify_checkpoint
    from training.errors import CheckpointError, UnsafeCheckpointError

    resume = cfg.get("resume")
    if resume in (None, "", False):
        return None
    mode = str(resume)
    if mode not in ("last", "auto"):
        verify_checkpoint(mode)  # named explicitly: it must be whole
        return mode
    folder = str(cfg.checkpoint.dir)
    found = find_checkpoints(folder)
    broken: list[str] = []
    for cand in reversed(found):
        try:
            verify_checkpoint(cand)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            _warn(f"resume={mode}: skipping checkpoint {cand}: {exc}")
            broken.append(cand.name)
            continue
        if broken:
            _warn(f"resume={mode}: resuming from {cand} instead")
        return str(cand)
    if broken:
        raise ConfigError(
            f"resume={mode}: no whole checkpoint in {folder} (broken: {', '.join(broken)})"
        )
    if mode == "last":
        raise ConfigError(
            f"resume=last but no checkpoint in {folder}; "
            "use resume=auto to start fresh when there is none"
        )
    return None


def _warn(message: str) -> None:
    """A one-line warning on stderr, from the rank-0 process only."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"onegen: warning: {message}", file=sys.stderr, flush=True)


def checkpoint_meta(path: str | Path) -> dict:
    """The ``onegen`` entry (config YAML, MLflow run id) of a checkpoint file or folder,
    after ``verify_checkpoint`` (whole, nothing but weights and plain data)."""
    from training.checkpoint_io import verify_checkpoint

    return dict(verify_checkpoint(path).get("onegen") or {})


def build_callbacks(cfg: DictConfig, resumed_from: str | None) -> list[pl.Callback]:
    from training.callbacks import OneGenCheckpoint, SampleGrid, StateReport, ThroughputMonitor
    from training.tracking import TrackingCallback

    c = cfg.checkpoint
    keep = int(c.get("keep", -1))
    callbacks: list[pl.Callback] = [
        OneGenCheckpoint(
            dirpath=str(c.dir),
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(c.every_n_steps),
            save_top_k=keep,
            monitor="step" if keep > 0 else None,
            mode="max",
            save_last=bool(c.get("save_last", False)),
            save_on_train_epoch_end=False,
        ),
        ThroughputMonitor(
            every_n_steps=int(cfg.throughput.get("every_n_steps") or cfg.trainer.log_every_n_steps),
            peak_flops=cfg.throughput.get("peak_flops"),
        ),
    ]
    if int(cfg.samples.get("every_n_steps") or 0) > 0:
        callbacks.append(SampleGrid(cfg.samples, Path(cfg.run_dir) / "samples"))
    if cfg.mlflow.get("enabled", True):
        callbacks.append(TrackingCallback(cfg, resumed_from))
    if cfg.debug.get("report_dir"):
        callbacks.append(StateReport(cfg.debug.report_dir, bool(cfg.debug.get("save_state", True))))
    return callbacks


def build_trainer(cfg: DictConfig, logger: Any, callbacks: list[pl.Callback]) -> pl.Trainer:
    t = cfg.trainer
    # OneGenModule moves only the batch's tensors (transfer_batch_to_device); Lightning warns
    # whenever a module overrides it and a datamodule is given, which is the intent here.
    warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device`")
    return pl.Trainer(
        accelerator=str(t.accelerator),
        devices=_devices(cfg),
        num_nodes=int(t.num_nodes),
        strategy=build_strategy(cfg),
        precision=_precision(cfg),
        max_steps=int(t.max_steps),
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        log_every_n_steps=int(t.log_every_n_steps),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=True,
        enable_progress_bar=bool(t.get("progress_bar", False)),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=str(cfg.run_dir),
        enable_autolog_hparams=False,
    )


@dataclass
class FitResult:
    run_id: str | None
    tracking_uri: str | None
    global_step: int
    checkpoint_dir: str
    is_global_zero: bool
    resumed_from: str | None


def fit(cfg: DictConfig) -> FitResult:
    """Build everything from ``cfg`` and run ``trainer.fit`` (every process runs this)."""
    from training.module import OneGenModule
    from training.tracking import build_logger, disable_telemetry, ensure_tracking, read_run_file

    disable_telemetry()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ensure_tracking(cfg, warn=_warn)
    ckpt_path = resolve_resume(cfg)
    run_id = cfg.mlflow.get("run_id")
    if ckpt_path and not run_id:
        run_id = checkpoint_meta(ckpt_path).get("mlflow_run_id") or None
        if not run_id:
            info = read_run_file(cfg.run_dir)
            run_id = info.get("run_id") if info else None
    logger = build_logger(cfg, run_id=run_id)
    module = OneGenModule(cfg)
    datamodule = build_datamodule(cfg)
    trainer = build_trainer(cfg, logger, build_callbacks(cfg, ckpt_path))
    # weights_only: Lightning's meta.pt / checkpoint file loads (checked already, loaded again).
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    final_run_id = module.mlflow_run_id if trainer.is_global_zero else None
    return FitResult(
        run_id=final_run_id,
        tracking_uri=str(cfg.mlflow.tracking_uri) if logger is not None else None,
        global_step=trainer.global_step,
        checkpoint_dir=str(cfg.checkpoint.dir),
        is_global_zero=trainer.is_global_zero,
        resumed_from=ckpt_path,
    )


# --------------------------------------------------------------------------- sampling


def load_weights(ckpt: str | Path, net: torch.nn.Module, which: str = "ema") -> None:
    """Load ``ema.*`` (or ``model.*``) weights of a Lightning checkpoint into a plain NextDiT.

    A file: a single-device checkpoint (weights only). A folder: a sharded (DCP) checkpoint,
    read in one process with ``no_dist=True`` (only the requested tensors are read) through
    the restricted reader of ``training.checkpoint_io``."""
    p = Path(ckpt)
    prefix = f"{which}."
    if p.is_dir():
        from training.checkpoint_io import safe_dcp_load

        target = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
        state = {"state_dict": target}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            safe_dcp_load(state, p, no_dist=True)
        net.load_state_dict({k[len(prefix) :]: v for k, v in state["state_dict"].items()})
        return
    ck = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    sd = {k[len(prefix) :]: v for k, v in ck["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(sd)


def load_image(path: str | Path, size: tuple[int, int] | None, multiple: int = 16) -> torch.Tensor:
    """An image -> [3, H, W] in [-1, 1], resized to ``size`` (or its own size rounded down to
    a multiple of ``multiple``, the VAE x patch stride).

    8-bit images map as training maps them, ``(v - 127.5) / 127.5``. 16-bit gray images (the
    depth subset's ``depth.png``) keep their precision: ``(v - 32767.5) / 32767.5`` over
    0..65535, the training reader's mapping, in all three channels, instead of PIL's RGB
    conversion, which clips everything above 255 to white."""
    import numpy as np
    from PIL import Image

    if not Path(path).is_file():  # missing, a folder, a FIFO or a device: never opened
        raise ConfigError(f"--image {path} is not a readable image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            wide = opened.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I")
            img = opened.copy() if wide else opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"--image {path} is not a readable image ({exc})") from None
    if size is None:
        w, h = img.size
        size = (max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple))
    if wide:
        gray = np.asarray(img, dtype=np.float32).clip(0, 65535)
        unit = Image.fromarray((gray - 32767.5) / 32767.5)  # float32: mode F
        unit = unit.resize((size[1], size[0]), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(unit, dtype=np.float32).copy())
        return x.clamp(-1, 1).expand(3, -1, -1).contiguous()
    img = img.resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def save_view(pixels: torch.Tensor, field: str, path: Path) -> Path:
    """One view [3, H, W] in [-1, 1] as a PNG in the format of the sample field it stands
    for: ``depth.png`` as a 16-bit gray PNG (the depth subset's format, channels averaged,
    near = bright), anything else 8-bit RGB."""
    import numpy as np
    from PIL import Image

    from training.callbacks import to_uint8

    if field == "depth.png":
        unit = (pixels.float().mean(0).clamp(-1, 1) + 1) / 2
        depth = (unit * 65535).round().to(torch.int32).cpu().numpy().astype(np.uint16)
        Image.fromarray(depth).save(path)  # uint16 -> mode I;16, written as 16-bit PNG
    else:
        Image.fromarray(to_uint8(pixels)).save(path)
    return path


def task_token(task: str) -> str:
    """The prompt token of a task the trainer builds (``image2depth`` -> ``[[depth2image]]``),
    or a ConfigError naming the tasks there are."""
    from training.tasks import all_task_names
    from training.tasks import task_token as token_of

    try:
        return token_of(task.strip("[]"))
    except KeyError:
        raise ConfigError(f"unknown task {task!r}; tasks: {all_task_names()}") from None


def sample_layout(task: str) -> tuple[str, tuple[str, ...]]:
    """``(token, fields)`` of a task ``onegen sample`` runs: the fields of its two views as
    the trainer lays them out (view 0 the target, view 1 the condition ``--image``), or one
    field for ``text2image``. ``depth2image``: ``(jpg, depth.png)``, the depth map is the
    condition; ``image2depth``: ``(depth.png, jpg)``, the photo is the condition and the
    depth map is generated. faceid: one reference image (view 1)."""
    from training.tasks import task_spec

    token = task_token(task)
    spec = task_spec(task.strip("[]"), num_views=2)
    return token, spec.views


def sample_from_checkpoint(
    checkpoint: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    image: str | Path | None = None,
    prompt: str = "a photo",
    steps: int | None = None,
    guidance: float | None = None,
    size: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    device: str = "cpu",
) -> list[Path]:
    """Generate with a checkpoint's EMA weights; writes one PNG per view plus a strip.

    ``text2image`` generates one image from the prompt. Every other task generates view 0
    from the condition ``image`` (view 1), in the trainer's layout: the forward direction of
    a map task (``depth2image``, ``pose2image``) takes the map and makes a photo, the reverse
    (``image2depth``, ``image2pose``) takes a photo and makes the map. Each view is written
    in its field's format (a depth map as a 16-bit gray PNG, see :func:`save_view`)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from model import NextDiT
    from training.callbacks import save_grid
    from training.errors import CheckpointError
    from training.module import build_encoders, generate, model_config

    task = task.strip("[]")
    token, fields = sample_layout(task)
    if len(fields) == 1 and image is not None:
        raise ConfigError(f"--task {task} generates from the prompt alone: drop --image")
    if len(fields) > 1 and image is None:
        raise ConfigError(
            f"--task {task} needs --image: the {fields[1]} condition "
            f"({'a photo' if fields[1].endswith('jpg') else 'a map'}); view 0 ({fields[0]}) is generated"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = checkpoint_meta(checkpoint)
    if not meta.get("config"):
        raise ConfigError(f"{checkpoint} has no One-Gen config (not a OneGenModule checkpoint?)")
    cfg = OmegaConf.create(meta["config"])
    net = NextDiT(model_config(cfg))
    try:
        load_weights(checkpoint, net, weights)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, CheckpointException) as exc:
        lines = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{checkpoint}: its {weights} weights do not load into the model its config "
            f"describes ({lines[-1] if lines else type(exc).__name__})"
        ) from None
    net.eval().to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frozen = build_encoders(cfg, net.config.caption_dim, out / ".tiny_vocab").to(device)
    side = int(size or cfg.samples.resolution)
    cond_pixels = cond_mask = None
    views = 1
    if image is not None:
        cond = load_image(image, (side, side) if size else None)
        cond_pixels = torch.stack([torch.zeros_like(cond), cond])[None]  # view 0 = target
        cond_mask = torch.tensor([[False, True]])
        views = 2
    pixels = generate(
        lambda x, t, txt, m: net(x, t, txt, m),
        frozen,
        [f"{token} {prompt}"],
        views=views,
        size=(side, side),
        cond_pixels=cond_pixels,
        cond_mask=cond_mask,
        steps=int(steps or cfg.samples.steps),
        guidance=float(guidance if guidance is not None else cfg.samples.get("guidance", 1.0)),
        shift=float(cfg.samples.get("shift", cfg.loss.shift)),
        seed=seed,
        device=torch.device(device),
    )[0]
    paths = []
    for v in range(pixels.shape[0]):
        role = "condition" if cond_mask is not None and bool(cond_mask[0, v]) else "generated"
        paths.append(save_view(pixels[v], fields[v], out / f"{task}_view{v}_{role}.png"))
    paths.append(save_grid([[pixels[v] for v in range(pixels.shape[0])]], out / f"{task}_grid.png"))
    return paths


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from training.errors import FitError

    try:
        result = fit(cfg)
    except (ConfigError, FitError) as exc:  # a checkpoint, the MLflow server, the data
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    return 0


def print_result(result: FitResult) -> None:
    if not result.is_global_zero:
        return
    print(f"done: step {result.global_step}; checkpoints in {result.checkpoint_dir}")
    if result.run_id:
        print(f"mlflow run: {result.run_id} ({result.tracking_uri})")
        print(f"review: mlflow ui --backend-store-uri {result.tracking_uri}")


if __name__ == "__main__":
    sys.exit(main())
