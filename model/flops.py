"""Training FLOPs of a Next-DiT step: the headline formula, what really runs, and torch's count.

MFU is only as honest as its numerator. ``flops_per_token`` is the torchtitan-style
headline the benchmarks report (``6 N + 12 L D S``). ``executed_flops_per_token`` counts
the matmuls the model really runs (text k/v projections on caption tokens only,
cross-attention over the caption, adaLN once per view), and ``counted_training_flops``
asks torch's own FLOP counter, on the meta device, so both formulas can be checked
against the network as built, at the full 2.8B size, in seconds and without a GPU.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import NextDiTConfig
from model.nextdit import NextDiT, count_parameters

# Dense bf16 tensor-core peaks (NVIDIA datasheets); first substring match of the device name
# wins, so the more specific names come first ("H100 PCIe" before "H100" = SXM).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """The MFU denominator for a GPU, from its ``torch.cuda.get_device_name``."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def image_tokens(config: NextDiTConfig, views: int, latent_h: int, latent_w: int) -> int:
    """Sequence length S: patch tokens of all views."""
    _, ph, pw = config.patch_size
    return views * (latent_h // ph) * (latent_w // pw)


def flops_per_token(model: NextDiT, seq_len: int) -> float:
    """Training FLOPs per image token: ``6 N + 12 L D S`` (forward + backward, torchtitan);
    N leaves out adaLN modulation and the embedders."""
    cfg = model.config
    return (
        6.0 * count_parameters(model, flops_only=True)
        + 12.0 * cfg.depth * cfg.hidden_size * seq_len
    )


def executed_flops_per_token(model: NextDiT, seq_len: int, views: int, text_len: int) -> float:
    """Matmul FLOPs per image token as the model runs them, per sample divided by S.

    Differs from the headline where it matters at small S or long captions: only weight
    matrices count (not norms and biases); the text k/v projections act on ``text_len``
    tokens, not on every image token; attention also spans the caption
    (``12 L D (S + T)``); adaLN modulation and the timestep MLP run once per view and the
    caption pooler once per sample; layers whose input needs no gradient (the patch
    embedder and the first timestep layer) skip the input-gradient matmul: 4x, not 6x.
    """
    cfg = model.config
    per_token = per_text = per_view = per_sample = 0.0
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        n = p.numel()
        if name.startswith("patch_embed."):
            per_token += 4 * n
        elif name.startswith("time_embed.fc1."):
            per_view += 4 * n
        elif name.startswith("time_embed."):
            per_view += 6 * n
        elif name.startswith("caption_embed."):
            per_sample += 6 * n  # after a LayerNorm with weights: input gradient needed
        elif ".to_k_text." in name or ".to_v_text." in name:
            per_text += 6 * n
        elif ".modulation." in name:
            per_view += 6 * n
        else:
            per_token += 6 * n
    attention = 12.0 * cfg.depth * cfg.hidden_size * (seq_len + text_len)
    return per_token + attention + (per_text * text_len + per_view * views + per_sample) / seq_len


def counted_training_flops(
    config: NextDiTConfig, batch: int, views: int, latent_h: int, latent_w: int, text_len: int
) -> int:
    """FLOPs of one forward + backward as ``torch.utils.flop_counter`` counts them.

    Runs on the meta device (no memory, no compute: about 4 s for 2.8B) with the math
    attention backend, whose matmuls the counter sees; fused kernels hide theirs.
    """
    with torch.device("meta"):
        model = NextDiT(config)
        latents = torch.empty(batch, views, config.in_channels, latent_h, latent_w)
        t = torch.empty(batch, views)
        text = torch.empty(batch, text_len, config.caption_dim)
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(latents, t, text, mask).float().square().mean().backward()
    return counter.get_total_flops()
