"""``OneGenModule``: the Lightning side of the flow-matching fit (FSDP2 via ``configure_model``).

What lives where:

* ``self.model``  the trainable Next-DiT: per-block activation checkpointing, optional
  per-block ``compile()``, then ``fully_shard`` per block and on the root when the strategy
  gives a device mesh (``ModelParallelStrategy``). On a mesh it is built on the meta device and
  materialised by Lightning; the model's own init is re-applied in ``on_fit_start`` (after
  materialisation, before a checkpoint restore), because Lightning's ``reset_parameters`` pass
  would leave Kaiming weights where adaLN and gates must start at zero.
* ``self.ema``    an exponential moving average of ``self.model``: a second Next-DiT, sharded
  the same way, parameters frozen, updated after every optimizer step. Being a submodule it is
  part of the (sharded) checkpoint and restored with it; a callback-held EMA would not be
  (only rank 0's callback state is saved under ``ModelParallelStrategy``).
* the frozen VAE and text encoder are held OUTSIDE the module tree (``self.frozen``), so they
  are neither sharded, nor given to the optimizer, nor written to checkpoints: they are
  rebuilt from the config (tiny random ones seeded, or local pretrained folders).

The batch contract (``training.data``): ``pixels`` [B, V, 3, H, W] in [-1, 1], ``cond_mask``
[B, V] bool (True = condition view: held clean, no loss), ``prompts``, ``tasks``, ``subsets``,
``keys`` (lists of B strings). Latents and text features are computed online, per step.
Shard batches also carry what the loader skipped (``training.skips`` counts, logs and limits it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from datagen.schema import TASK_LABELS, image_marker
from model import NextDiT, get_config
from model.encoders import FrozenTextEncoder, FrozenVAE
from model.flops import image_tokens
from model.flow import flow_matching_loss, sample
from training import skips

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
}


# Whole tokens in the tiny tokenizer; eight image markers cover every view count the
# readers build (multi-view samples are capped well below that).
TINY_TOKENS: tuple[str, ...] = (*TASK_LABELS, *(image_marker(i) for i in range(8)))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


# --------------------------------------------------------------------------- encoders


@dataclass
class FrozenEncoders:
    """The frozen codec and text encoder; deliberately not an ``nn.Module`` attribute."""

    vae: FrozenVAE
    text: FrozenTextEncoder

    def to(self, device: torch.device | str) -> FrozenEncoders:
        self.vae.to(device)
        self.text.to(device)
        return self


def build_encoders(cfg: DictConfig, caption_dim: int, vocab_dir: str | Path) -> FrozenEncoders:
    """``encoders.kind: tiny`` (random, seeded: the same weights in every process and at
    sampling time) or ``pretrained`` (local folders, offline)."""
    enc = cfg.encoders
    kind = str(enc.kind)
    if kind == "tiny":
        seed = int(enc.get("seed", 0))
        vae = FrozenVAE.tiny(seed=seed, apply_shift=bool(enc.get("vae_apply_shift", True)))
        text = FrozenTextEncoder.tiny(
            vocab_dir,
            extra_tokens=TINY_TOKENS,
            max_length=int(enc.text_max_length),
            d_model=caption_dim,
            seed=seed + 1,
        )
    elif kind == "pretrained":
        if not enc.get("vae_path") or not enc.get("text_path"):
            raise ValueError(
                "encoders.kind=pretrained needs encoders.vae_path and encoders.text_path"
            )
        vae = FrozenVAE.from_pretrained(
            str(enc.vae_path),
            dtype=parse_dtype(enc.get("vae_dtype")),
            apply_shift=bool(enc.get("vae_apply_shift", True)),
        )
        text = FrozenTextEncoder.from_pretrained(
            str(enc.text_path),
            max_length=int(enc.text_max_length),
            dtype=parse_dtype(enc.get("text_dtype")),
        )
    else:
        raise ValueError(f"encoders.kind must be 'tiny' or 'pretrained', got {kind!r}")
    if text.dim != caption_dim:
        raise ValueError(f"text encoder width {text.dim} != model caption_dim {caption_dim}")
    return FrozenEncoders(vae=vae, text=text)


def model_config(cfg: DictConfig):
    node = cfg.model.get("overrides")
    overrides = OmegaConf.to_container(node, resolve=True) if node else {}
    return get_config(str(cfg.model.config), **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parallelism


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing of one block, keeping its parameter names unchanged.

    ``checkpoint_wrapper`` would insert ``_checkpoint_wrapped_module`` into every name (and
    into the optimizer-state keys); overriding the instance's ``forward`` does not. FSDP2's
    hooks sit on ``__call__``, outside the checkpointed region, so recomputation in backward
    runs while the block's parameters are gathered, as with the wrapper.
    """
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]


def shard(model: NextDiT, mesh: Any, param_dtype: torch.dtype | None) -> None:
    """``fully_shard`` every block, then the root. Inputs are cast by the caller (so the
    timesteps and RoPE tables stay float32): ``cast_forward_inputs=False`` everywhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _dtensor_rng_supported(mesh: Any) -> bool:
    try:
        from torch.distributed.tensor._random import is_rng_supported_mesh

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(is_rng_supported_mesh(mesh))
    except Exception:  # private API; fall back to the replica path
        return False


@torch.no_grad()
def init_sharded(model: NextDiT) -> None:
    """Apply ``NextDiT.init_weights`` to a (possibly sharded) model after materialisation.

    On CUDA meshes DTensor random ops draw each shard as the slice of one global random
    tensor, so ``init_weights`` runs in place. On CPU (gloo) DTensor has no RNG tracker: every
    rank would draw its shard from the same local stream and all shards would be copies of
    each other. There, a full replica is initialised on each rank (same seed) and each rank
    keeps its own ``torch.chunk`` slice, which is how FSDP2 shards dim 0.
    """
    params = list(model.parameters())
    dtensors = [p for p in params if hasattr(p, "device_mesh")]
    if not dtensors or _dtensor_rng_supported(dtensors[0].device_mesh):
        model.init_weights()
        return
    with torch.device("cpu"):
        full = NextDiT(model.config)  # the constructor runs init_weights
    for (name, p), (_, q) in zip(model.named_parameters(), full.named_parameters(), strict=True):
        if not hasattr(p, "device_mesh"):
            p.copy_(q)
            continue
        mesh = p.device_mesh
        if mesh.ndim != 1 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
            raise RuntimeError(f"{name}: unexpected placement {p.placements}")
        chunks = torch.chunk(q, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        local = _local(p)
        part = chunks[rank] if rank < len(chunks) else q.new_empty((0, *q.shape[1:]))
        if part.shape != local.shape:
            raise RuntimeError(f"{name}: shard {tuple(local.shape)} != slice {tuple(part.shape)}")
        local.copy_(part)


# --------------------------------------------------------------------------- schedule


def lr_lambda(warmup: int, schedule: str, total: int, min_ratio: float):
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


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --------------------------------------------------------------------------- module


class OneGenModule(pl.LightningModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__()
        self.cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
        self.net_config = model_config(self.cfg)
        self.model: NextDiT | None = None
        self.ema: NextDiT | None = None
        self.frozen: FrozenEncoders | None = None  # not an nn.Module: not sharded/saved
        self._needs_init = False
        self.built_on_meta = False
        self._micro = 0  # micro-batches since the last optimizer step
        self._task_index: dict[str, int] = {}
        self._task_acc: Tensor | None = None  # [n_tasks, 2] (loss sum, samples) since last log
        self._grad_norm: Tensor | None = None
        self._param_cache: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
        self.last_batch_stats: dict[str, int] = {}  # samples / tokens of the last micro-batch
        self.last_perf: dict[str, float] = {}  # ThroughputMonitor's last window (progress line)
        self._skips = skips.empty()  # this rank's data skips since the last log window
        self.data_totals = skips.empty()  # summed over ranks and the run (checkpointed)
        self.mlflow_run_id: str | None = None  # set by TrackingCallback (all ranks)

    # ------------------------------------------------------------------ building

    @property
    def dp_mesh(self) -> Any:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return None
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    def _root_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in: bf16 on CUDA under FSDP (``model.param_dtype``)."""
        # ``_device_mesh`` rather than ``dp_mesh``: slicing a named mesh builds a new
        # DeviceMesh, and this runs every step.
        if getattr(self, "_device_mesh", None) is None or self._root_device().type != "cuda":
            return torch.float32
        return parse_dtype(self.cfg.model.get("param_dtype", "bfloat16")) or torch.float32

    def configure_model(self) -> None:
        if self.model is not None:  # configure_model may be called again (fit, then validate)
            return
        mesh = self.dp_mesh
        meta = mesh is not None and bool(self.cfg.model.get("meta_init", True))
        with torch.device("meta") if meta else nullcontext():
            model = NextDiT(self.net_config)
            ema = NextDiT(self.net_config)
        if not meta:
            ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)  # train/eval mode is irrelevant: no dropout in Next-DiT
        if self.cfg.model.get("activation_checkpointing", False):
            for block in model.layers:
                checkpoint_block(block)
        if self.cfg.model.get("compile", False):
            for block in model.layers:
                block.compile()
        if mesh is not None:
            param_dtype = self.compute_dtype()
            shard(model, mesh, param_dtype if param_dtype != torch.float32 else None)
            shard(ema, mesh, param_dtype if param_dtype != torch.float32 else None)
        self.model, self.ema = model, ema
        self._needs_init = meta
        self.built_on_meta = meta
        self.frozen = self._build_frozen()

    def _build_frozen(self) -> FrozenEncoders:
        rank = self._trainer.global_rank if self._trainer is not None else 0
        vocab_dir = Path(self.cfg.run_dir) / "encoders" / f"tiny_vocab_rank{rank}"
        with torch.device("cpu"):
            frozen = build_encoders(self.cfg, self.net_config.caption_dim, vocab_dir)
        if frozen.vae.latent_channels != self.net_config.in_channels:
            raise ValueError(
                f"VAE has {frozen.vae.latent_channels} latent channels, the model expects "
                f"{self.net_config.in_channels}"
            )
        return frozen.to(self._root_device())

    def on_fit_start(self) -> None:
        # After Lightning materialised the meta model (to_empty + reset_parameters), before a
        # checkpoint restore: the one place where re-initialising cannot clobber trained
        # weights. Guarded so a second fit() on the same module does not re-initialise.
        if self.frozen is not None:
            self.frozen.to(self.device)
        if self._needs_init:
            init_sharded(self.model)
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    _local(e).copy_(_local(p))
            self._needs_init = False

    # ------------------------------------------------------------------ training

    def encode(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """pixels -> latents [B, V, C, h, w] float32; prompts -> text features and mask."""
        assert self.frozen is not None
        with torch.no_grad():
            latents = self.frozen.vae.encode(batch["pixels"])
            text, text_mask = self.frozen.text(list(batch["prompts"]))
        return latents, text, text_mask

    def denoiser(self, net: nn.Module):
        """The model as ``flow``'s denoiser, inputs cast to the compute dtype (t stays fp32)."""
        dtype = self.compute_dtype()

        def call(x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
            return net(x.to(dtype), t, text.to(dtype), text_mask)

        return call

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents, text, text_mask = self.encode(batch)
        cond_mask = batch["cond_mask"].to(latents.device).bool()
        accum = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro_step = self.global_step * accum + self._micro
        if accum > 1 and hasattr(self.model, "set_requires_gradient_sync"):
            # FSDP2: reduce-scatter gradients on the last micro-batch of a step only.
            self.model.set_requires_gradient_sync(self._micro == accum - 1)
        self._micro += 1
        gen = torch.Generator(device=latents.device)
        gen.manual_seed(_mix_seed(int(self.cfg.seed), self.global_rank, micro_step))
        lcfg = self.cfg.loss
        out = flow_matching_loss(
            self.denoiser(self.model),
            latents,
            text,
            text_mask,
            view_mask=~cond_mask,
            cond_mask=cond_mask,
            shift=float(lcfg.shift),
            logit_mean=float(lcfg.logit_mean),
            logit_std=float(lcfg.logit_std),
            generator=gen,
        )
        has = (out.n_views > 0).to(out.loss.dtype)
        loss = (out.loss * has).sum() / has.sum().clamp(min=1.0)
        self._accumulate_tasks(batch["tasks"], out.loss.detach() * has, has)
        skips.add(self._skips, batch)
        b, v, _, h, w = latents.shape
        seq = image_tokens(self.net_config, v, h, w)
        self.last_batch_stats = {"samples": b, "tokens": b * seq, "seq": seq}
        if self._trainer is not None and self._trainer.progress_bar_callback is not None:
            # Only for the progress bar: each self.log call costs ~2 ms of Lightning
            # bookkeeping on CPU (ResultCollection moves its metric state every call); the
            # logged metrics go straight to the logger in log_window instead.
            self.log("train/loss_step", loss.detach(), prog_bar=True, logger=False)
        return loss

    def _accumulate_tasks(self, tasks: Sequence[str], loss_sum: Tensor, count: Tensor) -> None:
        ids = [self._task_index.setdefault(str(t), len(self._task_index)) for t in tasks]
        n = len(self._task_index)
        if self._task_acc is None or self._task_acc.shape[0] < n:
            grown = torch.zeros(max(8, 2 * n), 2, device=loss_sum.device)
            if self._task_acc is not None:
                grown[: self._task_acc.shape[0]] = self._task_acc
            self._task_acc = grown
        index = torch.tensor(ids, dtype=torch.long).to(loss_sum.device, non_blocking=True)
        self._task_acc.index_add_(0, index, torch.stack([loss_sum.float(), count.float()], 1))

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        """Clip by global norm ourselves: works on FSDP2's DTensor gradients (the norm is a
        DTensor; ``full_tensor()`` gives the global value), and records it for logging."""
        grads = [p for p in self._params()[0] if p.grad is not None]
        if not grads:
            return
        max_norm = float(self.cfg.optim.get("grad_clip") or 0.0)
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self._grad_norm = norm.detach()

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._micro = 0
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema = decay * ema + (1 - decay) * model`` on the local shards (same sharding)."""
        if not self.cfg.ema.get("enabled", True):
            return
        decay = float(self.cfg.ema.decay)
        warmup = int(self.cfg.ema.get("warmup_steps", 0) or 0)
        if warmup > 0:  # step = optimizer steps done, including this one
            step = self.global_step + 1
            decay = min(decay, (1 + step) / (warmup + step))
        _, src, dst = self._params()
        torch._foreach_lerp_(dst, src, 1.0 - decay)

    def _params(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(model params, their local shards, the EMA's local shards), cached: walking
        ``parameters()`` three times a step costs milliseconds on a small model. Built after
        materialisation (which replaces the parameters); FSDP2 keeps the sharded parameters
        and their local tensors for the life of the module, and restores copy into them."""
        first = next(iter(self.model.parameters()))
        cache = self._param_cache
        if (
            cache is None
            or cache[0][0] is not first
            or cache[1][0].data_ptr() != _local(first).data_ptr()  # e.g. moved by .to()
        ):
            params = list(self.model.parameters())
            src = [_local(p).detach() for p in params]
            dst = [_local(p) for p in self.ema.parameters()]
            if [t.shape for t in src] != [t.shape for t in dst]:
                raise RuntimeError("model and EMA shards do not line up")
            self._param_cache = (params, src, dst)
        return self._param_cache

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move the batch's tensors only: Lightning's generic walk visits every string of
        the prompt/key lists, a measurable cost per step for nothing."""
        if isinstance(batch, dict):
            return {
                k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()
            }
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = int(self.cfg.trainer.get("log_every_n_steps", 10))
        step = self.global_step
        if self._micro != 0 or step == 0 or step % every or self._trainer is None:
            return
        self.log_window(step)

    def log_window(self, step: int) -> None:
        """Per-task mean loss over the window since the last log, across ranks, the grad
        norm / lr of the last step and the data skipped over the run (summed over ranks);
        written straight to the logger and printed as one progress line (rank 0). Stops the
        fit (every rank alike) when a subset's skip rate passes ``data.max_skip_rate``."""
        local: dict[str, list[float]] = {}
        if self._task_acc is not None:
            acc = self._task_acc.tolist()
            for name, i in self._task_index.items():
                if acc[i][1] > 0:
                    local[name] = acc[i]
            self._task_acc.zero_()
        payload = {"tasks": local, "skips": self._skips}
        self._skips = skips.empty()
        gathered = [payload]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, payload)
        skips.merge(self.data_totals, *[(part or {}).get("skips") for part in gathered])
        total: dict[str, list[float]] = {}
        for part in gathered:
            for name, (s, c) in ((part or {}).get("tasks") or {}).items():
                agg = total.setdefault(name, [0.0, 0.0])
                agg[0] += s
                agg[1] += c
        metrics: dict[str, float] = {}
        all_sum = sum(s for s, _ in total.values())
        all_count = sum(c for _, c in total.values())
        if all_count:
            metrics["train/loss"] = all_sum / all_count
        for name, (s, c) in total.items():
            metrics[f"train/loss/{name}"] = s / c
            metrics[f"train/samples/{name}"] = c
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = float(self._grad_norm)
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            metrics["train/lr"] = float(opt.param_groups[0]["lr"])
        metrics.update(skips.metrics(self.data_totals))
        self.last_logged = metrics
        if self.trainer.is_global_zero and self.trainer.logger is not None and metrics:
            self.trainer.logger.log_metrics(metrics, step=step)
        if self.trainer.is_global_zero and self.trainer.progress_bar_callback is None:
            print(self.progress_line(step, metrics), flush=True)
        dcfg = self.cfg.get("data") or {}
        skips.check(
            self.data_totals,
            float(dcfg.get("max_skip_rate", skips.MAX_SKIP_RATE)),
            int(dcfg.get("skip_rate_min_samples", skips.SKIP_RATE_MIN_SAMPLES)),
        )

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """``step 20/40 | loss 0.5123 | 12.3 samples/s | skipped 3 (0.4%: t2i.decode 3)``."""
        parts = [f"step {step}/{int(self.cfg.trainer.max_steps)}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "perf/samples_per_s" in self.last_perf:
            parts.append(f"{self.last_perf['perf/samples_per_s']:.1f} samples/s")
        skipped = skips.summary(self.data_totals)
        if skipped:
            world = self.trainer.world_size
            parts.append(skipped + (f" over {world} ranks" if world > 1 else ""))
        return " | ".join(parts)

    def configure_optimizers(self) -> Any:
        ocfg = self.cfg.optim
        wd = float(ocfg.get("weight_decay", 0.0))
        decay, no_decay = [], []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 and ocfg.get("no_decay_1d", True) else decay).append(p)
        groups = [{"params": decay, "weight_decay": wd}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(
            groups,
            lr=float(ocfg.lr),
            betas=tuple(float(b) for b in ocfg.betas),
            eps=float(ocfg.eps),
            foreach=bool(ocfg.get("foreach", True)),
        )
        total = int(self.cfg.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(
                int(ocfg.warmup_steps),
                str(ocfg.schedule),
                total,
                float(ocfg.get("min_lr_ratio", 0.0)),
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings only, so the metadata loads with weights_only=True.
        checkpoint["onegen"] = {
            "config": OmegaConf.to_yaml(self.cfg),
            "mlflow_run_id": self.mlflow_run_id or "",
            "model_config": self.net_config.name,
            # Summed over ranks up to the last log window, plus this (the saving) rank's
            # window in progress: Lightning saves in the checkpoint callback's
            # on_train_batch_end, before the module's, which closes the window. Other
            # ranks' part of that window is not in the checkpoint (one window, FSDP only).
            "data_skips": skips.merge(skips.merge(skips.empty(), self.data_totals), self._skips),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("onegen") or {}).get("data_skips")
        if saved:
            self.data_totals = skips.merge(skips.empty(), saved)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        views: int = 1,
        size: tuple[int, int] = (64, 64),
        cond_pixels: Tensor | None = None,
        cond_mask: Tensor | None = None,
        use_ema: bool = True,
        seed: int = 0,
    ) -> Tensor:
        """Sample pixels [B, V, 3, H, W] in [-1, 1] with the EMA (or live) weights.

        Under FSDP every rank must call this with the same number of prompts-free forward
        calls (the sampler does ``steps`` forwards), because each forward all-gathers.
        """
        scfg = self.cfg.samples
        net = self.ema if use_ema else self.model
        return generate(
            self.denoiser(net),
            self.frozen,
            prompts,
            views=views,
            size=size,
            cond_pixels=cond_pixels,
            cond_mask=cond_mask,
            steps=int(scfg.steps),
            guidance=float(scfg.get("guidance", 1.0)),
            shift=float(scfg.get("shift", self.cfg.loss.shift)),
            seed=seed,
            device=self.device,
        )


@torch.no_grad()
def generate(
    denoiser: Any,
    frozen: FrozenEncoders,
    prompts: Sequence[str],
    *,
    views: int,
    size: tuple[int, int],
    cond_pixels: Tensor | None,
    cond_mask: Tensor | None,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
    device: torch.device,
) -> Tensor:
    """Encode prompts and condition views, Euler-sample the targets, decode every view."""
    b = len(prompts)
    if cond_pixels is not None:
        views, size = cond_pixels.shape[1], tuple(cond_pixels.shape[-2:])
    down = frozen.vae.downsample
    h, w = size[0] // down, size[1] // down
    text, text_mask = frozen.text(list(prompts))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(b, views, frozen.vae.latent_channels, h, w, generator=gen).to(device)
    kwargs: dict[str, Any] = {}
    if cond_pixels is not None and cond_mask is not None and bool(cond_mask.any()):
        kwargs["cond_latents"] = frozen.vae.encode(cond_pixels.to(device))
        kwargs["cond_mask"] = cond_mask.to(device).bool()
    if guidance != 1.0:
        kwargs["uncond_text"], kwargs["uncond_text_mask"] = frozen.text([""] * b)
    latents = sample(
        denoiser,
        noise,
        text,
        text_mask,
        steps=steps,
        shift=shift,
        guidance_scale=guidance,
        **kwargs,
    )
    return frozen.vae.decode(latents).clamp(-1, 1)
