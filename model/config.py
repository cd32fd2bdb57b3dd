"""Next-DiT configurations: the released OneDiffusion size and two small ones for tests.

The released transformer (lehduong/OneDiffusion, ``NextDiT``) fixes several widths that
its config file does not name: the adaLN conditioning width is ``min(hidden, 1024)``, the
sinusoidal timestep features are 256 wide, the SwiGLU width is
``256 * ceil((2/3 * 4 * hidden) / 256)``. They are spelled out here so the parameter count
(2.80B) and the checkpoint shapes follow from the config alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class NextDiTConfig:
    """Hyper-parameters of one Next-DiT. Frozen so a config can be a dict key and logged."""

    name: str
    hidden_size: int
    depth: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (view, row, col); only 1 view per patch
    in_channels: int = 16
    caption_dim: int = 2048
    qk_norm: bool = True  # LayerNorm over all heads' q (and k), as the release does
    norm_eps: float = 1e-5  # sandwich RMSNorms and the caption RMSNorm
    rope_theta: float = 10_000.0
    timestep_freq_dim: int = 256
    # The release embeds scheduler timesteps, i.e. sigma * 1000; forward() takes t in [0, 1].
    timestep_scale: float = 1000.0
    max_cond_dim: int = 1024  # adaLN input width is min(hidden_size, max_cond_dim)
    # tanh soft cap on self-attention logits. None = plain softmax (the release's SDPA path);
    # the release's bf16 flash-attention path uses 30.0.
    attn_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.head_dim % 6:
            raise ValueError("head_dim must split into three even RoPE axes (divisible by 6)")
        if self.patch_size[0] != 1:
            raise ValueError("views are never patched together: patch_size[0] must be 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def cond_dim(self) -> int:
        """Width of the per-view conditioning vector (timestep + pooled caption)."""
        return min(self.hidden_size, self.max_cond_dim)

    @property
    def rope_axes_dim(self) -> tuple[int, int, int]:
        """Head-dim channels given to (view, row, col): equal thirds."""
        third = self.head_dim // 3
        return (third, third, third)

    @property
    def patch_dim(self) -> int:
        """Channels of one flattened patch: pH * pW * C."""
        return self.patch_size[1] * self.patch_size[2] * self.in_channels


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """The Llama/Lumina SwiGLU width for model width ``dim`` (10240 for 3840)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_CONFIGS: dict[str, NextDiTConfig] = {
    "onediffusion-2.8b": NextDiTConfig(
        name="onediffusion-2.8b",
        hidden_size=3840,
        depth=16,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=swiglu_hidden(3840),
    ),
    # ~0.26B: fits one GPU with room for big batches; real T5 caption width.
    "small": NextDiTConfig(
        name="small",
        hidden_size=1152,
        depth=12,
        num_heads=12,
        num_kv_heads=4,
        ffn_hidden_size=swiglu_hidden(1152),
    ),
    # CPU tests: a training step on 2 views of 16x16 latents, batch 2, takes milliseconds.
    "tiny": NextDiTConfig(
        name="tiny",
        hidden_size=96,
        depth=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=256,
        caption_dim=64,
    ),
}


def config_names() -> list[str]:
    return sorted(_CONFIGS)


def get_config(name: str, **overrides: object) -> NextDiTConfig:
    """A named config, with fields replaced by ``overrides`` (validated again)."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown Next-DiT config {name!r}; known: {config_names()}")
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(overrides["patch_size"])  # type: ignore[arg-type]
    return dataclasses.replace(_CONFIGS[name], **overrides)  # type: ignore[arg-type]
