"""3-axis RoPE: relative-position property, axis split, release layout, extrapolation."""

from __future__ import annotations

import torch

from model.rope import RopeScaling, apply_rope, grid_positions, rope_cos_sin

AXES = (8, 8, 8)  # head_dim 24, as in the tiny config
HEAD_DIM = sum(AXES)


def _scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, **kw) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions, AXES, **kw)
    return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T


def _random_positions(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack(
        [torch.randint(0, m, (n,), generator=gen) for m in (4, 32, 32)], dim=-1
    ).float()


def test_scores_depend_only_on_relative_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(50, HEAD_DIM, generator=gen)
    k = torch.randn(50, HEAD_DIM, generator=gen)
    pos = _random_positions(50, gen)
    base = _scores(q, k, pos)
    for shift in ([3.0, 0.0, 0.0], [0.0, -5.0, 0.0], [0.0, 0.0, 11.0], [2.0, 7.0, -9.0]):
        shifted = _scores(q, k, pos + torch.tensor(shift))
        torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    # Sensitivity check: changing relative offsets (stretching one axis) does change scores.
    stretched = pos * torch.tensor([1.0, 2.0, 1.0])
    assert (_scores(q, k, stretched) - base).abs().max() > 1e-2


def test_each_axis_owns_one_third_of_head_dim() -> None:
    x = torch.randn(1, HEAD_DIM)
    origin = torch.zeros(1, 3)
    for axis in range(3):
        moved = origin.clone()
        moved[0, axis] = 5.0
        a = apply_rope(x, *rope_cos_sin(origin, AXES))
        b = apply_rope(x, *rope_cos_sin(moved, AXES))
        changed = (a - b).abs()[0] > 1e-6
        expected = torch.zeros(HEAD_DIM, dtype=torch.bool)
        expected[axis * 8 : (axis + 1) * 8] = True
        assert torch.equal(changed, expected), axis


def test_matches_release_complex_layout() -> None:
    """Reference written the release's way: complex freqs over interleaved channel pairs,
    frequencies ``1 / theta ** (arange(0, D, 6)[: D // 6] / D)`` for head_dim D, thirds
    concatenated in (view, row, col) order."""
    dim, theta = 120, 10_000.0
    gen = torch.Generator().manual_seed(1)
    pos = _random_positions(40, gen)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 6)[: dim // 6].double() / dim))
    angles = torch.cat([pos[:, a : a + 1].double() * freqs for a in range(3)], dim=-1)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    x = torch.randn(3, 40, dim, generator=gen, dtype=torch.float64)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(3, 40, -1, 2)) * freqs_cis).flatten(-2)
    cos, sin = rope_cos_sin(pos, (40, 40, 40), theta)
    out = apply_rope(x.float(), cos, sin)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_scaling_interp_and_ntk() -> None:
    pos = _random_positions(20, torch.Generator().manual_seed(2))
    plain = rope_cos_sin(pos, AXES)
    same = rope_cos_sin(pos, AXES, scaling=RopeScaling())
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    # Position interpolation by 2 on rows: row 2p is rotated like row p was.
    interp = RopeScaling(interp=(1.0, 2.0, 1.0))
    doubled = pos * torch.tensor([1.0, 2.0, 1.0])
    for a, b in zip(rope_cos_sin(doubled, AXES, scaling=interp), plain, strict=True):
        torch.testing.assert_close(a, b)
    # NTK scaling multiplies the base theta of the scaled axes only.
    ntk = rope_cos_sin(pos, AXES, scaling=RopeScaling(ntk=(1.0, 4.0, 4.0)))
    ref_hi = rope_cos_sin(pos, AXES, theta=40_000.0)
    torch.testing.assert_close(ntk[0][:, 4:], ref_hi[0][:, 4:])
    torch.testing.assert_close(ntk[0][:, :4], plain[0][:, :4])
    assert not torch.allclose(ntk[0], plain[0])


def test_grid_positions_order() -> None:
    pos = grid_positions(2, 3, 4)
    assert pos.shape == (24, 3)
    v, r, c = 1, 2, 3
    assert pos[v * 12 + r * 4 + c].tolist() == [1.0, 2.0, 3.0]
