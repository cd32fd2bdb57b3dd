"""``model.init_from``: the weights a new fit starts from (the released OneDiffusion model, or
an earlier run's checkpoint), with a fresh optimizer, step 0, a fresh data position and a
new run, unlike ``resume``, which continues a run.

Everything about the source is checked when the fit starts, before a tensor is read:
the folder is the release's layout (``model.release``), every safetensors header parses
(``common.weights_check``), its ``config.json`` describes the model the config names
(or ``model.config: from_init`` takes the architecture from it), a checkpoint is whole and
holds nothing but weights and plain data (``training.checkpoint_io``). Each problem is one
``ConfigError`` line naming the key.

Loading (:func:`load_init_state`) reads the full state dict once, on CPU; under FSDP2 only
rank 0 reads it and the shards are broadcast (``OneGenModule.on_fit_start``), so nothing
else holds the full model per rank.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.data.config import ConfigError

FROM_INIT = "from_init"
INIT_WEIGHTS = ("ema", "model")
RESUMES_ALLOWED = (None, "", "auto")  # auto: a requeued fine-tune continues its own run


@dataclass(frozen=True)
class InitSource:
    """A checked ``init_from``: what it is, the files its weights come from, the
    architecture it holds, and (a checkpoint) the run that wrote it."""

    kind: str  # release | checkpoint
    path: Path  # the transformer folder, or the checkpoint file / folder
    files: tuple[Path, ...]
    net_config: Any  # model.NextDiTConfig
    weights: str = "ema"  # a checkpoint's ema or model weights
    source_run_id: str = ""
    release_config: dict = field(default_factory=dict)  # the folder's config.json
    fit_config: Any = None  # a checkpoint's fit config (a LoRA run's names its base)

    def record(self) -> dict[str, Any]:
        """What the fit started from, for MLflow and the run folder (and a LoRA fit's
        checkpoints): path, kind, each file's sha256 and the source run."""
        return {
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "weights": self.weights if self.kind == "checkpoint" else "release",
            "sha256": dict(self.digests),
            "source_run_id": self.source_run_id,
        }

    @functools.cached_property
    def digests(self) -> dict[str, str]:
        """Each file's sha256, read once per process (a 2.8B base is 5.6 GB in bf16)."""
        return {_name(f, self.path): _sha256(f) for f in self.files}


def _name(file: Path, root: Path) -> str:
    return file.name if file == root else str(file.relative_to(root))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_release_folder(path: str | Path) -> tuple[Path, dict, Any, list[Path]]:
    """``(transformer folder, its config.json, our NextDiTConfig of it, its safetensors
    files)`` of a released (or exported) folder, every file's header read, no tensor: a
    ``model.release.ReleaseFormatError`` or one of ``common.weights_check.READ_ERRORS``
    (one line each) otherwise. Shared by ``model.init_from`` and ``onegen sample --weights``."""
    from common.weights_check import check_safetensors
    from model.release import (
        ReleaseFormatError,
        config_from_release,
        read_release_config,
        release_weight_files,
        transformer_folder,
    )

    folder = transformer_folder(path)
    raw = read_release_config(folder)
    net = config_from_release(raw, str(folder / "config.json"))
    files = release_weight_files(folder)
    for file in files:
        if not file.is_file():
            raise ReleaseFormatError(f"{file}: named by the shard index, not there")
        check_safetensors(file)
    return folder, raw, net, files


def _release_source(path: Path) -> InitSource:
    from common.safe_pt import first_line
    from common.weights_check import READ_ERRORS
    from model.release import ReleaseFormatError

    try:
        folder, raw, net, files = read_release_folder(path)
    except (ReleaseFormatError, *READ_ERRORS) as exc:
        raise ConfigError(f"model.init_from: {first_line(exc)}") from None
    return InitSource("release", folder, tuple(files), net, release_config=raw)


def _checkpoint_source(path: Path, weights: str) -> InitSource:
    from common.safe_pt import first_line
    from training.checkpoint_io import onegen_meta, verify_checkpoint
    from training.config import from_checkpoint, model_config
    from training.errors import CheckpointError

    try:
        meta = onegen_meta(verify_checkpoint(path))
    except CheckpointError as exc:
        raise ConfigError(f"model.init_from: {first_line(exc)}") from None
    if not meta.get("config"):
        raise ConfigError(f"model.init_from: {path} has no One-Gen config (not a fit's checkpoint)")
    saved = from_checkpoint(meta["config"])
    if weights == "ema" and not saved.ema.enabled:
        raise ConfigError(f"model.init_weights: ema, but {path} was trained without EMA; use model")
    try:
        net = model_config(saved)
    except (ConfigError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"model.init_from: {path}: its model config is not valid ({exc})"
        ) from None
    files = (path,) if path.is_file() else tuple(sorted(p for p in path.rglob("*") if p.is_file()))
    run_id = str(meta.get("mlflow_run_id") or "")
    return InitSource("checkpoint", path, files, net, weights, run_id, fit_config=saved)


def find_init(cfg: DictConfig) -> InitSource | None:
    """The checked source of ``model.init_from`` (None without one); raises a one-line
    ``ConfigError``. A folder with ``config.json`` or ``transformer/`` is a release, a run
    folder (with ``checkpoints/``) its newest whole checkpoint, any other path a checkpoint
    (a ``.ckpt`` file or a sharded checkpoint folder)."""
    mcfg = cfg.model
    if not mcfg.init_from:
        if mcfg.config == FROM_INIT:
            raise ConfigError(
                "model.config: from_init needs model.init_from (a folder or checkpoint)"
            )
        return None
    if cfg.resume not in RESUMES_ALLOWED and not int(cfg.lora.rank):  # LoRA: the base
        raise ConfigError(
            f"model.init_from and resume={cfg.resume}: a fit either starts from weights "
            "(init_from: new run, fresh optimizer, step 0) or continues a run (resume), not both"
        )
    path = Path(str(mcfg.init_from)).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from: {path}: not found")
    is_release = path.is_dir() and (
        (path / "config.json").is_file() or (path / "transformer").is_dir()
    )
    if is_release:
        return _release_source(path)
    from common.safe_pt import first_line
    from training.errors import CheckpointError, warn
    from training.run.folders import checkpoint_or_newest

    try:  # a run folder: its newest whole checkpoint, as resume finds it
        path = checkpoint_or_newest(path, "model.init_from", warn)
    except CheckpointError as exc:
        raise ConfigError(f"model.init_from: {first_line(exc)}") from None
    return _checkpoint_source(path, str(mcfg.init_weights))


def apply_init_config(cfg: DictConfig, source: InitSource) -> None:
    """``from_init``: the architecture written into ``model.overrides`` (so the config, and
    every checkpoint of the fit, names it in full without the folder). A named config:
    every architecture field that differs from the source's is an error, listed."""
    from model.release import STRUCTURAL, config_differences
    from training.config import model_config

    if cfg.model.config == FROM_INIT:
        fields = {f: getattr(source.net_config, f) for f in STRUCTURAL}
        fields["patch_size"] = list(fields["patch_size"])
        cfg.model.overrides = OmegaConf.create(fields)
        return
    named = model_config(cfg)
    diff = config_differences(named, dataclasses.replace(source.net_config, name=named.name))
    if diff:
        raise ConfigError(
            f"model.init_from: {source.path} holds another architecture than model.config "
            f"{named.name!r}: {'; '.join(diff)} (model.config: from_init takes the folder's)"
        )


def prepare_init(cfg: DictConfig) -> InitSource | None:
    """:func:`find_init` then :func:`apply_init_config`: run once where a fit starts."""
    source = find_init(cfg)
    if source is not None:
        apply_init_config(cfg, source)
    return source


def load_init_state(source: InitSource, net_config: Any) -> dict[str, Any]:
    """The source's weights under our names, full, on CPU, checked against a model of
    ``net_config``: keys and shapes strict (one error listing what is missing, unexpected
    or of another shape)."""
    import torch

    from model import NextDiT
    from model.convert import CheckpointMismatchError, released_to_ours
    from model.release import read_release_weights

    with torch.device("meta"):
        expected = NextDiT(net_config).state_dict()
    if source.kind == "release":
        try:
            return released_to_ours(read_release_weights(source.path), expected)
        except CheckpointMismatchError as exc:
            one_line = "; ".join(line.strip() for line in str(exc).splitlines())
            raise ConfigError(f"model.init_from: {source.path}: {one_line}") from None
    from training.lora import enabled

    if source.fit_config is not None and enabled(source.fit_config):  # its base + adapters
        return load_lora_checkpoint(
            source.path, source.fit_config, net_config, source.weights
        ).state_dict()
    from training.checkpoint_io import load_weights

    with torch.device("cpu"):
        net = NextDiT(net_config)
    load_weights(source.path, net, source.weights)
    return net.state_dict()


def load_lora_checkpoint(
    checkpoint: str | Path, cfg: Any, net_config: Any, weights: str = "ema", merge: bool = True
) -> Any:
    """A LoRA run's checkpoint as a plain model on CPU: its base read from the
    ``model.init_from`` it trained on (checked against the sha256s the checkpoint recorded),
    its adapters (``ema`` averages or the live ``model`` ones) from the checkpoint, merged
    into the base unless ``merge`` is False. One-line ConfigError / CheckpointError."""
    from model import NextDiT
    from training.checkpoint_io import checkpoint_meta, read_checkpoint_tensors
    from training.errors import CheckpointError
    from training.lora import (
        adapter_parameters,
        add_adapters,
        checkpoint_adapter_key,
        merge_adapters,
    )

    base = checkpoint_meta(checkpoint).get("lora_base") or {}
    try:
        source = find_init(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{checkpoint}: its LoRA base: {exc}") from None
    if source is None or base.get("sha256") != source.digests:
        raise CheckpointError(
            f"{checkpoint}: its adapters were trained on {base.get('path')!r}, and "
            f"{cfg.model.init_from!r} no longer holds those weights (sha256 differ)"
        )
    net = NextDiT(net_config)
    net.load_state_dict(load_init_state(source, net_config))
    add_adapters(net, cfg.lora)
    template = {checkpoint_adapter_key(n, weights): p.detach() for n, p in adapter_parameters(net)}
    found = read_checkpoint_tensors(checkpoint, template)
    import torch

    with torch.no_grad():
        for name, p in adapter_parameters(net):
            p.copy_(found[checkpoint_adapter_key(name, weights)])
    net.requires_grad_(False)
    return merge_adapters(net) if merge else net
