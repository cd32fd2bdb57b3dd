"""Rectified-flow training loss and Euler sampler for multi-view latents.

Convention (DESIGN.md, matches the released OneDiffusion weights): t = 1 is pure
noise, t = 0 is data, x_t = (1 - t) x + t eps, and the model predicts the
velocity v = eps - x = dx_t/dt. Every view carries its own t, so one sequence can
mix noisy target views with clean condition views (t = 0).

The denoiser is any callable ``model(latents [B,V,C,H,W], t [B,V], text [B,L,D],
text_mask [B,L]) -> velocity [B,V,C,H,W]``; this module never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

DEFAULT_SHIFT = 3.0


def shift_time(t: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Resolution shift t' = s t / (1 + (s - 1) t).

    High resolutions keep more signal at a given t, so training and sampling
    spend more time near the noise end (s > 1 moves mass towards t = 1). The
    endpoints 0 and 1 are fixed and s = 1 is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    image_seq_len: float,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Sequence-length dependent shift, as the released sampler computes it.

    The release interpolates mu linearly in the number of *denoised* patch
    tokens (condition views excluded) and hands it to diffusers'
    ``FlowMatchEulerDiscreteScheduler`` dynamic shifting, whose exponential
    time shift equals ``shift_time`` with shift = exp(mu). Defaults are that
    scheduler's defaults; whether the release's scheduler config enables
    dynamic shifting (or uses a fixed shift) is not visible offline.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian draw on the generator's own device (a CPU generator stays usable
    for CUDA tensors), then moved to ``device``."""
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)


def sample_timesteps(
    batch: int,
    views: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shift: float = DEFAULT_SHIFT,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Independent per-view training times: sigmoid(N(mean, std)), then shifted.

    Returns float32 [B, V]. Drawing t per view (not per sample) is what lets one
    model learn every conditional: any view can be clean while another is noisy.
    """
    u = _randn((batch, views), generator, device)
    return shift_time(torch.sigmoid(u * logit_std + logit_mean), shift)


def sampling_schedule(
    steps: int, shift: float = DEFAULT_SHIFT, device: torch.device | str | None = None
) -> Tensor:
    """Times 1 = t_0 > ... > t_steps = 0 (float32, steps + 1 values).

    Uniform grid then ``shift_time``; identical to the release's
    ``linspace(1, 1/steps, steps)`` sigmas shifted by diffusers plus the final 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=device)
    return shift_time(grid, shift)


@dataclass
class FlowLoss:
    """Per-sample loss plus what the trainer logs or reduces per task.

    loss:       [B] mean squared error over the elements of the trained views
                (0 for a sample with no trained view; see ``n_views``).
    view_loss:  [B, V] per-view MSE, 0 where the view is not trained.
    t:          [B, V] times fed to the model (0 for condition views).
    loss_mask:  [B, V] bool, views that contributed.
    n_views:    [B] number of contributing views (a weight for batch reduction).
    """

    loss: Tensor
    view_loss: Tensor
    t: Tensor
    loss_mask: Tensor
    n_views: Tensor


def _bcast(x: Tensor, like: Tensor) -> Tensor:
    """[B, V] -> [B, V, 1, 1, 1] for broadcasting against latents."""
    return x.reshape(*x.shape, *([1] * (like.dim() - x.dim())))


def _check_views(name: str, mask: Tensor | None, shape: tuple[int, int], default: bool) -> Tensor:
    if mask is None:
        return torch.full(shape, default, dtype=torch.bool)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    return mask.bool()


def flow_matching_loss(
    model: Denoiser,
    latents: Tensor,
    text: Tensor,
    text_mask: Tensor,
    *,
    view_mask: Tensor | None = None,
    cond_mask: Tensor | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """Rectified-flow loss ||model(x_t, t) - (eps - x)||^2 per sample.

    view_mask [B, V]: views that are trained (False for padding or views the
    task does not supervise). cond_mask [B, V]: views held clean as conditions;
    they enter the model at t = 0 with their exact latents and never count in
    the loss. Masked terms are selected out (``torch.where``, not a product),
    so junk or non-finite outputs on excluded views never reach the loss value
    and finite ones get exactly zero gradient.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, V, C, H, W], got {list(latents.shape)}")
    b, v = latents.shape[:2]
    device = latents.device
    view_mask = _check_views("view_mask", view_mask, (b, v), True).to(device)
    cond_mask = _check_views("cond_mask", cond_mask, (b, v), False).to(device)

    if t is None:
        t = sample_timesteps(
            b,
            v,
            generator=generator,
            device=device,
            shift=shift,
            logit_mean=logit_mean,
            logit_std=logit_std,
        )
    elif tuple(t.shape) != (b, v):
        raise ValueError(f"t must have shape {[b, v]}, got {list(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    t = torch.where(cond_mask, torch.zeros_like(t), t)

    if noise is None:
        noise = _randn(tuple(latents.shape), generator, device, latents.dtype)
    x = latents.float()
    eps = noise.float()
    tb = _bcast(t, x)
    x_t = (1.0 - tb) * x + tb * eps
    # Condition views are the data itself, bit for bit.
    x_t = torch.where(_bcast(cond_mask, x), x, x_t).to(latents.dtype)

    pred = model(x_t, t, text, text_mask)
    if pred.shape != latents.shape:
        raise ValueError(f"model returned {list(pred.shape)}, expected {list(latents.shape)}")
    sq = (pred.float() - (eps - x)) ** 2
    loss_mask = view_mask & ~cond_mask
    sq = torch.where(_bcast(loss_mask, sq), sq, torch.zeros_like(sq))
    view_loss = sq.flatten(2).mean(-1)
    n_views = loss_mask.sum(1)
    loss = view_loss.sum(1) / n_views.clamp(min=1).to(view_loss.dtype)
    return FlowLoss(loss=loss, view_loss=view_loss, t=t, loss_mask=loss_mask, n_views=n_views)


def _pad_tokens(x: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad text features and mask to ``length`` tokens (mask False)."""
    extra = length - x.shape[1]
    if extra == 0:
        return x, mask
    x = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
    return x, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)


@torch.no_grad()
def sample(
    model: Denoiser,
    noise: Tensor,
    text: Tensor,
    text_mask: Tensor,
    *,
    steps: int = 50,
    shift: float = DEFAULT_SHIFT,
    guidance_scale: float = 1.0,
    uncond_text: Tensor | None = None,
    uncond_text_mask: Tensor | None = None,
    cond_latents: Tensor | None = None,
    cond_mask: Tensor | None = None,
    cond_t: float = 0.0,
) -> Tensor:
    """Euler integration of dx/dt = v from t = 1 (noise) to t = 0; returns all views.

    cond_mask [B, V] marks views held clean: their latents are taken from
    ``cond_latents`` (same shape as ``noise``; other views are ignored), fed at
    t = ``cond_t`` and written back after every step, so they come out
    bit-identical. (The release feeds the schedule's last non-zero t instead of
    0; ``cond_t`` reproduces that when running its weights.)

    Classifier-free guidance, v = v_u + s (v_c - v_u), runs cond and uncond in
    one forward of 2B whenever guidance_scale != 1.
    """
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, V, C, H, W], got {list(noise.shape)}")
    b, v = noise.shape[:2]
    device = noise.device
    cfg = guidance_scale != 1.0
    if cfg and (uncond_text is None or uncond_text_mask is None):
        raise ValueError("guidance_scale != 1 needs uncond_text and uncond_text_mask")

    cond_mask = _check_views("cond_mask", cond_mask, (b, v), False).to(device)
    held = bool(cond_mask.any())
    if held:
        if cond_latents is None or cond_latents.shape != noise.shape:
            raise ValueError("cond_mask needs cond_latents shaped like noise")
        keep = _bcast(cond_mask, noise)
        clean = cond_latents.to(device=device, dtype=torch.float32)

    if cfg:
        length = max(text.shape[1], uncond_text.shape[1])
        text, text_mask = _pad_tokens(text, text_mask, length)
        uncond_text, uncond_text_mask = _pad_tokens(uncond_text, uncond_text_mask, length)
        text_in = torch.cat([uncond_text, text])
        mask_in = torch.cat([uncond_text_mask, text_mask])
    else:
        text_in, mask_in = text, text_mask

    times = sampling_schedule(steps, shift, device=device)
    x = noise.float()
    if held:
        x = torch.where(keep, clean, x)
    for i in range(steps):
        t_now, t_next = times[i], times[i + 1]
        t = torch.where(cond_mask, torch.full((b, v), cond_t, device=device), t_now)
        x_in = x.to(noise.dtype)
        if cfg:
            vel_u, vel_c = model(
                torch.cat([x_in, x_in]), torch.cat([t, t]), text_in, mask_in
            ).chunk(2)
            vel = vel_u.float() + guidance_scale * (vel_c.float() - vel_u.float())
        else:
            vel = model(x_in, t, text_in, mask_in).float()
        x = x + (t_next - t_now) * vel
        if held:
            x = torch.where(keep, clean, x)
    out = x.to(noise.dtype)
    if held:
        out = torch.where(keep, cond_latents.to(device=device, dtype=noise.dtype), out)
    return out
