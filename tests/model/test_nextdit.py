"""Next-DiT: identity at init, meta init, per-view conditioning, shapes, overfit, compile."""

from __future__ import annotations

import shutil

import pytest
import torch

from model import NextDiT, count_parameters, flops_per_token, get_config
from model.rope import apply_rope
from tests.helpers.threads import one_thread  # noqa: F401  (autouse fixture)


def make_inputs(cfg, b=2, v=2, h=16, w=16, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, length // 2 :] = False  # one padded caption
    return {
        "latents": torch.randn(b, v, cfg.in_channels, h, w, generator=gen),
        "t": torch.rand(b, v, generator=gen),
        "text": torch.randn(b, length, cfg.caption_dim, generator=gen),
        "text_mask": mask,
    }


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Perturb every parameter so no block is the identity and every gate is open."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)


def block_inputs(model: NextDiT, b=2, v=2, h=8, w=8, seed=0):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v * h * w, cfg.hidden_size, generator=gen)
    cond = torch.randn(b, v, cfg.cond_dim, generator=gen)
    text = torch.randn(b, 5, cfg.caption_dim, generator=gen)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:b]
    cos, sin = model.rope(v, h, w, x.device)
    return x, cond, text, mask, cos, sin


def assert_identity_at_init(model: NextDiT) -> None:
    x, *rest = block_inputs(model)
    for block in model.layers:
        assert torch.equal(block(x, *rest), x)
    out = model(**make_inputs(model.config))
    assert torch.equal(out, torch.zeros_like(out))


def test_blocks_identity_and_zero_output_at_init() -> None:
    """Zero adaLN -> tanh(0) gates close both branches; zero final linear -> output 0."""
    torch.manual_seed(0)
    assert_identity_at_init(NextDiT(get_config("tiny")))


def test_identity_again_after_meta_materialisation() -> None:
    with torch.device("meta"):
        model = NextDiT(get_config("tiny"))
    model.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty may leave behind: garbage, here NaN
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_identity_at_init(model)
    # Same init as eager construction: zero gates, unit norms, unit-scale Xavier linears.
    block = model.layers[0]
    assert torch.equal(block.attn.text_gate, torch.zeros_like(block.attn.text_gate))
    assert torch.equal(block.text_norm.weight, torch.ones_like(block.text_norm.weight))
    assert block.ffn.w_up.weight.std() > 0.01


def test_attention_head_mapping_matches_release() -> None:
    """Self-attention groups kv heads (head i -> i // rep); text kv heads are tiled
    (head i -> i % n_kv), with the RoPE-rotated queries and a per-head tanh gate."""
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.3)
    attn = model.layers[0].attn
    x, _, text, mask, cos, sin = block_inputs(model)
    b, n, _ = x.shape
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.norm_q(attn.to_q(x)).view(b, n, nh, hd)
    k = attn.norm_k(attn.to_k(x)).view(b, n, nkv, hd)
    v = attn.to_v(x).view(b, n, nkv, hd)
    kt = attn.norm_k_text(attn.to_k_text(text)).view(b, 5, nkv, hd)
    vt = attn.to_v_text(text).view(b, 5, nkv, hd)
    heads = []
    for i in range(nh):
        qi = apply_rope(q[:, :, i], cos, sin)
        ki = apply_rope(k[:, :, i // (nh // nkv)], cos, sin)
        a = torch.softmax(qi @ ki.transpose(1, 2) / hd**0.5, -1) @ v[:, :, i // (nh // nkv)]
        logits = qi @ kt[:, :, i % nkv].transpose(1, 2) / hd**0.5
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        a_t = torch.softmax(logits, -1) @ vt[:, :, i % nkv]
        heads.append(a + torch.tanh(attn.text_gate[i]) * a_t)
    ref = attn.to_out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, text, mask, cos, sin), ref, atol=1e-5, rtol=1e-4)


def test_block_matches_reference_composition() -> None:
    """Sandwich norms, scale-only adaLN with chunks (scale_attn, gate_attn, scale_ffn,
    gate_ffn) as the release orders them, tanh gates, per-view modulation."""
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.3)
    blk = model.layers[0]
    x, cond, text, mask, cos, sin = block_inputs(model)
    per_token = torch.nn.functional.silu(cond).repeat_interleave(x.shape[1] // cond.shape[1], 1)
    s1, g1, s2, g2 = blk.modulation(per_token).chunk(4, -1)
    attn = blk.attn(blk.attn_norm_in(x) * (1 + s1), blk.text_norm(text), mask, cos, sin)
    h = x + torch.tanh(g1) * blk.attn_norm_out(attn)
    ref = h + torch.tanh(g2) * blk.ffn_norm_out(blk.ffn(blk.ffn_norm_in(h) * (1 + s2)))
    torch.testing.assert_close(blk(x, cond, text, mask, cos, sin), ref, atol=1e-5, rtol=1e-4)


def test_conditioning_matches_release_embedding() -> None:
    """t in [0, 1] is embedded as the release's scheduler timestep 1000 t, [cos, sin]."""
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model)
    inputs = make_inputs(model.config)
    t, text, mask = inputs["t"], inputs["text"], inputs["text_mask"]
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(128) / 128)
    args = 1000 * t[..., None] * freqs
    te = model.time_embed
    t_emb = te.fc2(torch.nn.functional.silu(te.fc1(torch.cat([args.cos(), args.sin()], -1))))
    m = mask[..., None].float()
    pooled = (text * m).sum(1) / m.sum(1)
    y_emb = model.caption_embed.proj(model.caption_embed.norm(pooled))
    ref = t_emb + y_emb[:, None]
    torch.testing.assert_close(model.condition(t, text, mask), ref, atol=1e-5, rtol=1e-4)


def test_timestep_of_view_reaches_only_its_tokens() -> None:
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.2)
    inputs = make_inputs(model.config, v=3)
    t_other = inputs["t"].clone()
    t_other[:, 1] += 0.3

    # 1. The adaLN input each block sees: view 1's vector moves, views 0 and 2 do not.
    seen = []
    hook = model.layers[-1].modulation.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(**inputs)
        model(**{**inputs, "t": t_other})
    hook.remove()
    assert seen[0].shape[:2] == (2, 3)
    assert torch.equal(seen[0][:, [0, 2]], seen[1][:, [0, 2]])
    assert not torch.allclose(seen[0][:, 1], seen[1][:, 1])

    # 2. End to end, token level: with self-attention cut (it mixes views), every remaining
    # path is per token, so view 0's output must ignore t[1] yet follow t[0].
    with torch.no_grad():
        for block in model.layers:
            block.attn.to_out.weight.zero_()
        base = model(**inputs)
        moved_1 = model(**{**inputs, "t": t_other})
        t_zero = inputs["t"].clone()
        t_zero[:, 0] += 0.3
        moved_0 = model(**{**inputs, "t": t_zero})
    assert torch.equal(moved_1[:, [0, 2]], base[:, [0, 2]])
    assert not torch.allclose(moved_1[:, 1], base[:, 1])
    assert not torch.allclose(moved_0[:, 0], base[:, 0])


def test_attention_mixes_views() -> None:
    """Control for the test above: with attention on, t[1] does reach view 0."""
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.2)
    inputs = make_inputs(model.config)
    t_other = inputs["t"].clone()
    t_other[:, 1] += 0.3
    with torch.no_grad():
        diff = model(**inputs)[:, 0] - model(**{**inputs, "t": t_other})[:, 0]
    assert diff.abs().max() > 1e-4


@pytest.mark.parametrize(
    ("views", "h", "w"), [(1, 16, 16), (2, 16, 16), (4, 8, 12), (12, 8, 8), (2, 8, 12)]
)
def test_shapes(views: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model)
    with torch.no_grad():
        out = model(**make_inputs(model.config, v=views, h=h, w=w))
    assert out.shape == (2, views, 16, h, w)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_bad_shapes_raise() -> None:
    model = NextDiT(get_config("tiny"))
    inputs = make_inputs(model.config, h=16, w=15)
    with pytest.raises(ValueError, match="do not fit"):
        model(**inputs)
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match="t must be"):
        model(**{**inputs, "t": inputs["t"][:, :1]})


def test_patchify_order_and_round_trip() -> None:
    model = NextDiT(get_config("tiny"))
    lat = torch.randn(2, 3, 16, 8, 12)
    tokens = model.patchify(lat)
    assert tokens.shape == (2, 3 * 4 * 6, 64)
    v, r, c = 2, 3, 5  # token (view, row, col) -> index v*h*w + r*w + c, features (pH, pW, C)
    expected = lat[1, v, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[1, v * 24 + r * 6 + c], expected)
    assert torch.equal(model.unpatchify(tokens, 3, 8, 12), lat)


def test_empty_caption_is_finite_and_ignores_text() -> None:
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.2)
    inputs = make_inputs(model.config)
    inputs["text_mask"][1] = False
    other_text = inputs["text"].clone()
    other_text[1] = torch.randn_like(other_text[1])
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "text": other_text})
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(a[0], a[0] * 0)


def test_softcap_bounds_logits() -> None:
    torch.manual_seed(0)
    plain = NextDiT(get_config("tiny"))
    randomize(plain, std=0.3)
    huge = NextDiT(get_config("tiny", attn_softcap=1e6))
    small = NextDiT(get_config("tiny", attn_softcap=0.5))
    huge.load_state_dict(plain.state_dict())
    small.load_state_dict(plain.state_dict())
    inputs = make_inputs(plain.config)
    with torch.no_grad():
        ref = plain(**inputs)
        torch.testing.assert_close(huge(**inputs), ref, atol=1e-4, rtol=1e-4)
        assert (small(**inputs) - ref).abs().max() > 1e-3


def test_tiny_overfits_one_batch() -> None:
    """Flow matching inline: x_t = (1 - t) x + t eps, target v = eps - x; per-view t."""
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(model.config, seed=1)
    x = inputs["latents"]
    eps = torch.randn(x.shape, generator=gen)
    t = torch.rand(x.shape[:2], generator=gen)
    tt = t[..., None, None, None]
    x_t, target = (1 - tt) * x + tt * eps, eps - x
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = (model(x_t, t, inputs["text"], inputs["text_mask"]) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler on CPU",
)
def test_block_compiles_fullgraph_and_matches_eager() -> None:
    torch.manual_seed(0)
    model = NextDiT(get_config("tiny"))
    randomize(model, std=0.2)
    block = model.layers[0]
    args = block_inputs(model)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        eager = block(*args)
        out = compiled(*args)
    assert not torch.equal(eager, args[0])
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_onediffusion_param_count_on_meta() -> None:
    cfg = get_config("onediffusion-2.8b")
    with torch.device("meta"):
        model = NextDiT(cfg)
    n = count_parameters(model)
    assert abs(n - 2.80e9) / 2.80e9 < 0.01, n
    assert cfg.head_dim == 120 and cfg.rope_axes_dim == (40, 40, 40)
    assert cfg.ffn_hidden_size == 10240 and cfg.cond_dim == 1024
    assert all(p.is_meta for p in model.parameters())
    # torchtitan-style FLOPs: adaLN modulation and embedders excluded from N.
    assert count_parameters(model, flops_only=True) == 2_540_884_544
    assert flops_per_token(model, 4096) == 6 * 2_540_884_544 + 12 * 16 * 3840 * 4096


def test_other_configs_are_sized_for_their_job() -> None:
    for name, low, high in (("small", 5e7, 4e8), ("tiny", 1e4, 2e6)):
        with torch.device("meta"):
            n = count_parameters(NextDiT(get_config(name)))
        assert low < n < high, (name, n)
    with pytest.raises(KeyError):
        get_config("nope")
    assert get_config("tiny", attn_softcap=30.0).attn_softcap == 30.0
