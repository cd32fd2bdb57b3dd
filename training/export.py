"""``onegen export``: a run's checkpoint as the released OneDiffusion folder, so the release's
pipeline (lehduong/OneDiffusion, diffusers) and ``onegen sample --weights`` load it.

    onegen export --checkpoint runs/onegen-demo/<run> --out exported/
    onegen export --checkpoint step00001000.ckpt --out exported/ --dtype float32 \\
        --components /models/OneDiffusion
    onegen export --checkpoint runs/onegen-lora/<run> --out merged/ --merge-lora
    onegen export --checkpoint runs/onegen-lora/<run> --out adapters/   # peft's layout

``transformer/`` is written by ``model.release`` (``config.json`` with the release's keys,
``diffusion_pytorch_model*.safetensors``, sharded with an index past ``--max-shard-size``).
``--components`` copies the released ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/`` (files only: nothing in them runs, no ``.py`` is copied) and writes the
pipeline's ``model_index.json``. A LoRA fit's checkpoint exports its adapters merged into
its base (``--merge-lora``) or alone, in peft's layout under the release's module names (so
peft loads them onto the release's ``NextDiT``). Everything is checked before a tensor is
read, and the folder is written next to ``--out`` and renamed into place, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from model import NextDiT, NextDiTConfig
from training.config import ConfigError
from training.errors import CheckpointError, FitError
from training.run.folders import checkpoint_or_newest

PIPELINE_CLASS = "OneDiffusionPipeline"
MODEL_INDEX = "model_index.json"
COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"
# ``model_index.json`` as diffusers' ``register_modules`` records the release's
# ``OneDiffusionPipeline(transformer: NextDiT, vae: AutoencoderKL, text_encoder:
# T5EncoderModel, tokenizer: T5Tokenizer, scheduler: FlowMatchEulerDiscreteScheduler)``: a
# class outside diffusers / transformers is named by its module.
PIPELINE_MODULES: dict[str, tuple[str, str]] = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "T5Tokenizer"),
    "transformer": ("onediffusion.models.denoiser.nextdit.modeling_nextdit", "NextDiT"),
    "vae": ("diffusers", "AutoencoderKL"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD = "5GB"  # diffusers' save_pretrained default
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, **{f"{u}B": 1000 ** (i + 1) for i, u in enumerate("KMGT")}}
_UNITS.update({f"{u}IB": 1024 ** (i + 1) for i, u in enumerate("KMGT")})


class ExportUsageError(ConfigError):
    """An export asked for wrongly (``--out``, ``--max-shard-size``, ``--components``,
    ``--ema`` of a fit without EMA): found before any weights are read; exit code 2."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Path  # the checkpoint read (a run folder's newest whole one)
    weights: str  # ema | model
    dtype: str
    files: tuple[Path, ...]  # every file written, relative to ``out``
    components: Path | None
    adapters: bool = False  # a LoRA checkpoint's adapters alone (peft's layout)

    def summary(self) -> str:
        """The one line ``onegen export`` prints."""
        if self.adapters:
            return (
                f"wrote {self.out}: the LoRA adapters ({self.weights}) of {self.checkpoint} in "
                f"peft's layout ({', '.join(str(f) for f in self.files)}), under the release's "
                "module names; --merge-lora writes the merged transformer instead"
            )
        shards = sum(1 for f in self.files if f.suffix == ".safetensors")
        what = f"{self.out}: transformer/ ({self.weights} weights of {self.checkpoint}, "
        what += f"{self.dtype}, {shards} safetensors file{'s' if shards > 1 else ''})"
        if self.components is None:
            return (
                f"wrote {what} only: no --components, so no vae/, text_encoder/, tokenizer/, "
                f"scheduler/ or {MODEL_INDEX} (not a whole pipeline)"
            )
        return f"wrote {what}, {', '.join(COMPONENTS)} from {self.components} and {MODEL_INDEX}"


def _warn(message: str) -> None:
    print(f"onegen export: warning: {message}", file=sys.stderr)


def parse_size(text: str | int) -> int:
    """Bytes of a shard size as diffusers writes them (``5GB`` = 5e9, ``500MiB``, ``2048``)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ExportUsageError(
                f"--max-shard-size {text!r} is not a size (e.g. 5GB, 500MB, 2GiB, 100000)"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ExportUsageError(f"--max-shard-size {text!r} must be more than 0 bytes")
    return value


def read_checkpoint(path: Path, weights: str) -> tuple[DictConfig, NextDiTConfig]:
    """The checkpoint's fit config and model config, from its metadata only (it is checked
    whole and safe first); a fit without EMA asked for its EMA is a usage error."""
    from training.inference.sample import fit_config, net_config

    cfg = fit_config(path)
    if weights == "ema" and not cfg.ema.enabled:
        raise ExportUsageError(
            f"--ema: {path} was trained without EMA (ema.enabled false); pass --no-ema"
        )
    return cfg, net_config(cfg, path)


def check_lora_options(cfg: DictConfig, path: Path, merge: bool, components: Any) -> bool:
    """Whether ``path`` is a LoRA fit's (adapters on its ``model.init_from`` base): it
    exports merged into the base (``--merge-lora``) or as the adapters alone, which take no
    ``--components``; ``--merge-lora`` of a full fit is a usage error."""
    from training.lora import enabled

    is_lora = enabled(cfg)
    if merge and not is_lora:
        raise ExportUsageError(f"--merge-lora: {path} is a full fit's checkpoint, not LoRA")
    if is_lora and not merge and components is not None:
        raise ExportUsageError(
            "--components: a LoRA checkpoint without --merge-lora exports its adapters "
            "alone (peft's layout); add --merge-lora for a whole pipeline"
        )
    return is_lora


def write_adapters(
    src: Path, cfg: DictConfig, mcfg: NextDiTConfig, weights: str, dtype: str
) -> Callable[[Path], list[Path]]:
    """Writes a LoRA checkpoint's adapters into a folder in peft's layout under the
    release's module names (``training.lora.save_peft_adapters``)."""
    from training.init_from import load_lora_checkpoint
    from training.lora import save_peft_adapters

    net = load_lora_checkpoint(src, cfg, mcfg, weights, merge=False)

    def write(folder: Path) -> list[Path]:
        base = str(cfg.model.init_from)
        files = save_peft_adapters(net, cfg.lora, folder, DTYPES[dtype], base=base)
        return [f.relative_to(folder) for f in files]

    return write


def load_export_net(path: Path, cfg: DictConfig, mcfg: NextDiTConfig, weights: str) -> NextDiT:
    """The weights to export, in a NextDiT on CPU (a LoRA fit's merged into its base)."""
    from training.inference.sample import load_run_net

    return load_run_net(path, cfg, mcfg, weights)


def release_config(mcfg: NextDiTConfig, keys: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The release's ``config.json`` for ``mcfg`` (``keys``: its keys that change no weight,
    e.g. ``rotary_max_length``), or a one-line error when its layout cannot hold the model."""
    from model.release import ReleaseFormatError, config_to_release

    try:
        return config_to_release(mcfg, **dict(keys or {}))
    except ReleaseFormatError as exc:
        raise CheckpointError(f"cannot export: {exc}") from None


# --------------------------------------------------------------------------- components


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def component_files(folder: str | Path) -> dict[str, list[Path]]:
    """Every file of the released pipeline's ``vae/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/``, checked to copy as data only: each part is there, no ``.py`` (code a
    loader could be told to run), no link out of the folder, nothing but regular files."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ExportUsageError(f"--components {root} is not a folder (a released pipeline)")
    real_root = root.resolve()
    found: dict[str, list[Path]] = {}
    for part in COMPONENTS:
        top = root / part
        if not top.is_dir():
            raise ExportUsageError(
                f"--components {root} has no {part}/ (needs {', '.join(c + '/' for c in COMPONENTS)})"
            )
        if top.is_symlink():
            raise ExportUsageError(f"--components: {top} is a linked folder; give the real one")
        files: list[Path] = []
        for current, dirs, names in os.walk(top, followlinks=False):
            for name in [*dirs, *names]:
                entry = Path(current) / name
                if entry.is_symlink() and not _inside(entry.resolve(), real_root):
                    raise ExportUsageError(
                        f"--components: {entry} links out of {root} (to {entry.resolve()})"
                    )
                if entry.is_symlink() and entry.is_dir():
                    raise ExportUsageError(f"--components: {entry} is a linked folder")
            for name in names:
                entry = Path(current) / name
                if entry.suffix == ".py":
                    raise ExportUsageError(f"--components: {entry} is Python code; not copied")
                if not entry.is_file():
                    raise ExportUsageError(f"--components: {entry} is not a regular file")
                files.append(entry)
        if not files:
            raise ExportUsageError(f"--components: {top} is empty")
        found[part] = sorted(files)
    return found


def check_components(folder: str | Path, mcfg: NextDiTConfig) -> dict[str, list[Path]]:
    """:func:`component_files`, and the parts fit the transformer: the VAE and T5 folders read
    as a fit's (``training.encoders.pipeline_encoders``: T5 as wide as the captions, the
    VAE's latent channels), the scheduler the one the release's pipeline loads."""
    from training.encoders import pipeline_encoders

    files = component_files(folder)
    root = Path(folder).expanduser()
    try:
        pipeline_encoders(root, mcfg.caption_dim, mcfg.in_channels)
    except ConfigError as exc:
        raise ExportUsageError(f"--components {root}: {exc}") from None
    path = root / "scheduler" / SCHEDULER_CONFIG
    try:
        name = json.loads(path.read_bytes()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportUsageError(f"--components: {path}: not a scheduler config ({exc})") from None
    wanted = PIPELINE_MODULES["scheduler"][1]
    if name != wanted:
        raise ExportUsageError(
            f"--components: {path}: _class_name is {name!r}; the release's pipeline loads {wanted}"
        )
    return files


def model_index() -> dict[str, Any]:
    """The pipeline's ``model_index.json``: what ``OneDiffusionPipeline.from_pretrained``
    reads to build each part."""
    from model.release import DIFFUSERS_VERSION

    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    index.update({name: list(entry) for name, entry in PIPELINE_MODULES.items()})
    return index


def copy_components(files: Mapping[str, list[Path]], src: Path, dst: Path) -> list[Path]:
    """Copy the checked files (a link's target's bytes, never the link) and write
    ``model_index.json``; returns the files written, relative to ``dst``."""
    written: list[Path] = []
    for part_files in files.values():
        for file in part_files:
            rel = file.relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, dst / rel)
            written.append(rel)
    (dst / MODEL_INDEX).write_text(json.dumps(model_index(), indent=2, sort_keys=True) + "\n")
    return [*written, Path(MODEL_INDEX)]


# --------------------------------------------------------------------------- output


def check_out(out: Path, force: bool, keep: list[Path]) -> None:
    """``--out`` may be new or an empty folder; an existing one only with ``--force``, and
    never a folder holding the checkpoint or components it is exported from."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportUsageError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ExportUsageError(f"--out {out} exists and is not empty; pass --force to replace it")
    real = out.resolve()
    for path in keep:
        if _inside(path.resolve(), real):
            raise ExportUsageError(f"--out {out} holds {path}: --force would delete it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out`` (an old ``out`` is removed only once the new one is there)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    ema: bool = True,
    dtype: str = "bfloat16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    components: str | Path | None = None,
    force: bool = False,
    merge_lora: bool = False,
    release_keys: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] = _warn,
) -> ExportResult:
    """Write ``checkpoint``'s EMA (or model) weights as ``out/transformer/`` in the release's
    layout, cast to ``dtype``, plus the released pipeline's other parts from ``components``.

    Every check comes before any weight is read: the shard size, ``--out``, the checkpoint's
    config (whole, One-Gen's, EMA if asked for), the release layout holding the model, the
    components. Raises :class:`ExportUsageError` (usage), ``CheckpointError`` / ``ConfigError``
    (the checkpoint) or ``OSError`` (writing); nothing is left at ``out`` then."""
    from model.convert import export_released
    from model.release import cast_floats, save_release_folder

    if dtype not in DTYPES:
        raise ExportUsageError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser()
    src = checkpoint_or_newest(checkpoint, "export", warn)
    comp = Path(components).expanduser() if components is not None else None
    check_out(out, force, [src, *([comp] if comp else [])])
    weights = "ema" if ema else "model"
    cfg, mcfg = read_checkpoint(src, weights)
    if check_lora_options(cfg, src, merge_lora, comp) and not merge_lora:
        written = write_atomic(out, write_adapters(src, cfg, mcfg, weights, dtype))
        return ExportResult(out, src, weights, dtype, tuple(written), None, adapters=True)
    config = release_config(mcfg, release_keys)
    files = check_components(comp, mcfg) if comp is not None else None

    net = load_export_net(src, cfg, mcfg, weights)
    released = cast_floats(export_released(net), DTYPES[dtype])
    del net

    def write(folder: Path) -> list[Path]:
        written = sorted(p.relative_to(folder) for p in
                         save_release_folder(released, config, folder, shard_bytes).iterdir())  # fmt: skip
        if files is not None and comp is not None:
            written += copy_components(files, comp, folder)
        return written

    written = write_atomic(out, write)
    return ExportResult(out, src, weights, dtype, tuple(written), comp)


def write_atomic(out: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """``write`` into a temp folder next to ``out``, then renamed into place: a failed
    export leaves nothing at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        written = write(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def export_error_code(exc: BaseException) -> int | None:
    """``onegen export``'s exit code for an error it reports as one line (None: a bug)."""
    if isinstance(exc, ExportUsageError):
        return 2
    if isinstance(exc, (ConfigError, FitError, OSError)):
        return 1
    return None
