"""AdamW with decoupled no-decay 1-D parameters, warmup + constant / cosine schedule,
global-norm clipping that works on FSDP2's DTensor gradients, and the EMA update."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn


def lr_lambda(warmup: int, schedule: str, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from 0 then constant or cosine (to ``min_ratio``) over ``total`` steps."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            span = max(1, total - warmup)
            progress = min(1.0, (step - warmup) / span)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")

    return fn


def build_optimizer(model: nn.Module, ocfg: DictConfig, total_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: AdamW (1-D parameters without weight
    decay when ``no_decay_1d``) and a per-step LambdaLR."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 and ocfg.no_decay_1d else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(ocfg.weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        groups,
        lr=float(ocfg.lr),
        betas=tuple(float(b) for b in ocfg.betas),
        eps=float(ocfg.eps),
        foreach=bool(ocfg.foreach),
    )
    schedule = lr_lambda(
        int(ocfg.warmup_steps), str(ocfg.schedule), int(total_steps), float(ocfg.min_lr_ratio)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> Tensor | None:
    """Clip by global norm (``max_norm`` > 0) and return the norm before clipping, as a plain
    tensor: under FSDP2 the norm is a DTensor and ``full_tensor()`` gives the global value."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return None
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach()


def ema_decay(decay: float, warmup_steps: int, step: int) -> float:
    """The decay at optimizer step ``step`` (counting this one): ``(1 + s) / (warmup + s)``
    caps it early on, so the average does not hold on to the random init."""
    if warmup_steps > 0:
        return min(decay, (1 + step) / (warmup_steps + step))
    return decay


@torch.no_grad()
def ema_update(ema: Sequence[Tensor], live: Sequence[Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * live`` in place, shard by shard."""
    torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
