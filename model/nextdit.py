"""Next-DiT, the OneDiffusion denoiser, in plain PyTorch.

Architecture as lehduong/OneDiffusion releases it (``onediffusion/models/denoiser/nextdit``):

* all views are patchified (2x2) into one token sequence ordered (view, row, col), with a
  3-axis RoPE (``model/rope.py``);
* every view carries its own conditioning vector ``c_v = MLP(sinusoid(t_v)) + proj(pool(text))``
  and every token of view v is modulated by ``c_v`` in every block (per-token timesteps are
  what lets one model hold condition views clean while it denoises target views);
* blocks: sandwich RMSNorm around attention and FFN, scale-only adaLN ``x * (1 + scale)``,
  ``tanh`` gates on both residual branches, LayerNorm QK-norm over all heads, grouped-query
  self-attention, SwiGLU FFN, and text entering through a gated cross-attention inside the
  attention module (per-head ``tanh`` gate, zero at init) whose output is added to the
  self-attention output before the output projection;
* final layer: LayerNorm (no affine) with adaLN scale, linear to 2*2*C, unpatchify.

Initialisation follows Lumina-Next (the release ships only trained weights): Xavier linears,
N(0, 0.02) timestep MLP, zero adaLN outputs, zero text gates and a zero final projection. So
every block is the identity and the model outputs exactly zero at init.

Parameter names are our own; ``model/convert.py`` maps them to the release's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import NextDiTConfig
from model.rope import RopeScaling, apply_rope, grid_positions, rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype (as the release does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Needed after meta-device materialisation: ``to_empty`` leaves garbage."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.type_as(x)


def _per_view(x: Tensor, views: int) -> Tensor:
    """[B, V*T, D] -> [B, V, T, D], so per-view vectors broadcast over a view's tokens."""
    return x.unflatten(1, (views, -1))


def modulate(x: Tensor, scale: Tensor) -> Tensor:
    """Scale-only adaLN: ``x * (1 + scale)``; ``scale`` is [B, V, 1, D], ``x`` is [B, V*T, D]."""
    return (_per_view(x, scale.shape[1]) * (1 + scale)).flatten(1, 2)


def gated(gate: Tensor, branch: Tensor) -> Tensor:
    """``tanh(gate) * branch`` with a per-view gate; tanh(0) = 0 makes the block an identity."""
    return (torch.tanh(gate) * _per_view(branch, gate.shape[1])).flatten(1, 2)


def timestep_features(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features ``[cos, sin]`` (the release's order) of any-shaped ``t``, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[..., None] * freqs
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = F.pad(feats, (0, 1))
    return feats


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> conditioning vector; t is scaled to the release's 0..1000 first."""

    def __init__(self, cond_dim: int, freq_dim: int, scale: float) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.fc1 = nn.Linear(freq_dim, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t * self.scale, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(feats)))


class CaptionPooler(nn.Module):
    """Masked mean of caption features -> LayerNorm -> linear: a global text vector."""

    def __init__(self, caption_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(caption_dim, eps=1e-6)
        self.proj = nn.Linear(caption_dim, cond_dim)

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        mask = text_mask[..., None].to(text.dtype)
        pooled = (text * mask).sum(1) / (mask.sum(1) + 1e-8)
        return self.proj(self.norm(pooled))


class Attention(nn.Module):
    """GQA self-attention over image tokens plus gated cross-attention to caption tokens.

    Two release details kept for weight compatibility: q/k LayerNorms act on the projected
    vector of all heads at once (not per head); the cross-attention shares the RoPE-rotated
    queries and tiles its kv heads (query head i reads text kv head ``i % n_kv``), whereas
    self-attention groups them (query head i reads kv head ``i // (n_heads / n_kv)``).
    """

    def __init__(self, config: NextDiTConfig) -> None:
        super().__init__()
        dim, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.softcap = config.attn_softcap
        self.to_q = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.to_k = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.to_v = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.to_k_text = nn.Linear(config.caption_dim, self.n_kv_heads * hd, bias=False)
        self.to_v_text = nn.Linear(config.caption_dim, self.n_kv_heads * hd, bias=False)
        self.text_gate = nn.Parameter(torch.empty(self.n_heads))
        self.to_out = nn.Linear(self.n_heads * hd, dim, bias=False)
        norm = nn.LayerNorm if config.qk_norm else None
        self.norm_q = norm(self.n_heads * hd) if norm else nn.Identity()
        self.norm_k = norm(self.n_kv_heads * hd) if norm else nn.Identity()
        self.norm_k_text = norm(self.n_kv_heads * hd, eps=1e-6) if norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero text gates: text contributes nothing until training opens them."""
        nn.init.zeros_(self.text_gate)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # [B, n, L, hd]

    def forward(
        self, x: Tensor, text: Tensor, text_mask: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        q = apply_rope(self._heads(self.norm_q(self.to_q(x)), self.n_heads), cos, sin)
        k = apply_rope(self._heads(self.norm_k(self.to_k(x)), self.n_kv_heads), cos, sin)
        v = self._heads(self.to_v(x), self.n_kv_heads)
        out = self._self_attention(q, k, v)

        tile = (1, self.n_heads // self.n_kv_heads, 1, 1)
        kt = self._heads(self.norm_k_text(self.to_k_text(text)), self.n_kv_heads).repeat(tile)
        vt = self._heads(self.to_v_text(text), self.n_kv_heads).repeat(tile)
        # A caption with no valid token would make softmax NaN: let it see its padding, then
        # drop the result, so such samples get no text contribution at all.
        has_text = text_mask.any(-1)
        mask = (text_mask | ~has_text[:, None])[:, None, None, :]
        out_t = F.scaled_dot_product_attention(q, kt, vt, attn_mask=mask)
        gate = torch.tanh(self.text_gate).view(1, -1, 1, 1) * has_text.view(-1, 1, 1, 1)
        out = out + out_t * gate.to(out_t.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _self_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        grouped = self.n_heads != self.n_kv_heads
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
        # tanh soft cap on the scaled logits (flash-attn's ``softcap``). Explicit math keeps
        # it portable but materialises [B, H, N, N] logits: fine for tests and short
        # sequences; long training runs would want a fused kernel (e.g. flex_attention).
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits.softmax(-1, dtype=torch.float32).type_as(q) @ v


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class NextDiTBlock(nn.Module):
    """One Next-DiT block; the unit for activation checkpointing, FSDP and compile."""

    def __init__(self, config: NextDiTConfig) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.norm_eps
        self.attn = Attention(config)
        self.ffn = FeedForward(dim, config.ffn_hidden_size)
        self.attn_norm_in = RMSNorm(dim, eps)
        self.attn_norm_out = RMSNorm(dim, eps)
        self.ffn_norm_in = RMSNorm(dim, eps)
        self.ffn_norm_out = RMSNorm(dim, eps)
        self.text_norm = RMSNorm(config.caption_dim, eps)
        self.modulation = nn.Linear(config.cond_dim, 4 * dim)  # after SiLU; zero at init

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        text: Tensor,
        text_mask: Tensor,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        """x [B, V*T, D], cond [B, V, cond_dim], text [B, L, caption_dim], text_mask [B, L]."""
        mods = self.modulation(F.silu(cond)).unsqueeze(2)  # [B, V, 1, 4D]
        scale_attn, gate_attn, scale_ffn, gate_ffn = mods.chunk(4, dim=-1)
        h = self.attn(
            modulate(self.attn_norm_in(x), scale_attn), self.text_norm(text), text_mask, cos, sin
        )
        x = x + gated(gate_attn, self.attn_norm_out(h))
        h = self.ffn(modulate(self.ffn_norm_in(x), scale_ffn))
        return x + gated(gate_ffn, self.ffn_norm_out(h))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) with adaLN scale, then a linear to one patch's channels."""

    def __init__(self, config: NextDiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Linear(config.cond_dim, config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.patch_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale = self.modulation(F.silu(cond)).unsqueeze(2)
        return self.linear(modulate(self.norm(x), scale))


class NextDiT(nn.Module):
    """Multi-view flow-matching denoiser: velocity ``eps - x`` for every view at once."""

    def __init__(self, config: NextDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.time_embed = TimestepEmbedder(
            config.cond_dim, config.timestep_freq_dim, config.timestep_scale
        )
        self.caption_embed = CaptionPooler(config.caption_dim, config.cond_dim)
        self.layers = nn.ModuleList(NextDiTBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(config)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)apply the model's own init; call again after ``to_empty`` on a meta model.

        Generic ``reset_parameters`` (Kaiming linears) would undo the zero adaLN and gates
        that make every block start as the identity.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms (ones/zeros), text gates (zeros)
        for linear in (self.time_embed.fc1, self.time_embed.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.trunc_normal_(self.caption_embed.proj.weight, std=0.02)
        for linear in [block.modulation for block in self.layers] + [
            self.final.modulation,
            self.final.linear,
        ]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def condition(self, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """Per-view conditioning [B, V, cond_dim]: own timestep + the sample's pooled caption."""
        return self.time_embed(t) + self.caption_embed(text, text_mask)[:, None, :]

    def patchify(self, latents: Tensor) -> Tensor:
        """[B, V, C, H, W] -> [B, V*h*w, pH*pW*C], tokens in (view, row, col) order."""
        b, v, c, h, w = latents.shape
        _, ph, pw = self.config.patch_size
        x = latents.reshape(b, v, c, h // ph, ph, w // pw, pw)
        return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, v * (h // ph) * (w // pw), ph * pw * c)

    def unpatchify(self, tokens: Tensor, views: int, height: int, width: int) -> Tensor:
        """Inverse of :meth:`patchify` for latents of size height x width."""
        b, c = tokens.shape[0], self.config.in_channels
        _, ph, pw = self.config.patch_size
        x = tokens.reshape(b, views, height // ph, width // pw, ph, pw, c)
        return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, views, c, height, width)

    def rope(
        self,
        views: int,
        rows: int,
        cols: int,
        device: torch.device,
        scaling: RopeScaling | None = None,
    ) -> tuple[Tensor, Tensor]:
        """cos/sin [N, head_dim/2] for a [views, rows, cols] patch grid."""
        positions = grid_positions(views, rows, cols, device)
        return rope_cos_sin(positions, self.config.rope_axes_dim, self.config.rope_theta, scaling)

    def forward(
        self,
        latents: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        rope_scaling: RopeScaling | None = None,
    ) -> Tensor:
        """latents [B, V, C, H, W], t [B, V] in [0, 1] (1 = noise), text [B, L, caption_dim],
        text_mask [B, L] bool -> velocity [B, V, C, H, W]."""
        b, v, c, h, w = latents.shape
        _, ph, pw = self.config.patch_size
        if c != self.config.in_channels or h % ph or w % pw:
            raise ValueError(f"latents {tuple(latents.shape)} do not fit {self.config.name}")
        if t.shape != (b, v):
            raise ValueError(f"t must be [B, V] = {(b, v)}, got {tuple(t.shape)}")
        text_mask = text_mask.bool()
        cos, sin = self.rope(v, h // ph, w // pw, latents.device, rope_scaling)
        cond = self.condition(t, text, text_mask)
        x = self.patch_embed(self.patchify(latents))
        for block in self.layers:
            x = block(x, cond, text, text_mask, cos, sin)
        return self.unpatchify(self.final(x, cond), v, h, w)


def _is_modulation(name: str) -> bool:
    return name.split(".")[-2] == "modulation"


def _is_embedding(name: str) -> bool:
    return name.split(".")[0] in {"patch_embed", "time_embed", "caption_embed"}


def count_parameters(model: nn.Module, flops_only: bool = False) -> int:
    """Parameter count (works on the meta device).

    ``flops_only`` drops adaLN modulation (applied once per view, not per token) and the
    embedders (patch / timestep / pooled caption), as torchtitan drops embeddings.
    """
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (flops_only and (_is_modulation(name) or _is_embedding(name)))
    )
