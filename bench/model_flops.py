"""Training FLOPs per token of Next-DiT configs, and measured MFU on a CUDA GPU.

Three FLOPs figures per config (``model/flops.py``):
- headline, torchtitan's ``6 N + 12 L D S`` with N the parameters acting on every image
  token (adaLN modulation and embedders left out); MFU is reported with it, as the issue asks;
- executed, the matmuls the model really runs (text k/v on caption tokens, attention over
  S + T, adaLN per view, first layers without input gradients);
- torch count, ``torch.utils.flop_counter`` over one forward + backward on the meta device,
  which the executed formula must equal (``tests/model/test_flops.py`` holds it to that).

    .venv/bin/python bench/model_flops.py                   # table; MFU if CUDA is present
    .venv/bin/python bench/model_flops.py --views 2 --image 1024 --precision autocast

MFU = achieved FLOPs / peak dense bf16 FLOPs of the GPU (read from its device name), printed
with both the headline and the executed numerator. The step measured is the trainer's own
set-up (``training.module``): per-block activation checkpointing, per-block torch.compile,
FSDP2 on a one-rank mesh with bf16 compute over fp32 master weights (``--precision``),
foreach AdamW; the largest batch in --batches that fits. Without CUDA the same step runs
on CPU with ``tiny``, to show the path works, not to measure it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import (  # noqa: E402
    NextDiT,
    config_names,
    count_parameters,
    executed_flops_per_token,
    flops_per_token,
    get_config,
)
from model.flops import counted_training_flops, image_tokens, peak_bf16_flops  # noqa: E402
from training.parallelize import checkpoint_block, init_sharded, shard  # noqa: E402


def build_meta(name: str) -> NextDiT:
    with torch.device("meta"):
        return NextDiT(get_config(name))


def flops_table(views: int, image: int, text_len: int) -> None:
    latent = image // 8
    print(
        f"FLOPs per image token, {views} view(s) of {image}x{image} "
        f"(latent {latent}x{latent}), caption {text_len} tokens"
    )
    header = f"{'config':<20}{'params':>10}{'N (flops)':>12}{'S':>7}{'6N':>10}{'12LDS':>10}"
    print(header + f"{'headline':>11}{'executed':>11}{'torch count':>13}{'per sample':>13}")
    for name in config_names():
        model = build_meta(name)
        cfg = model.config
        seq = image_tokens(cfg, views, latent, latent)
        n_all, n = count_parameters(model), count_parameters(model, flops_only=True)
        fpt = flops_per_token(model, seq)
        executed = executed_flops_per_token(model, seq, views, text_len)
        counted = counted_training_flops(cfg, 1, views, latent, latent, text_len) / seq
        attn = 12.0 * cfg.depth * cfg.hidden_size * seq
        print(
            f"{name:<20}{n_all / 1e6:>9.1f}M{n / 1e6:>11.1f}M{seq:>7}{6 * n / 1e9:>9.2f}G"
            f"{attn / 1e9:>9.2f}G{fpt / 1e9:>10.2f}G{executed / 1e9:>10.2f}G{counted / 1e9:>12.2f}G"
            f"{fpt * seq / 1e12:>11.2f}TF"
        )


def single_rank_mesh(device: torch.device):
    """A one-process device mesh, so FSDP2 runs here exactly as each rank of a fit runs it
    (minus the communication with other ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


def build_for_step(
    name: str, device: torch.device, precision: str, compile_blocks: bool
) -> NextDiT:
    """The model as the trainer sets it up: per-block activation checkpointing, then
    per-block compile; ``fsdp-bf16`` adds the trainer's FSDP2 sharding with bf16 compute
    over fp32 master weights, the other modes keep one unsharded model in one dtype."""
    model = build_meta(name)
    for block in model.layers:
        checkpoint_block(block)
        if compile_blocks:
            block.compile()
    if precision == "fsdp-bf16":
        shard(model, single_rank_mesh(device), torch.bfloat16)
        model.to_empty(device=device)
        init_sharded(model)
        return model
    model.to_empty(device=device)
    model.init_weights()
    return model.to(torch.bfloat16 if precision == "bf16-params" else torch.float32)


def measure_step(
    name: str,
    device: torch.device,
    batch: int,
    views: int,
    latent: int,
    text_len: int,
    precision: str,
    compile_blocks: bool,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    """Seconds per AdamW training step and achieved FLOP/s (headline FLOPs/token)."""
    model = build_for_step(name, device, precision, compile_blocks)
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # as the trainer
    # Inputs in the compute dtype, timesteps in fp32: what the trainer's denoiser passes.
    data_dtype = torch.bfloat16 if precision in ("bf16-params", "fsdp-bf16") else torch.float32
    x = torch.randn(batch, views, cfg.in_channels, latent, latent, device=device, dtype=data_dtype)
    eps = torch.randn_like(x)
    t = torch.rand(batch, views, device=device)
    text = torch.randn(batch, text_len, cfg.caption_dim, device=device, dtype=data_dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    mask[:, text_len // 2 :] = False
    tt = t[..., None, None, None].to(data_dtype)
    x_t, target = (1 - tt) * x + tt * eps, eps - x
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "autocast")

    def step() -> None:
        with autocast:
            pred = model(x_t, t, text, mask)
        loss = (pred.float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    seq = image_tokens(cfg, views, latent, latent)
    flops = flops_per_token(model, seq) * seq * batch
    executed = executed_flops_per_token(model, seq, views, text_len) * seq * batch
    return {
        "batch": batch,
        "seconds": seconds,
        "flops_per_step": flops,
        "achieved": flops / seconds,
        "achieved_executed": executed / seconds,
    }


def measure_mfu(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    latent = args.image // 8
    print(
        f"\nMeasured training step: {args.config}, {args.views} views of {args.image}px, "
        f"{args.precision}, checkpointing per block, compile={not args.no_compile}, on {name}"
    )
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    for batch in args.batches:
        torch.cuda.reset_peak_memory_stats()
        r = None
        try:
            r = measure_step(
                args.config,
                device,
                batch,
                args.views,
                latent,
                args.text_len,
                args.precision,
                not args.no_compile,
                args.steps,
                args.warmup,
            )
        except torch.cuda.OutOfMemoryError:
            print(f"  batch {batch}: out of memory, trying smaller")
        if r is None:
            # Outside the except block: its traceback held the failed step's frames (model,
            # optimizer state, activations) alive until here.
            gc.collect()
            torch.cuda.empty_cache()
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(f"  batch {batch}: {r['seconds'] * 1e3:.0f} ms/step, peak memory {mem:.1f} GiB")
        print(
            f"  achieved {r['achieved'] / 1e12:.1f} TFLOP/s headline, "
            f"{r['achieved_executed'] / 1e12:.1f} TFLOP/s executed"
        )
        if peak is None:
            print(
                f"  MFU: unknown peak bf16 FLOPs for {name!r} (add it to model/flops.py PEAK_BF16_FLOPS)"
            )
        else:
            print(
                f"  MFU {100 * r['achieved'] / peak:.1f}% headline "
                f"({100 * r['achieved_executed'] / peak:.1f}% executed) "
                f"of {peak / 1e12:.0f} TFLOP/s dense bf16"
            )
        return
    print("  no batch size fitted")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="onediffusion-2.8b", choices=config_names())
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--image", type=int, default=512, help="image side in pixels (VAE /8)")
    parser.add_argument("--text-len", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 8, 4, 2, 1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--precision",
        choices=["fsdp-bf16", "bf16-params", "autocast", "fp32"],
        default="fsdp-bf16",
        help="fsdp-bf16: the trainer's FSDP2 path (fp32 master weights, bf16 compute); "
        "bf16-params: one bf16 model and bf16 AdamW state; autocast: fp32 weights under autocast",
    )
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    flops_table(args.views, args.image, args.text_len)
    model = build_meta("onediffusion-2.8b")
    seq = image_tokens(model.config, args.views, args.image // 8, args.image // 8)
    print(
        f"\nonediffusion-2.8b: {count_parameters(model) / 1e9:.3f}B parameters, "
        f"{flops_per_token(model, seq) / 1e9:.2f} GFLOPs per token at S={seq} "
        f"({flops_per_token(model, seq) * seq / 1e12:.1f} TFLOPs per sample per step)"
    )

    if torch.cuda.is_available():
        measure_mfu(args)
        return
    compiled = "compiled, checkpointed blocks" if not args.no_compile else "checkpointed blocks"
    print(
        f"\nMFU needs CUDA (none here). Exercising the same step on CPU with `tiny` ({compiled}):"
    )
    torch.set_num_threads(1)
    r = measure_step(
        "tiny",
        torch.device("cpu"),
        batch=2,
        views=2,
        latent=16,
        text_len=8,
        precision=args.precision,
        compile_blocks=not args.no_compile,
        steps=3,
        warmup=1,
    )
    print(
        f"  tiny, {args.precision}, batch 2, 2 views of 16x16 latents: {r['seconds'] * 1e3:.0f} ms/step, "
        f"{r['achieved'] / 1e9:.2f} GFLOP/s achieved"
    )


if __name__ == "__main__":
    main()
