"""Sampling from a released (or ``onegen export``-ed) OneDiffusion folder, without a run:

    onegen sample --weights /models/OneDiffusion --task text2image --out samples/
    onegen sample --weights exported/ --encoders tiny --task depth2image --image d.png --out s/

The transformer comes from ``transformer/config.json`` (``model.release.config_from_release``)
and its safetensors (``model.convert.load_released``); nothing in the folder is executed.
Encoders: the folder's ``vae/``, ``text_encoder/`` and ``tokenizer/`` (``encoders.kind:
pretrained``), or with ``--encoders tiny`` the random tiny ones, as wide as the transformer's
captions, for checking the mechanics only. A folder has no fit config: the sampler's
defaults are the release's demo's (:data:`RELEASE_SAMPLES`) with its own encoders, the
schema's (``training.config.schema``, small and fast) with tiny ones. Every task is
allowed: the release trained them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from model import NextDiT, NextDiTConfig
from training.config import ConfigError, schema
from training.encoders import PIPELINE_ENCODERS, FrozenEncoders, pipeline_encoders
from training.errors import CheckpointError
from training.inference.sample import SampleUsageError, patch_grid, with_encoders

# The release's inference.py: 50 steps, guidance 4, 1024 x 1024.
RELEASE_SAMPLES = {"steps": 50, "guidance": 4.0, "resolution": 1024}


def pipeline_root(transformer: Path) -> Path:
    """The pipeline root of a transformer folder: the parent of a ``transformer/``, else the
    folder itself (a flat one has no encoders beside it)."""
    return transformer.parent if transformer.name == "transformer" else transformer


@dataclass(frozen=True)
class ReleaseWeights:
    """A :class:`training.inference.sample.ModelSource` of a released folder (the pipeline
    root or its ``transformer/``). ``encoders``: ``tiny``, ``pretrained`` or None (the
    folder's own when it has them, else a usage error asking for ``--encoders tiny``)."""

    path: Path
    encoders: str | None = None

    def read(self, task: str) -> tuple[DictConfig, NextDiTConfig, tuple[int, int]]:
        """The folder's model config and the encoders to sample with, every file's header
        read and no tensor; a one-line ConfigError for a folder that is not the release's."""
        from common.safe_pt import first_line
        from common.weights_check import READ_ERRORS
        from model.release import ReleaseFormatError
        from training.init_from import read_release_folder

        try:
            transformer, _, mcfg, _ = read_release_folder(self.path)
        except (ReleaseFormatError, *READ_ERRORS) as exc:
            raise ConfigError(f"--weights {first_line(exc)}") from None
        root = pipeline_root(transformer)
        missing = [f"{p}/" for p in PIPELINE_ENCODERS if not (root / p).is_dir()]
        if self.encoders == "tiny":
            cfg = schema()
            cfg.encoders.kind = "tiny"
        elif missing:
            raise SampleUsageError(
                f"--weights {self.path} has no {', '.join(missing)}: pass --encoders tiny to "
                "sample with random tiny encoders (mechanics only), or give a folder with the "
                "release's encoders (onegen export --components)"
            )
        else:
            try:
                cfg = pipeline_encoders(root, mcfg.caption_dim, mcfg.in_channels)
            except ConfigError as exc:
                raise ConfigError(f"--weights {self.path}: {exc}") from None
            cfg.samples.update(RELEASE_SAMPLES)
        return cfg, mcfg, patch_grid(cfg, mcfg)

    def load(
        self, cfg: DictConfig, mcfg: NextDiTConfig, device: str
    ) -> tuple[NextDiT, FrozenEncoders]:
        """The folder's transformer, built on the meta device and given its tensors (no
        random init first), in fp32 as a checkpoint's is (a bf16 export included), and the
        encoders ``cfg`` names."""
        from model.convert import CheckpointMismatchError, load_released
        from model.release import ReleaseFormatError, read_release_weights

        with torch.device("meta"):
            net = NextDiT(mcfg)
        try:
            load_released(net, read_release_weights(self.path))
        except (CheckpointMismatchError, ReleaseFormatError, OSError) as exc:
            lines = "; ".join(line.strip() for line in str(exc).splitlines())
            raise CheckpointError(f"--weights {self.path}: {lines}") from None
        return with_encoders(net.float(), cfg, device)
