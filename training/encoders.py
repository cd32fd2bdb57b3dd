"""The frozen VAE and text encoder a fit encodes with online: built, never trained or saved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from datagen.schema import TASK_LABELS, image_marker
from model.encoders import (
    TINY_VAE_BLOCKS,
    FrozenTextEncoder,
    FrozenVAE,
    local_folder,
    vae_downsample,
)
from training.config import ConfigError, check_encoder_weights, schema

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
}

# A diffusers pipeline root's encoder folders (the released OneDiffusion's layout).
PIPELINE_ENCODERS = ("vae", "text_encoder", "tokenizer")
RELEASE_TEXT_MAX_LENGTH = 300  # the released pipeline's tokenizer max_length

# Whole tokens in the tiny tokenizer; eight image markers cover every view count the
# readers build (multi-view samples are capped well below that).
TINY_TOKENS: tuple[str, ...] = (*TASK_LABELS, *(image_marker(i) for i in range(8)))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


@dataclass
class FrozenEncoders:
    """The frozen codec and text encoder; deliberately not an ``nn.Module`` attribute, so
    they are neither sharded, nor given to the optimizer, nor written to checkpoints."""

    vae: FrozenVAE
    text: FrozenTextEncoder

    def to(self, device: torch.device | str) -> FrozenEncoders:
        self.vae.to(device)
        self.text.to(device)
        return self


def build_encoders(cfg: DictConfig, caption_dim: int, vocab_dir: str | Path) -> FrozenEncoders:
    """``encoders.kind: tiny`` (random, seeded: the same weights in every process and at
    sampling time) or ``pretrained`` (local folders, offline)."""
    enc = cfg.encoders
    kind = str(enc.kind)
    if kind == "tiny":
        seed = int(enc.seed)
        vae = FrozenVAE.tiny(seed=seed, apply_shift=bool(enc.vae_apply_shift))
        text = FrozenTextEncoder.tiny(
            vocab_dir,
            extra_tokens=TINY_TOKENS,
            max_length=int(enc.text_max_length),
            d_model=caption_dim,
            seed=seed + 1,
        )
    elif kind == "pretrained":
        if not enc.vae_path or not enc.text_path:
            raise ValueError(
                "encoders.kind=pretrained needs encoders.vae_path and encoders.text_path"
            )
        vae = FrozenVAE.from_pretrained(
            str(enc.vae_path),
            dtype=parse_dtype(enc.vae_dtype),
            apply_shift=bool(enc.vae_apply_shift),
        )
        text = FrozenTextEncoder.from_pretrained(
            str(enc.text_path),
            max_length=int(enc.text_max_length),
            dtype=parse_dtype(enc.text_dtype),
        )
    else:
        raise ValueError(f"encoders.kind must be 'tiny' or 'pretrained', got {kind!r}")
    if text.dim != caption_dim:
        raise ValueError(f"text encoder width {text.dim} != model caption_dim {caption_dim}")
    return FrozenEncoders(vae=vae, text=text)


def vae_stride(cfg: DictConfig) -> int:
    """The downsampling factor of the VAE a config encodes with, read without building it:
    the tiny VAE's blocks, or ``block_out_channels`` in a pretrained VAE's ``config.json``."""
    enc = cfg.encoders
    if str(enc.kind) != "pretrained" or not enc.vae_path:
        return vae_downsample(TINY_VAE_BLOCKS)
    folder = local_folder(str(enc.vae_path), "vae", "config.json")
    try:
        blocks = json.loads((folder / "config.json").read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{folder / 'config.json'}: not a VAE config ({type(exc).__name__}: {exc})"
        ) from None
    return vae_downsample(blocks)


def _config_value(folder: Path, key: str) -> int:
    path = folder / "config.json"
    try:
        return int(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: no {key} ({type(exc).__name__}: {exc})") from None


def pipeline_encoders(root: str | Path, caption_dim: int, latent_channels: int) -> DictConfig:
    """The schema's config with ``encoders.kind=pretrained`` on a pipeline root's ``vae/``,
    ``text_encoder/`` and ``tokenizer/``, checked before anything loads: the folders read as
    a fit's (:func:`training.config.check_encoder_weights`), the T5 is as wide as the
    transformer's captions and the VAE has its latent channels (otherwise the first
    forward fails, after every weight is read). A one-line ConfigError otherwise."""
    cfg = schema()
    cfg.encoders.kind = "pretrained"
    cfg.encoders.vae_path = cfg.encoders.text_path = str(root)
    cfg.encoders.text_max_length = RELEASE_TEXT_MAX_LENGTH
    check_encoder_weights(cfg)
    width = _config_value(local_folder(str(root), "text_encoder", "config.json"), "d_model")
    vae = local_folder(str(root), "vae", "config.json")
    channels = _config_value(vae, "latent_channels")
    if width != caption_dim:
        raise ConfigError(
            f"{root}: its text encoder is {width} wide, the transformer's captions {caption_dim}"
        )
    if channels != latent_channels:
        raise ConfigError(
            f"{vae}: {channels} latent channels, the transformer takes {latent_channels}"
        )
    return cfg
