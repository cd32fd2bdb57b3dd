"""Full fine-tune vs LoRA (rank 16 and 64): what training holds besides the weights.

Each variant trains the ``small`` Next-DiT (0.26B) on CPU in a fresh process, one after the
other in this run, with the fit's own pieces: ``training.lora.add_adapters`` on the default
targets, ``training.optim.build_optimizer`` (AdamW over what requires grad), the
flow-matching loss on random latents and captions (the frozen encoders are the same for
every variant, so they are left out). Per variant: trainable parameters, gradient +
optimizer state bytes after a step, the peak RSS growth over the steps (from before the
first step: gradients, optimizer state, activations) and the median step time. The target:
LoRA rank 64's gradient + optimizer state <= 5% of the full fine-tune's.

It then prints, from formulas (below, ``estimate_*``), the 2.8B's memory per GPU: a LoRA fit
on one H100 (bf16 base, activation checkpointing; 1 x 512 px and 4 x 256 px) and a full
fit under FSDP2 on 8 and 64 GPUs (the ``onediffusion-2.8b.yaml`` recipe: fp32 master
weights, AdamW, EMA, bf16 compute, per-block checkpointing, 32 samples of 256 px per GPU).

    .venv/bin/python bench/finetune_memory.py [--config small] [--resolution 128] [--steps 3]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import NextDiT, get_config  # noqa: E402
from model.flow import flow_matching_loss  # noqa: E402

VARIANTS = {"full": 0, "lora16": 16, "lora64": 64}
TARGET_RATIO = 0.05
GIB = 1024**3
# The frozen encoders on the GPU beside the transformer (bf16): the release's T5 encoder
# (d_model 2048: flan-t5-xl's encoder, ~1.22B parameters) and its 16-channel VAE (~84M).
T5_PARAMS, VAE_PARAMS = 1.22e9, 84e6


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def state_bytes(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Gradients plus every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq)."""
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None
    )
    opt = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.ndim > 0
    )
    return grads + opt


def measure(config: str, rank: int, resolution: int, steps: int) -> dict:
    """One variant, in this process: build, adapt, then ``steps`` optimizer steps."""
    from omegaconf import OmegaConf

    from training.config import LORA_TARGETS
    from training.lora import add_adapters
    from training.optim import build_optimizer

    torch.manual_seed(0)
    mcfg = get_config(config)
    net = NextDiT(mcfg)
    total = sum(p.numel() for p in net.parameters())
    if rank:
        section = OmegaConf.create(
            {"rank": rank, "alpha": rank, "dropout": 0.0, "targets": list(LORA_TARGETS)}
        )
        add_adapters(net, section)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    ocfg = OmegaConf.create(
        {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
         "schedule": "constant", "min_lr_ratio": 0.0, "no_decay_1d": True, "foreach": True}
    )  # fmt: skip
    optimizer = build_optimizer(net, ocfg, steps)["optimizer"]
    side = resolution // 8
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 1, mcfg.in_channels, side, side, generator=gen)
    text = torch.randn(1, 32, mcfg.caption_dim, generator=gen)
    mask = torch.ones(1, 32, dtype=torch.bool)
    before = rss_bytes()
    times, held = [], 0
    for step in range(steps):
        start = time.perf_counter()
        out = flow_matching_loss(net, latents, text, mask, generator=gen)
        out.loss.mean().backward()
        optimizer.step()
        if step == 0:
            held = state_bytes(net, optimizer)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "rank": rank,
        "params": total,
        "trainable": trainable,
        "grad_optimizer_bytes": held,
        "peak_rss_delta_bytes": max(0, peak_rss_bytes() - before),
        "step_s": statistics.median(times[1:] or times),
    }


# --------------------------------------------------------------------------- formulas


def adapter_params(config: str, rank: int) -> int:
    """LoRA parameters on the default targets: r x (in + out) per adapted linear."""
    from training.config import LORA_TARGETS
    from training.lora import target_names

    with torch.device("meta"):
        net = NextDiT(get_config(config))
    modules = dict(net.named_modules())
    return sum(
        rank * (modules[n].in_features + modules[n].out_features)
        for n in target_names(net, list(LORA_TARGETS))
    )


def activation_bytes(config: str, batch: int, tokens: int, bytes_per: int = 2) -> int:
    """Per-block activation checkpointing: each block keeps its input (B x S x D), and one
    block at a time recomputes its internals in backward, about B x S x (14 D + 3 F) values
    (q/k/v/out, norms, modulated copies, the SwiGLU's three F-wide tensors) plus the
    attention's softmax in flash/SDPA form (no S x S matrix)."""
    c = get_config(config)
    per_block_input = batch * tokens * c.hidden_size * bytes_per
    one_block = batch * tokens * (14 * c.hidden_size + 3 * c.ffn_hidden_size) * bytes_per
    return c.depth * per_block_input + 2 * one_block  # forward and backward of one block


def tokens(config: str, views: int, side: int) -> int:
    c = get_config(config)
    grid = side // 8 // c.patch_size[1]
    return views * grid * grid


def estimate_lora(config: str, rank: int, views: int, side: int) -> dict:
    """One GPU: the bf16 frozen base, fp32 adapters (weights, grads, AdamW, EMA: 20 B each),
    the bf16 encoders, checkpointed activations of one sample."""
    with torch.device("meta"):
        base = sum(p.numel() for p in NextDiT(get_config(config)).parameters())
    adapters = adapter_params(config, rank)
    parts = {
        "base_bf16": base * 2,
        "adapters_fp32_w_grad_adam_ema": adapters * 20,
        "encoders_bf16": int((T5_PARAMS + VAE_PARAMS) * 2),
        "activations": activation_bytes(config, 1, tokens(config, views, side)),
    }
    return {"adapter_params": adapters, **parts, "total": sum(parts.values())}


def estimate_fsdp(config: str, gpus: int, batch: int, side: int) -> dict:
    """FSDP2 over ``gpus``: fp32 master weights + grads + AdamW (16 B) and the EMA (4 B)
    sharded; bf16 all-gathered parameters of two blocks at a time (prefetch); the bf16
    encoders replicated; checkpointed activations of the per-GPU batch."""
    c = get_config(config)
    with torch.device("meta"):
        net = NextDiT(c)
    n = sum(p.numel() for p in net.parameters())
    block = sum(p.numel() for p in net.layers[0].parameters())
    parts = {
        "sharded_states_fp32": n * 20 // gpus,
        "gathered_blocks_bf16": 2 * block * 2,
        "encoders_bf16": int((T5_PARAMS + VAE_PARAMS) * 2),
        "activations": activation_bytes(config, batch, tokens(config, 1, side)),
    }
    return {**parts, "total": sum(parts.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child: one variant, one JSON line
        print(json.dumps(measure(args.config, VARIANTS[args.variant], args.resolution, args.steps)))
        return

    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--config", args.config,
               "--resolution", str(args.resolution), "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    full = results["full"]
    print(
        f"{args.config} Next-DiT on CPU, 1 x {args.resolution} px, {args.steps} steps per variant"
    )
    print(f"{'variant':<8}{'trainable':>14}{'grad+optim':>14}{'peak RSS +':>14}{'step':>9}"
          f"{'state vs full':>15}{'RSS vs full':>13}")  # fmt: skip
    for name, r in results.items():
        ratio = r["grad_optimizer_bytes"] / full["grad_optimizer_bytes"]
        rss = r["peak_rss_delta_bytes"] / max(1, full["peak_rss_delta_bytes"])
        r["state_ratio"], r["rss_ratio"] = ratio, rss
        print(f"{name:<8}{r['trainable']:>14,}{r['grad_optimizer_bytes'] / GIB:>12.3f}Gi"
              f"{r['peak_rss_delta_bytes'] / GIB:>12.3f}Gi{r['step_s']:>8.2f}s{ratio:>14.2%}"
              f"{rss:>12.2%}")  # fmt: skip
    ok = results["lora64"]["state_ratio"] <= TARGET_RATIO
    print(f"target: LoRA r64 grad+optimizer state <= {TARGET_RATIO:.0%} of full: "
          f"{results['lora64']['state_ratio']:.2%} {'OK' if ok else 'MISSED'}")  # fmt: skip

    big = "onediffusion-2.8b"
    # Gradient + optimizer state is 12 B per trainable parameter on both sides, so the ratio
    # is the trainable fraction: r (in + out) / (in x out) per adapted linear.
    with torch.device("meta"):
        big_params = sum(p.numel() for p in NextDiT(get_config(big)).parameters())
    big_ratio = adapter_params(big, 64) / big_params
    print(f"{big} by parameter count: LoRA r64 grad+optimizer state {big_ratio:.2%} of full "
          f"({adapter_params(big, 64) / 1e6:.1f}M of {big_params / 1e9:.2f}B trainable)")  # fmt: skip
    estimates = {
        "lora64_1x512": estimate_lora(big, 64, 1, 512),
        "lora64_4x256": estimate_lora(big, 64, 4, 256),
        "lora16_1x512": estimate_lora(big, 16, 1, 512),
        "fsdp_full_8gpu": estimate_fsdp(big, 8, 32, 256),
        "fsdp_full_64gpu": estimate_fsdp(big, 64, 32, 256),
    }
    print(f"\n{big}, memory per GPU from the formulas (GiB; estimate_* in this file):")
    for name, e in estimates.items():
        parts = ", ".join(
            f"{k} {v / GIB:.2f}" for k, v in e.items() if k not in ("total", "adapter_params")
        )
        extra = (
            f" ({e['adapter_params'] / 1e6:.1f}M adapter params)" if "adapter_params" in e else ""
        )
        print(f"  {name:<16} {e['total'] / GIB:6.1f}{extra}: {parts}")
    print(json.dumps({"variants": results, "target_met": ok, "ratio_2p8b_lora64": big_ratio,
                      "estimates_2p8b": estimates}))  # fmt: skip


if __name__ == "__main__":
    main()
