"""The sampler loop: prompts and clean condition views in, generated views out.

One :class:`SamplerSettings` (steps, guidance, shift, seed) says how to sample; the fit's
sample grids (``OneGenModule.generate``), ``onegen sample`` and the multiview sampler all
build it with :meth:`SamplerSettings.from_config` from the run's ``samples`` section, so a
checkpoint samples the same way in the fit's grids and from the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from model.flow import sample
from training.data.views import interleave_rays
from training.encoders import FrozenEncoders


@dataclass(frozen=True)
class SamplerSettings:
    """How the Euler flow sampler runs: ``steps`` forward passes (each pass two with
    classifier-free ``guidance`` != 1), the timestep ``shift``, and the noise ``seed``
    (drawn on the CPU, so the same sample on any device)."""

    steps: int
    guidance: float
    shift: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be at least 1, got {self.steps}")

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
    ) -> SamplerSettings:
        """A request's ``steps`` / ``guidance`` where given, else the config's ``samples``
        section; the shift is ``samples.shift``, or the training loss's when unset."""
        scfg = cfg.samples
        return cls(
            steps=int(steps or scfg.steps),
            guidance=float(guidance if guidance is not None else scfg.guidance),
            shift=float(scfg.shift if scfg.shift is not None else cfg.loss.shift),
            seed=int(seed),
        )


@dataclass(frozen=True)
class MultiviewSample:
    pixels: Tensor  # [B, V, 3, H, W] in [-1, 1]: the image views, decoded
    rays: Tensor  # [B, V, C, h, w]: the ray views as sampled (latent form)


@torch.no_grad()
def generate(
    denoiser: Any,
    frozen: FrozenEncoders,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    views: int,
    size: tuple[int, int],
    cond_pixels: Tensor | None,
    cond_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Encode prompts and condition views, sample the targets, decode every view:
    pixels [B, V, 3, H, W] in [-1, 1]."""
    if cond_pixels is not None:
        views, size = cond_pixels.shape[1], tuple(cond_pixels.shape[-2:])
    cond_latents = None
    if cond_pixels is not None and cond_mask is not None and bool(cond_mask.any()):
        cond_latents = frozen.vae.encode(cond_pixels.to(device))
    latents = denoise(
        denoiser,
        frozen,
        prompts,
        settings,
        views=views,
        size=size,
        cond_latents=cond_latents,
        cond_mask=cond_mask,
        device=device,
    )
    return frozen.vae.decode(latents).clamp(-1, 1)


@torch.no_grad()
def generate_views(
    denoiser: Any,
    frozen: FrozenEncoders,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    cond_pixels: Tensor,
    cond_rays: Tensor,
    cond_mask: Tensor,
    device: torch.device,
) -> MultiviewSample:
    """Sample the interleaved 2V views of a multiview batch: ``cond_pixels`` [B, V, 3, H, W]
    and ``cond_rays`` [B, V, C, h, w] give the clean views (others are ignored), ``cond_mask``
    [B, 2V] says which of img0, ray0, img1, ... are held clean."""
    b, v = cond_pixels.shape[:2]
    if tuple(cond_mask.shape) != (b, 2 * v):
        raise ValueError(f"cond_mask {list(cond_mask.shape)}: expected [{b}, {2 * v}]")
    latents = frozen.vae.encode(cond_pixels.to(device))
    out = denoise(
        denoiser,
        frozen,
        prompts,
        settings,
        views=2 * v,
        size=tuple(cond_pixels.shape[-2:]),
        cond_latents=interleave_rays(latents, cond_rays),
        cond_mask=cond_mask,
        device=device,
    )
    return MultiviewSample(frozen.vae.decode(out[:, 0::2]).clamp(-1, 1), out[:, 1::2])


def generate_any(
    denoiser: Any,
    frozen: FrozenEncoders,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    device: torch.device,
    views: int = 1,
    size: tuple[int, int] = (64, 64),
    cond_pixels: Tensor | None = None,
    cond_mask: Tensor | None = None,
    cond_rays: Tensor | None = None,
) -> Tensor | MultiviewSample:
    """:func:`generate_views` for a multiview request (``cond_rays`` given), else
    :func:`generate`: one entry for the fit's grids and evaluation and ``onegen eval``."""
    if cond_rays is not None:
        if cond_pixels is None or cond_mask is None:
            raise ValueError("cond_rays needs cond_pixels and cond_mask")
        return generate_views(
            denoiser, frozen, prompts, settings,
            cond_pixels=cond_pixels, cond_rays=cond_rays, cond_mask=cond_mask, device=device,
        )  # fmt: skip
    return generate(
        denoiser, frozen, prompts, settings, views=views, size=size,
        cond_pixels=cond_pixels, cond_mask=cond_mask, device=device,
    )  # fmt: skip


@torch.no_grad()
def denoise(
    denoiser: Any,
    frozen: FrozenEncoders,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    views: int,
    size: tuple[int, int],
    cond_latents: Tensor | None,
    cond_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """The sampler on latents [B, views, C, h, w] of (H, W) ``size`` pixels, the
    ``cond_mask`` views [B, views] held at ``cond_latents``; shared by image-only and
    multiview (image + ray) sampling."""
    b = len(prompts)
    down = frozen.vae.downsample
    h, w = size[0] // down, size[1] // down
    text, text_mask = frozen.text(list(prompts))
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    noise = torch.randn(b, views, frozen.vae.latent_channels, h, w, generator=gen).to(device)
    kwargs: dict[str, Any] = {}
    if cond_latents is not None and cond_mask is not None and bool(cond_mask.any()):
        kwargs["cond_latents"] = cond_latents.to(device)
        kwargs["cond_mask"] = cond_mask.to(device).bool()
    if settings.guidance != 1.0:
        kwargs["uncond_text"], kwargs["uncond_text_mask"] = frozen.text([""] * b)
    return sample(
        denoiser,
        noise,
        text,
        text_mask,
        steps=settings.steps,
        shift=settings.shift,
        guidance_scale=settings.guidance,
        **kwargs,
    )
