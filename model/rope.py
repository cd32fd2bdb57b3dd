"""3-axis rotary position embedding over (view index, patch row, patch col).

Why real cos/sin instead of the release's complex ``freqs_cis``: complex tensors break
``torch.compile(fullgraph=True)`` and FSDP mixed precision, and the rotation is the same.
The layout matches the release exactly, so released weights see the same rotations:

* head_dim is split in equal thirds, in the order (view, row, col);
* inside each third, channel pairs are *interleaved* ``(2i, 2i+1)`` (the release does
  ``view_as_complex(x.reshape(..., -1, 2))``), not rotate-half;
* axis frequencies are ``theta ** (-2k / axis_dim)``, ``k = 0 .. axis_dim/2 - 1``, with
  ``theta = 1e4`` for every axis.

Resolution extrapolation (:class:`RopeScaling`), per axis, as the release's
``precompute_freqs_cis(scale_factor=...)`` does it:

* ``ntk``: NTK-style base scaling, ``theta -> theta * factor`` (the release multiplies theta
  by the factor directly; it does not use the ``factor ** (d / (d - 2))`` NTK-aware form);
* ``interp``: position interpolation, ``position -> position / factor``.

The release picks ``interp`` for timesteps below a "watershed" and ``ntk`` above it; that
choice belongs to the sampler, which passes the scaling it wants per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RopeScaling:
    """Per-axis (view, row, col) extrapolation factors; 1.0 means unchanged."""

    ntk: tuple[float, float, float] = (1.0, 1.0, 1.0)
    interp: tuple[float, float, float] = (1.0, 1.0, 1.0)


def grid_positions(
    views: int, rows: int, cols: int, device: torch.device | str | None = None
) -> Tensor:
    """Integer (view, row, col) positions of a [views, rows, cols] token grid, [N, 3] float32.

    Row-major over (view, row, col): the same order the patchified sequence uses.
    """
    v, r, c = torch.meshgrid(
        torch.arange(views, device=device),
        torch.arange(rows, device=device),
        torch.arange(cols, device=device),
        indexing="ij",
    )
    return torch.stack([v, r, c], dim=-1).reshape(-1, 3).float()


def axis_frequencies(
    axis_dim: int, theta: float, device: torch.device | str | None = None
) -> Tensor:
    """Rotation frequencies of one axis: ``axis_dim / 2`` values from 1 down to ~1/theta."""
    if axis_dim % 2:
        raise ValueError("each RoPE axis needs an even number of channels")
    k = torch.arange(0, axis_dim, 2, device=device, dtype=torch.float64)
    return (theta ** (-k / axis_dim)).float()


def rope_cos_sin(
    positions: Tensor,
    axes_dim: tuple[int, int, int],
    theta: float = 10_000.0,
    scaling: RopeScaling | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each [N, head_dim / 2] float32.

    ``positions`` is [N, 3] (view, row, col); it may be fractional or offset (the angles only
    ever enter attention through differences, see ``tests/model/test_rope.py``).
    """
    scaling = scaling or RopeScaling()
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = axis_frequencies(dim, theta * scaling.ntk[axis], positions.device)
        pos = positions[:, axis].float() / scaling.interp[axis]
        angles.append(pos[:, None] * freqs[None, :])
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of ``x`` [..., N, head_dim] by the given angles.

    Computed in float32 (as the release does) and cast back to ``x``'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
