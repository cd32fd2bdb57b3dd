"""Flow-matching loss, timestep sampler and Euler sampler against a Gaussian toy.

Toy problem: every latent element of view k is data x ~ N(mu_k, s_k^2) and
eps ~ N(0, 1), independent. With x_t = (1 - t) x + t eps (x, eps, x_t jointly
Gaussian) the exact velocity field is the conditional expectation

    E[eps - x | x_t] = -mu + c(t) / v(t) * (x_t - (1 - t) mu),
    v(t) = (1 - t)^2 s^2 + t^2      (Var x_t),
    c(t) = t - (1 - t) s^2          (Cov(eps - x, x_t)),

and the irreducible loss is Var(eps - x | x_t) = 1 + s^2 - c(t)^2 / v(t).
The ODE dx/dt = E[v | x_t] maps x_1 = eps to x_0 = mu + s eps exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.flow import (
    flow_matching_loss,
    resolution_shift,
    sample,
    sample_timesteps,
    sampling_schedule,
    shift_time,
)

MU = torch.tensor([1.5, -1.0])  # per view
SD = torch.tensor([0.5, 2.0])


def _per_view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[V] or [B, V] -> broadcastable against [B, V, C, H, W]."""
    return x.reshape(*x.shape, *([1] * (like.dim() - x.dim())))


def oracle(x_t, t, text, text_mask):
    """Exact E[eps - x | x_t] for the per-view Gaussian toy."""
    mu, s2 = _per_view(MU, x_t[0]), _per_view(SD, x_t[0]) ** 2
    tb = _per_view(t, x_t)
    var = (1 - tb) ** 2 * s2 + tb**2
    cov = tb - (1 - tb) * s2
    return -mu + cov / var * (x_t - (1 - tb) * mu)


def toy_batch(b=16, v=2, c=4, h=8, w=8, seed=0):
    """Toy data; views beyond two cycle through the two (mu, s) pairs."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(v) % 2
    like = torch.empty(v, c, h, w)
    x = torch.randn(b, v, c, h, w, generator=g) * _per_view(SD[k], like) + _per_view(MU[k], like)
    text = torch.randn(b, 5, 8, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    return x, text, mask


def euler_affine_map(mu: float, s: float, steps: int, shift: float) -> tuple[float, float]:
    """The Euler sampler on the toy is affine per element, x_0 = a eps + b.

    Computed here in float64 from the recurrence (independently of model.flow),
    it gives the exact distribution of the sampler's output, N(b, a^2), and so
    the discretisation bias for any step count.
    """
    grid = np.linspace(1.0, 0.0, steps + 1)
    times = shift * grid / (1 + (shift - 1) * grid)
    a, b = 1.0, 0.0
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        var = (1 - t) ** 2 * s * s + t * t
        k = (t - (1 - t) * s * s) / var
        dt = t_next - t
        a, b = a + dt * k * a, b + dt * (-mu + k * (b - (1 - t) * mu))
    return a, b


# --- time shift and schedules -------------------------------------------------


def test_shift_time_properties():
    t = torch.linspace(0, 1, 101)
    assert torch.equal(shift_time(t, 1.0), t)
    for s in (0.5, 3.0, 6.0):
        ts = shift_time(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert torch.all(ts[1:] > ts[:-1])
    assert torch.all(shift_time(t[1:-1], 3.0) > t[1:-1])  # towards noise
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_schedule_matches_diffusers_flow_match_scheduler():
    """The release samples with diffusers' FlowMatchEulerDiscreteScheduler on
    sigmas linspace(1, 1/N, N); our grid must be the same, for a fixed shift
    and for the dynamic (exp(mu)) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 12
    fixed = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fixed.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    torch.testing.assert_close(sampling_schedule(n, 3.0), fixed.sigmas.float())

    mu = math.log(resolution_shift(1024))
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dyn.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    torch.testing.assert_close(sampling_schedule(n, math.exp(mu)), dyn.sigmas.float())


def test_resolution_shift_endpoints():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert resolution_shift(2048) > resolution_shift(1024)


# --- timestep sampler -----------------------------------------------------------


def test_timestep_sampler_statistics():
    n = 200_000
    g = torch.Generator().manual_seed(1)
    t1 = sample_timesteps(n, 1, generator=g, shift=1.0)
    assert t1.shape == (n, 1) and t1.dtype == torch.float32
    assert t1.min() > 0 and t1.max() < 1
    # logit-normal(0, 1): median 0.5, logit(t) ~ N(0, 1). SE of the median
    # ~ 1.25 sd / sqrt(n) ~ 6e-4 in t units, of the logit mean/std ~ 2e-3.
    assert t1.median().item() == pytest.approx(0.5, abs=3e-3)
    logit = torch.logit(t1.double())
    assert logit.mean().item() == pytest.approx(0.0, abs=0.01)
    assert logit.std().item() == pytest.approx(1.0, abs=0.01)

    g = torch.Generator().manual_seed(1)
    t3 = sample_timesteps(n, 1, generator=g, shift=3.0)
    torch.testing.assert_close(t3, shift_time(t1, 3.0))  # same draws, shifted
    assert t3.median().item() == pytest.approx(0.75, abs=3e-3)  # shift is monotone
    assert t3.mean() > t1.mean() + 0.1
    # P(t' > 1/2) = P(t > 1/4) = Phi(log 3) ~ 0.864 for shift 3
    frac = (t3 > 0.5).double().mean().item()
    assert frac == pytest.approx(0.5 * (1 + math.erf(math.log(3) / math.sqrt(2))), abs=5e-3)

    lm = sample_timesteps(
        n, 1, generator=torch.Generator().manual_seed(2), shift=1.0, logit_mean=1.0, logit_std=0.5
    )
    assert torch.logit(lm.double()).mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.logit(lm.double()).std().item() == pytest.approx(0.5, abs=0.01)


def test_timesteps_independent_per_view_and_seeded():
    a = sample_timesteps(4, 3, generator=torch.Generator().manual_seed(7))
    b = sample_timesteps(4, 3, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 3)
    assert torch.equal(a, b)
    assert a.unique().numel() == a.numel()  # every view, every sample its own t
    big = sample_timesteps(50_000, 2, generator=torch.Generator().manual_seed(8))
    corr = torch.corrcoef(big.T)[0, 1].item()
    assert abs(corr) < 0.02  # SE of a correlation ~ 1/sqrt(n) ~ 4.5e-3


# --- loss -------------------------------------------------------------------------


class Recorder:
    """Wraps a velocity function and keeps the inputs of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, text, mask):
        self.calls.append((x_t.clone(), t.clone(), text.clone(), mask.clone()))
        return self.fn(x_t, t, text, mask)


def test_loss_inputs_per_view_t_and_clean_conditions():
    x, text, mask = toy_batch(b=6, v=3)
    cond = torch.zeros(6, 3, dtype=torch.bool)
    cond[:, 2] = True
    cond[0, 0] = True
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rec = Recorder(lambda x_t, t, te, m: torch.zeros_like(x_t))
    out = flow_matching_loss(
        rec, x, text, mask, cond_mask=cond, noise=noise, generator=torch.Generator().manual_seed(4)
    )
    ((x_t, t, text_in, mask_in),) = rec.calls
    assert t.shape == (6, 3) and torch.equal(t, out.t)
    assert torch.all(t[cond] == 0)
    free = t[~cond]
    assert free.unique().numel() == free.numel() and torch.all(free > 0)
    # each view noised with its own t; condition views are the data bit for bit
    tb = t[..., None, None, None]
    torch.testing.assert_close(x_t, (1 - tb) * x + tb * noise)
    assert torch.equal(x_t[cond], x[cond])
    assert torch.equal(text_in, text) and torch.equal(mask_in, mask)
    assert torch.equal(out.loss_mask, ~cond)
    assert torch.equal(out.n_views, (~cond).sum(1))


def test_loss_reduction_and_masks_exact():
    """A model off the target by a known constant per view gives an exact loss."""
    x, text, mask = toy_batch(b=3, v=3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    offset = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    view_mask = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    cond_mask = torch.tensor([[False, False, True], [False, False, False], [False, True, False]])

    def off_by(x_t, t, te, m):
        return (noise - x) + offset[..., None, None, None]

    out = flow_matching_loss(
        off_by, x, text, mask, view_mask=view_mask, cond_mask=cond_mask, noise=noise
    )
    expected = torch.tensor([(0.1**2 + 0.2**2) / 2, (1.0 + 9.0) / 2, 0.0])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(
        out.view_loss, torch.where(view_mask & ~cond_mask, offset**2, torch.zeros(()))
    )
    assert out.n_views.tolist() == [2, 2, 0]


def test_masked_views_do_not_change_loss_or_gradient():
    x, text, mask = toy_batch(b=4, v=3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    t = torch.rand(4, 3, generator=torch.Generator().manual_seed(7))
    view_mask = torch.tensor([[True, False, True]] * 4)
    cond_mask = torch.tensor([[False, False, True]] * 4)
    w = torch.nn.Parameter(torch.tensor(0.3))

    def model(junk):
        def fn(x_t, t_, te, m):
            out = w * x_t
            out = out.clone()
            out[:, 1:] = w * junk  # views 1 (untrained) and 2 (condition)
            return out

        return fn

    base = flow_matching_loss(
        model(0.0), x, text, mask, view_mask=view_mask, cond_mask=cond_mask, t=t, noise=noise
    )
    base.loss.sum().backward()
    g0 = w.grad.clone()
    w.grad = None
    for junk in (123.0, -1e6, float("nan"), float("inf")):
        other = flow_matching_loss(
            model(junk), x, text, mask, view_mask=view_mask, cond_mask=cond_mask, t=t, noise=noise
        )
        assert torch.equal(other.loss, base.loss)
        if math.isfinite(junk):
            # (a NaN made inside the model poisons its own backward, 0 * nan,
            # whatever the loss does; only the loss value can be protected)
            other.loss.sum().backward()
            assert torch.equal(w.grad, g0)
            w.grad = None
    # and a trained view does change it
    changed = flow_matching_loss(model(0.0), x, text, mask, cond_mask=cond_mask, t=t, noise=noise)
    assert not torch.equal(changed.loss, base.loss)


def test_oracle_loss_is_the_irreducible_variance():
    """E[v | x_t] attains the minimum 1 + s^2 - c^2/v, and beats perturbed models."""
    b, v = 256, 2
    x, text, mask = toy_batch(b=b, v=v, c=4, h=8, w=8, seed=1)
    t = torch.tensor([0.3, 0.8]).expand(b, v)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out = flow_matching_loss(oracle, x, text, mask, t=t, noise=noise)
    n = b * x[0, 0].numel()
    for k in range(v):
        s2, tk = SD[k].item() ** 2, t[0, k].item()
        var = (1 - tk) ** 2 * s2 + tk**2
        floor = 1 + s2 - (tk - (1 - tk) * s2) ** 2 / var
        # residual ~ N(0, floor): mean square has SE floor * sqrt(2 / n)
        se = floor * math.sqrt(2 / n)
        assert out.view_loss[:, k].mean().item() == pytest.approx(floor, abs=5 * se)

    ts = sample_timesteps(b, v, generator=torch.Generator().manual_seed(10))
    best = flow_matching_loss(oracle, x, text, mask, t=ts, noise=noise).loss.mean()
    for bad in (
        lambda *a: oracle(*a) + 0.1,
        lambda *a: oracle(*a) * 1.1,
        lambda x_t, t, te, m: oracle(x_t, (t + 0.05).clamp(max=1.0), te, m),
    ):
        assert flow_matching_loss(bad, x, text, mask, t=ts, noise=noise).loss.mean() > best


def test_loss_validates_shapes():
    x, text, mask = toy_batch(b=2, v=2)
    with pytest.raises(ValueError, match="view_mask"):
        flow_matching_loss(oracle, x, text, mask, view_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="model returned"):
        flow_matching_loss(lambda *a: a[0][:, :1], x, text, mask)


# --- sampler ------------------------------------------------------------------------


def test_sampler_matches_exact_transport_and_converges():
    """x_1 = eps must land on mu + s eps; Euler's error is first order in 1/steps."""
    noise = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    exact = _per_view(MU, noise[0]) + _per_view(SD, noise[0]) * noise
    errs = []
    for steps in (25, 100):
        out = sample(oracle, noise, text, mask, steps=steps, shift=3.0)
        # the sampler equals the float64 Euler recurrence to float32 precision
        for k in range(2):
            a, b = euler_affine_map(MU[k].item(), SD[k].item(), steps, 3.0)
            torch.testing.assert_close(out[:, k], a * noise[:, k] + b, atol=1e-4, rtol=1e-4)
        errs.append((out - exact).abs().max().item())
    assert errs[1] < errs[0] / 3  # ~4x for a first-order method


def test_sampler_moments_match_target():
    b, steps = 32, 50
    noise = torch.randn(b, 2, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    text, mask = torch.zeros(b, 1, 8), torch.ones(b, 1, dtype=torch.bool)
    out = sample(oracle, noise, text, mask, steps=steps).double()
    n = out[:, 0].numel()
    for k in range(2):
        mu, s = MU[k].item(), SD[k].item()
        a, c = euler_affine_map(mu, s, steps, 3.0)
        # discretisation bias at 50 steps: a few percent of s, less on the mean
        assert abs(a - s) < 0.06 * s and abs(c - mu) < 0.01
        # sampling error: SE(mean) = a / sqrt(n), SE(std) ~ a / sqrt(2 n)
        se_mean, se_std = abs(a) / math.sqrt(n), abs(a) / math.sqrt(2 * n)
        assert abs(out[:, k].mean().item() - mu) < abs(c - mu) + 5 * se_mean
        assert abs(out[:, k].std().item() - s) < abs(abs(a) - s) + 5 * se_std


def test_condition_views_stay_bit_identical():
    b, v = 3, 3
    noise = torch.randn(b, v, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    clean = torch.randn(b, v, 4, 8, 8, generator=torch.Generator().manual_seed(14)) * 3 + 0.1234567
    cond = torch.tensor([[False, True, False], [True, True, False], [False, False, False]])
    rec = Recorder(lambda x_t, t, te, m: 0.7 * x_t + t[..., None, None, None])
    text, mask = torch.zeros(b, 2, 8), torch.ones(b, 2, dtype=torch.bool)
    out = sample(rec, noise, text, mask, steps=6, cond_latents=clean, cond_mask=cond)
    assert out.shape == noise.shape
    assert torch.equal(out[cond], clean[cond])
    assert not torch.equal(out[~cond], clean[~cond])
    for x_t, t, *_ in rec.calls:
        assert torch.equal(x_t[cond], clean[cond])  # fed clean at every step
        assert torch.all(t[cond] == 0)
        assert torch.all(t[~cond] == t[~cond][0])  # one shared time for targets
    # the targets saw t = 1 first and decreasing times after
    firsts = [t[~cond][0].item() for _, t, *_ in rec.calls]
    assert firsts[0] == 1.0 and all(p > q for p, q in zip(firsts, firsts[1:], strict=False))


def test_conditioned_toy_sampling_uses_the_clean_view():
    """With the exact velocity, condition views are untouched and targets still
    reach their own distribution (views are independent in this toy)."""
    noise = torch.randn(8, 2, 4, 8, 8, generator=torch.Generator().manual_seed(15))
    clean = torch.full_like(noise, 5.0)
    cond = torch.tensor([[False, True]] * 8)
    text, mask = torch.zeros(8, 1, 8), torch.ones(8, 1, dtype=torch.bool)
    free = sample(oracle, noise, text, mask, steps=20)
    held = sample(oracle, noise, text, mask, steps=20, cond_latents=clean, cond_mask=cond)
    assert torch.equal(held[:, 1], clean[:, 1])
    assert torch.equal(held[:, 0], free[:, 0])


def text_model(x_t, t, text, mask):
    """A toy whose velocity depends on the (masked) text, to test guidance."""
    m = mask.to(text.dtype)[..., None]
    pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]
    return 0.5 * x_t + pooled[:, :1, None, None, None] * (1 + t[..., None, None, None])


def test_cfg_scale_one_is_the_conditional_model():
    noise = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(16))
    text = torch.randn(2, 3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    rec = Recorder(text_model)
    plain = sample(text_model, noise, text, mask, steps=5)
    same = sample(
        rec,
        noise,
        text,
        mask,
        steps=5,
        guidance_scale=1.0,
        uncond_text=torch.zeros(2, 3, 8),
        uncond_text_mask=mask,
    )
    assert torch.equal(plain, same)
    assert all(c[0].shape[0] == 2 for c in rec.calls)  # no doubled batch


def test_cfg_formula_and_single_batched_forward():
    b, scale = 2, 4.0
    noise = torch.randn(b, 2, 4, 4, 4, generator=torch.Generator().manual_seed(17))
    text = torch.randn(b, 3, 8, generator=torch.Generator().manual_seed(18))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    un_text = torch.zeros(b, 2, 8)  # shorter: the sampler pads it
    un_mask = torch.tensor([[True, False], [True, False]])
    rec = Recorder(text_model)
    out = sample(
        rec,
        noise,
        text,
        mask,
        steps=1,
        shift=1.0,
        guidance_scale=scale,
        uncond_text=un_text,
        uncond_text_mask=un_mask,
    )
    assert len(rec.calls) == 1
    x_in, t_in, text_in, mask_in = rec.calls[0]
    assert x_in.shape[0] == 2 * b and text_in.shape == (2 * b, 3, 8)
    assert torch.equal(mask_in[:b, 2], torch.zeros(b, dtype=torch.bool))
    t1 = torch.ones(b, 2)
    v_c = text_model(noise, t1, text, mask)
    v_u = text_model(noise, t1, un_text, un_mask)
    expected = noise - (v_u + scale * (v_c - v_u))  # one Euler step from 1 to 0
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="uncond"):
        sample(text_model, noise, text, mask, guidance_scale=2.0)


def test_cfg_on_gaussian_toy_extrapolates_the_mean():
    """Guidance on the toy: cond/uncond fields for means mu_c/mu_u; the CFG
    field's mean part is mu_u + s (mu_c - mu_u) at every t, so the one-step
    (steps=1, t: 1 -> 0) sample moves by exactly that."""
    noise = torch.zeros(1, 1, 1, 1, 1)

    def gauss(x_t, t, text, mask):
        mu = text[:, 0, 0].reshape(-1, 1, 1, 1, 1)
        tb = t[..., None, None, None]
        return -mu + (x_t - (1 - tb) * mu) / tb  # s = 0: c/v = t / t^2

    cond, uncond = torch.full((1, 1, 1), 2.0), torch.full((1, 1, 1), 1.0)
    m = torch.ones(1, 1, dtype=torch.bool)
    out = sample(
        gauss, noise, cond, m, steps=1, guidance_scale=3.0, uncond_text=uncond, uncond_text_mask=m
    )
    assert out.item() == pytest.approx(1.0 + 3.0 * (2.0 - 1.0))
