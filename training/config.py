"""The fit config: typed sections (OmegaConf structured configs), strict loading, one-line errors.

A config is the schema's defaults <- the YAML file <- dotted ``key=value`` overrides (values
parse as YAML). Every key must exist in the schema and every value must fit its type: a typo
(``trainer.max_step=5``) or a wrong type (``trainer.max_steps=abc``) is a ``ConfigError`` whose
one line names the key and the closest valid one, raised before anything is built, so a fit
never trains with a setting silently ignored. ``onegen train fit --print-config`` shows the
resolved result.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.overrides import apply_overrides, merge_file
from datagen.schema import SUBSETS
from training.data import tasks as T
from training.data.config import ConfigError, DataConfig, unknown_key

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Keys older configs used, and where they live now.
MOVED_KEYS = {
    "mlflow.experiment": "experiment",
    "mlflow.run_name": "run_name",
    "checkpoint.dir": "run_dir (checkpoints go to <run_dir>/checkpoints)",
}


# --------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    config: str = "tiny"  # model/config.py: tiny | small | onediffusion-2.8b | from_init
    overrides: dict[str, Any] = field(default_factory=dict)  # NextDiTConfig fields
    # The weights a new fit starts from (training/init_from.py): a released OneDiffusion
    # folder (pipeline root or transformer/) or a run's checkpoint. Not a resume.
    init_from: str | None = None
    init_weights: str = "ema"  # a checkpoint's ema or model weights
    meta_init: bool = True  # under FSDP2: build on meta, materialise, re-apply the init
    activation_checkpointing: bool = False
    compile: bool = False  # per-block torch.compile
    param_dtype: str = "bfloat16"  # FSDP2 compute dtype on CUDA (fp32 on CPU)


@dataclass
class EncodersSection:
    kind: str = "tiny"  # tiny (random, seeded) | pretrained (local folders, offline)
    seed: int = 0
    vae_path: str | None = None
    text_path: str | None = None
    vae_dtype: str | None = None
    text_dtype: str | None = None
    vae_apply_shift: bool = True
    text_max_length: int = 64


@dataclass
class LossSection:
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class OptimSection:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay_1d: bool = True
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global norm; 0: no clipping (the norm is still logged)
    foreach: bool = True


# LoRA's default targets (training/lora.py): attention q/k/v/out, the text k/v, the FFN.
LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out",
    "attn.to_k_text",
    "attn.to_v_text",
    "ffn.w_gate",
    "ffn.w_up",
    "ffn.w_down",
)


@dataclass
class LoraSection:
    # LoRA fine-tuning (training/lora.py): rank 0 trains the whole model. The base is
    # model.init_from, frozen; only adapters train, are averaged and checkpointed.
    rank: int = 0
    alpha: float | None = None  # None: the rank (scale 1)
    dropout: float = 0.0
    # our module names, matched as suffixes: every block's attention and FFN linears
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    base_dtype: str = "bfloat16"  # the frozen base's storage on one CUDA device (else fp32)


@dataclass
class EmaSection:
    enabled: bool = True
    decay: float = 0.999
    warmup_steps: int = 0


@dataclass
class TrainerSection:
    accelerator: str = "cpu"
    devices: Any = 1  # an int, or "auto"; torchrun / SLURM environments set it
    num_nodes: int = 1
    strategy: str = "auto"  # auto | fsdp | single
    precision: str = "auto"
    max_steps: int = 100
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    progress_bar: bool = False
    process_group_backend: str | None = None


@dataclass
class CheckpointSection:
    every_n_steps: int = 50
    keep: int = -1  # newest k checkpoints; -1 keeps all
    save_last: bool = False


@dataclass
class SyntheticSection:
    resolution: int = 64
    max_views: int = 2
    tasks: list[str] = field(default_factory=lambda: ["text2image", "canny2image", "depth2image"])
    multiview_fraction: float = 0.5


@dataclass
class DataSection(DataConfig):
    kind: str = "synthetic"  # onegen (shards, the fields above) | synthetic (below)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass
class SamplesSection:
    every_n_steps: int = 0  # 0: no sample grids
    tasks: list[str] = field(default_factory=lambda: ["text2image"])
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    resolution: int = 64
    steps: int = 8
    guidance: float = 1.0
    shift: float | None = None  # None: loss.shift
    seed: int = 0
    cell: int = 192  # shown side of each panel in the logged grids (pixels)


@dataclass
class EvalSection:
    # Held-out metrics in the fit (training/evaluation): every N steps the EMA model generates
    # num_samples held-out samples (data.holdout) of each task and scores them; 0: off.
    every_n_steps: int = 0
    tasks: list[str] | None = None  # None: every scored task the held-out samples carry
    num_samples: int = 4  # per task, over all ranks
    steps: int = 10  # sampler steps
    guidance: float | None = None  # None: samples.guidance
    seed: int = 0
    # Optional model-based scores from local folders (training/evaluation/scorers.py):
    clip_path: str | None = None  # a CLIP folder: text2image gets its CLIP score
    lpips_path: str | None = None  # LPIPS weights: photo and novel-view targets get LPIPS
    face_path: str | None = None  # ArcFace + face YOLO: faceid gets its ID similarity


@dataclass
class ThroughputSection:
    every_n_steps: int | None = None  # None: trainer.log_every_n_steps
    peak_flops: float | None = None  # None: from the CUDA device name


@dataclass
class MlflowSection:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    required: bool = True  # false: an unreachable server turns tracking off with a warning
    run_id: str | None = None  # attach to this run (a resume finds it by itself)
    synchronous: bool = False
    system_metrics: bool = True
    system_metrics_interval: float = 10.0


@dataclass
class DebugSection:
    report_dir: str | None = None
    save_state: bool = True


@dataclass
class FitConfig:
    name: str = "onegen"  # the config's name: the prefix of every run name
    experiment: str = "onegen"  # runs/<experiment>/<run name>/ and the MLflow experiment
    seed: int = 0
    runs_dir: str = "runs"
    run_name: str | None = None  # None: <name>-<YYYYmmdd-HHMMSS> (or the launcher's job id)
    run_dir: str | None = None  # None: <runs_dir>/<experiment>/<run_name>
    resume: str | None = None  # null | last | auto | <run name> | <run folder> | <checkpoint>
    model: ModelSection = field(default_factory=ModelSection)
    encoders: EncodersSection = field(default_factory=EncodersSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    lora: LoraSection = field(default_factory=LoraSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    data: DataSection = field(default_factory=DataSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    throughput: ThroughputSection = field(default_factory=ThroughputSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    debug: DebugSection = field(default_factory=DebugSection)


CHOICES: dict[str, tuple[str, ...]] = {
    "encoders.kind": ("tiny", "pretrained"),
    "model.init_weights": ("ema", "model"),
    "lora.base_dtype": ("float32", "bfloat16", "float16"),
    "optim.schedule": ("constant", "cosine"),
    "trainer.strategy": ("auto", "fsdp", "single"),
    "data.kind": ("onegen", "synthetic"),
}


# --------------------------------------------------------------------------- errors


def _section(path: str) -> Any:
    """The dataclass at dotted ``path`` of ``FitConfig`` (None past a free-form node)."""
    cls: Any = FitConfig
    for part in [p for p in path.split(".") if p]:
        found = next((f for f in fields(cls) if f.name == part), None)
        default = found.default_factory() if found and callable(found.default_factory) else None
        if not is_dataclass(default):
            return None
        cls = type(default)
    return cls


def unknown_key_message(full_key: str, known: Any = None) -> str:
    parent, _, leaf = full_key.rpartition(".")
    if full_key in MOVED_KEYS:
        return f"{full_key}: unknown key; it moved to {MOVED_KEYS[full_key]}"
    if known is None:
        cls = _section(parent)
        known = [f.name for f in fields(cls)] if cls is not None else []
    return unknown_key(full_key, known)


def _one_line(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = str(getattr(exc, "full_key", "") or "")
    msg = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
    if "not in" in msg and msg.startswith("Key "):
        return ConfigError(f"{where}{unknown_key_message(key)}")
    msg = msg.replace("Value ", "value ", 1)
    return ConfigError(f"{where}{key or 'config'}: {msg}")


# --------------------------------------------------------------------------- loading


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """``onegen train fit`` and ``python -m training.fit`` take the same arguments."""
    p.add_argument("--config", required=True, help="training/configs/<cfg>.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Lightning's and MLflow's INFO lines on the console too (default: the fit's own "
        "lines and the warnings)",
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")


def config_from_args(args: argparse.Namespace, prog: str) -> DictConfig | int:
    """The config of ``--config`` + overrides, or the exit code: 2 after a one-line error,
    0 after ``--print-config``. Light (no torch, no Lightning): a bad key costs no imports."""
    try:
        cfg = load_config(args.config, list(args.overrides))
        if not args.print_config:
            check_encoder_weights(cfg)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return cfg


def schema() -> DictConfig:
    return OmegaConf.structured(FitConfig)


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, resolve_env: bool = True
) -> DictConfig:
    """Schema <- YAML file <- overrides, checked, interpolations resolved. ``ConfigError``
    (one line naming the key) on anything the schema does not take."""
    cfg = schema()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
        try:
            cfg = merge_file(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"{path}: ") from None
    try:
        apply_overrides(cfg, list(overrides or []), strict=True)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, "override ") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, "") from None
    check(cfg)
    if resolve_env and not cfg.mlflow.tracking_uri:
        # What MLflow itself and Lightning's MLFlowLogger would use; never a hard-coded store
        # over the user's environment.
        cfg.mlflow.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return cfg


def check(cfg: DictConfig) -> None:
    """What types alone cannot say: choices, ranges, the data node of the chosen source."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool))):
        raise ConfigError(f"trainer.devices: an integer or auto; got {devices!r}")
    for key in ("trainer.max_steps", "trainer.num_nodes", "trainer.accumulate_grad_batches"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    if cfg.trainer.log_every_n_steps < 1:
        raise ConfigError("trainer.log_every_n_steps: must be >= 1")
    if cfg.checkpoint.every_n_steps < 1:
        raise ConfigError("checkpoint.every_n_steps: must be >= 1")
    for key in ("name", "experiment", "run_name"):
        value = cfg.get(key)
        if value is not None and (not str(value) or "/" in str(value) or str(value) in (".", "..")):
            raise ConfigError(f"{key}: {value!r} must be a plain name (no '/')")
    check_lora(cfg)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: two numbers; got {list(cfg.optim.betas)}")
    unknown = sorted(set(cfg.samples.tasks) - set(T.all_task_names()))
    if unknown:
        raise ConfigError(
            f"samples.tasks: unknown task {unknown[0]!r}; tasks: {T.all_task_names()}"
        )
    synthetic = cfg.data.synthetic
    unknown = sorted(set(synthetic.tasks) - set(T.all_task_names()))
    if unknown:
        raise ConfigError(f"data.synthetic.tasks: unknown task {unknown[0]!r}")
    if cfg.data.kind == "onegen":
        DataConfig.from_any(cfg.data)
    check_eval(cfg)


def check_eval(cfg: DictConfig) -> None:
    """The ``eval`` section: held-out samples to score, tasks that have a metric."""
    from training.evaluation.scored import CLIP_TASKS, FACE_TASKS, scorable_tasks
    from training.evaluation.scorer_folders import scorer_folders_problem

    e = cfg.eval
    folders = {k: (e[f"{k}_path"], f"eval.{k}_path") for k in ("clip", "lpips", "face")}
    problem = scorer_folders_problem(folders)
    if problem:
        raise ConfigError(problem)
    scored = scorable_tasks(e.clip_path, e.face_path)
    if e.every_n_steps < 0:
        raise ConfigError(f"eval.every_n_steps: must be >= 0 (0: off); got {e.every_n_steps}")
    for key in ("num_samples", "steps"):
        if e[key] < 1:
            raise ConfigError(f"eval.{key}: must be >= 1; got {e[key]}")
    if e.tasks is not None:
        unknown = [t for t in e.tasks if t not in scored]
        if unknown:
            hint = {**dict.fromkeys(CLIP_TASKS, " (with eval.clip_path)"),
                    **dict.fromkeys(FACE_TASKS, " (with eval.face_path)")}.get(unknown[0], "")  # fmt: skip
            raise ConfigError(
                f"eval.tasks: {unknown[0]!r} has no held-out metric{hint}; scored tasks: "
                f"{', '.join(scored)}"
            )
    # Synthetic data has nothing to hold out: the fit runs without held-out metrics (a
    # warning), as a config switched to synthetic batches for a quick check expects.
    if e.every_n_steps and cfg.data.kind == "onegen" and not cfg.data.holdout:
        raise ConfigError(
            "eval.every_n_steps: held-out metrics need held-out samples: set data.holdout > 0 "
            "(or eval.every_n_steps=0)"
        )


def check_lora(cfg: DictConfig) -> None:
    """The ``lora`` section's ranges; a LoRA fit needs a base (``model.init_from``)."""
    lora = cfg.lora
    if lora.rank < 0:
        raise ConfigError(f"lora.rank: must be >= 0 (0: no LoRA); got {lora.rank}")
    if lora.rank == 0:
        return
    if lora.alpha is not None and lora.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be > 0; got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1); got {lora.dropout}")
    if not lora.targets:
        raise ConfigError("lora.targets: at least one module name (e.g. attn.to_q)")
    if not cfg.model.init_from:
        raise ConfigError(
            "lora.rank > 0 needs model.init_from: the base the adapters train on (the "
            "released folder or a run's checkpoint)"
        )


def check_encoder_weights(cfg: DictConfig) -> None:
    """``encoders.kind=pretrained``: the VAE and T5 folders read as their loaders will
    (layout, ``config.json`` naming the model, every weights file's header or pickle scan;
    no tensor loaded), so a broken folder is a one-line ``ConfigError`` naming the key
    before anything is built. Run where the fit runs (``onegen train fit``), not by
    :func:`load_config`: a config is also read where its weights are not."""
    enc = cfg.encoders
    if enc.kind != "pretrained":
        return
    from common.safe_pt import first_line
    from common.weights_check import READ_ERRORS, PretrainedFolder
    from model.encoders import local_folder  # the loaders' flat-or-pipeline-root rule

    folders = {
        "vae_path": (
            "vae",
            PretrainedFolder(
                "vae",
                "AutoencoderKL",
                ("AutoencoderKL",),
                config_key="_class_name",
                stem="diffusion_pytorch_model",
                pickled_ok=True,
            ),
        ),
        "text_path": (
            "text_encoder",
            PretrainedFolder("text encoder", "T5EncoderModel", ("t5",), pickled_ok=True),
        ),
    }
    for key, (subfolder, check_folder) in folders.items():
        path = enc.get(key)
        if not path:
            raise ConfigError(f"encoders.{key}: encoders.kind=pretrained needs a local folder")
        try:
            check_folder(local_folder(str(path), subfolder, "config.json"))
            if key == "text_path":
                local_folder(str(path), "tokenizer", "tokenizer_config.json")
        except READ_ERRORS as exc:
            raise ConfigError(f"encoders.{key}: {first_line(exc)}") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_checkpoint(text: str) -> DictConfig:
    """The config a checkpoint was trained with, on today's schema: keys the schema no longer
    has are dropped (a checkpoint outlives config changes), types still checked."""
    saved = OmegaConf.create(text)
    kept = _known_only(OmegaConf.to_container(saved, resolve=True), FitConfig)
    return merge_file(schema(), OmegaConf.create(kept))


def _known_only(node: Any, cls: Any) -> Any:
    if not isinstance(node, dict) or cls is None:
        return node
    by_name = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in node.items():
        f = by_name.get(key)
        if f is None:
            continue
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        out[key] = _known_only(value, type(default)) if is_dataclass(default) else value
    return out


def model_config(cfg: DictConfig):
    """The fit's ``NextDiTConfig``: a named config with ``model.overrides``, or ``from_init``,
    whose architecture ``training.init_from`` wrote into ``model.overrides`` from the folder
    when the fit started (so a checkpoint's config is whole without that folder)."""
    from model import NextDiTConfig, config_names, get_config
    from model.release import STRUCTURAL

    node = cfg.model.get("overrides")
    overrides = OmegaConf.to_container(node, resolve=True) if node else {}
    name = str(cfg.model.config)
    if name == "from_init":
        missing = [f for f in STRUCTURAL if f not in overrides]
        if missing:
            raise ConfigError(
                "model.config: from_init is read from model.init_from when the fit starts "
                f"(model.overrides lacks {missing[0]})"
            )
        overrides["patch_size"] = tuple(overrides["patch_size"])  # type: ignore[index]
        return NextDiTConfig(name=name, **overrides)  # type: ignore[arg-type]
    if name not in config_names():
        raise ConfigError(f"model.config: {name!r} is not one of {config_names() + ['from_init']}")
    return get_config(name, **overrides)  # type: ignore[arg-type]


def trained_tasks(cfg: DictConfig) -> list[str]:
    """The task names a fit with this config trains on (``onegen sample`` refuses others)."""
    data = cfg.data
    if data.kind == "synthetic":
        return list(dict.fromkeys(str(t) for t in data.synthetic.tasks))
    allowed = set(data.tasks) if data.tasks is not None else None
    paths = OmegaConf.to_container(data.paths, resolve=True) if data.paths is not None else None
    mix = OmegaConf.to_container(data.mix, resolve=True) if data.mix is not None else None
    # Folders: their subsets were found at fit time; every subset's tasks are possible.
    subsets = [str(s) for s in paths] if isinstance(paths, dict) else list(SUBSETS)
    if mix:
        subsets = [s for s in subsets if float(mix.get(s, 0.0)) > 0]
    names: list[str] = []
    for subset in subsets:
        for name in T.subset_task_names(subset):
            if allowed is None or name in allowed:
                names.append(name)
    return list(dict.fromkeys(names))
