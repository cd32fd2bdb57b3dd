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
  (only rank 0's callback state is saved under ``ModelParallelStrategy``). A LoRA fit
  (``training.lora``): the model carries frozen base weights and peft adapters, the EMA
  averages the adapters only, and checkpoints hold adapters and EMA, not the base.
* the frozen VAE and text encoder are held OUTSIDE the module tree (``self.frozen``), so they
  are neither sharded, nor given to the optimizer, nor written to checkpoints: they are
  rebuilt from the config (tiny random ones seeded, or local pretrained folders).

The batch contract (``training.data.datamodule``): ``pixels`` [B, V, 3, H, W] in [-1, 1], ``cond_mask``
[B, V] bool (True = condition view: held clean, no loss), ``prompts``, ``tasks``, ``subsets``,
``keys`` (lists of B strings). Latents and text features are computed online, per step.
Shard batches also carry what the loader skipped (``training.data.skips`` counts, logs and limits it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from common.durations import format_eta
from common.overrides import merge_file
from model import NextDiT
from model.flops import image_tokens
from model.flow import flow_matching_loss
from training import lora
from training.config import model_config, schema
from training.data import skips
from training.data.seeding import mix_seed
from training.data.views import interleave_rays
from training.encoders import FrozenEncoders, build_encoders, parse_dtype
from training.inference.generate import SamplerSettings, generate_any
from training.optim import build_optimizer, clip_grad_norm, ema_decay, ema_update
from training.parallelize import init_sharded, local_tensor, parallelize
from training.run.folders import log_line

# --------------------------------------------------------------------------- module


class OneGenModule(pl.LightningModule):
    def __init__(self, cfg: DictConfig | dict, init_source: Any = None) -> None:
        """``init_source``: a checked ``training.init_from.InitSource`` whose weights the
        model and its EMA start from (a new run; a resume restores its own)."""
        super().__init__()
        # Complete (the schema's defaults under what was given) and plain: it goes into every
        # checkpoint as YAML.
        full = merge_file(schema(), OmegaConf.create(cfg))
        self.cfg = OmegaConf.create(OmegaConf.to_container(full, resolve=True))
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
        self._progress_mark: tuple[int, float] | None = None  # (step, time) of the last line
        self._skips = skips.empty()  # this rank's data skips since the last log window
        self.data_totals = skips.empty()  # summed over ranks and the run (checkpointed)
        self.mlflow_run_id: str | None = None  # set by TrackingCallback (all ranks)
        self.init_source = init_source
        self.lora = lora.enabled(self.cfg)
        # A LoRA fit's base (path, sha256s): in every checkpoint, checked on resume.
        self.lora_base: dict = init_source.record() if self.lora and init_source else {}

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
        if self._root_device().type != "cuda":
            return torch.float32
        if getattr(self, "_device_mesh", None) is None:
            # One GPU: a LoRA fit computes in its base's storage dtype, a full fit in fp32.
            return parse_dtype(self.cfg.lora.base_dtype) if self.lora else torch.float32
        return parse_dtype(self.cfg.model.param_dtype) or torch.float32

    def configure_model(self) -> None:
        if self.model is not None:  # configure_model may be called again (fit, then validate)
            return
        mesh = self.dp_mesh
        meta = mesh is not None and bool(self.cfg.model.meta_init)
        with torch.device("meta") if meta else nullcontext():
            model = NextDiT(self.net_config)
            ema = None if self.lora else NextDiT(self.net_config)
            if self.lora:  # before sharding: a block's frozen and trainable weights together
                lora.add_adapters(model, self.cfg.lora)
        if ema is not None:
            if not meta:
                ema.load_state_dict(model.state_dict())
            ema.requires_grad_(False)  # train/eval mode is irrelevant: no dropout in Next-DiT
        mcfg = self.cfg.model
        param_dtype = self.compute_dtype() if mesh is not None else None
        for net, train in ((model, True), (ema, False)):
            if net is None:
                continue
            parallelize(
                net,
                activation_checkpointing=train and bool(mcfg.activation_checkpointing),
                compile_blocks=train and bool(mcfg.compile),
                mesh=mesh,
                param_dtype=param_dtype,
            )
        self.model = model
        # The adapters' average is built from the sharded adapters: the same placements.
        self.ema = lora.AdapterEMA(model) if self.lora else ema
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
        resuming = self._trainer is not None and bool(self.trainer.ckpt_path)
        if self._needs_init and not self.lora:  # LoRA: the base is loaded, adapters below
            init_sharded(self.model)
            self.copy_to_ema()
        self._needs_init = False
        # LoRA: the base is not in the run's checkpoints; it is loaded on a resume too.
        if (
            self.init_source is not None
            and self._trainer is not None
            and (self.lora or not resuming)
        ):
            self.load_init_weights()
            self.init_source = None  # once: a second fit() on this module continues
            if self.lora and not resuming:
                lora.init_adapters(self.model, int(self.cfg.seed))
                self.copy_to_ema()
        if self.lora and self._trainer is not None and self.trainer.is_global_zero:
            line = lora.summary(self.model, self.cfg.lora)
            print(line, flush=True)
            if self.cfg.run_dir:
                log_line(self.cfg.run_dir, line)

    @torch.no_grad()
    def copy_to_ema(self) -> None:
        for live, avg in self.ema_pairs():
            local_tensor(avg).copy_(local_tensor(live))

    def ema_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(trained parameter, its average)``: every model parameter, or (LoRA) every
        adapter."""
        if self.lora:
            return self.ema.pairs(self.model)
        return list(zip(self.model.parameters(), self.ema.parameters(), strict=True))

    def load_init_weights(self) -> None:
        """``model.init_from``'s weights into the model and its EMA, after the model's own
        init so nothing overwrites them. Sharded: rank 0 reads the full state dict once and
        ``set_model_state_dict`` broadcasts each rank its shards (as torchtitan loads a
        seed checkpoint); the other ranks never hold the full model."""
        from training.init_from import load_init_state

        sharded = self.dp_mesh is not None
        reads = not sharded or self.global_rank == 0
        full = load_init_state(self.init_source, self.net_config) if reads else {}
        if self.lora:  # the base under the adapted model's names (``.base_layer.``)
            names = lora.base_key_map(self.model)
            full = {names[k]: v for k, v in full.items()}
        for net in (self.model,) if self.lora else (self.model, self.ema):
            if not sharded:
                missing, unexpected = net.load_state_dict(full, strict=not self.lora)
                if unexpected or any(not lora.is_adapter(k) for k in missing):
                    raise RuntimeError(f"base weights do not fit: {missing[:3]} {unexpected[:3]}")
                continue
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            options = StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=not self.lora
            )
            # A copy each: the call replaces the dict's tensors by the rank's shards.
            set_model_state_dict(net, dict(full), options=options)
        if self.lora and not sharded and self._root_device().type == "cuda":
            # One GPU: the frozen base stored in lora.base_dtype (bf16 halves it).
            dtype = parse_dtype(self.cfg.lora.base_dtype)
            for p in self.model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)

    # ------------------------------------------------------------------ training

    def encode(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """pixels -> latents [B, V, C, h, w] float32; prompts -> text features and mask. A
        multiview batch's ray views (already on the latent grid) follow their images:
        img0, ray0, img1, ray1, ... (2V views)."""
        assert self.frozen is not None
        with torch.no_grad():
            latents = self.frozen.vae.encode(batch["pixels"])
            if batch.get("rays") is not None:
                latents = interleave_rays(latents, batch["rays"])
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
        gen.manual_seed(mix_seed(int(self.cfg.seed), self.global_rank, micro_step))
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
        norm = clip_grad_norm(self._params()[0], float(self.cfg.optim.grad_clip or 0.0))
        if norm is not None:
            self._grad_norm = norm

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._micro = 0
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema = decay * ema + (1 - decay) * model`` on the local shards (same sharding)."""
        ecfg = self.cfg.ema
        if not ecfg.enabled:
            return
        # step = optimizer steps done, including this one
        decay = ema_decay(float(ecfg.decay), int(ecfg.warmup_steps or 0), self.global_step + 1)
        _, src, dst = self._params()
        ema_update(dst, src, decay)

    def _params(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(model params, their local shards, the EMA's local shards), cached: walking
        ``parameters()`` three times a step costs milliseconds on a small model. Built after
        materialisation (which replaces the parameters); FSDP2 keeps the sharded parameters
        and their local tensors for the life of the module, and restores copy into them."""
        first = next(p for p in self.model.parameters() if p.requires_grad)
        cache = self._param_cache
        if (
            cache is None
            or cache[0][0] is not first
            or cache[1][0].data_ptr() != local_tensor(first).data_ptr()  # e.g. moved by .to()
        ):
            pairs = self.ema_pairs()
            params = [p for p, _ in pairs]
            src = [local_tensor(p).detach() for p in params]
            dst = [local_tensor(a) for _, a in pairs]
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
        every = int(self.cfg.trainer.log_every_n_steps)
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
        if self.trainer.is_global_zero:
            line = self.progress_line(step, metrics)
            if self.trainer.progress_bar_callback is None:
                print(line, flush=True)
            if self.cfg.run_dir:
                log_line(self.cfg.run_dir, line)
        dcfg = self.cfg.data
        skips.check(self.data_totals, float(dcfg.max_skip_rate), int(dcfg.skip_rate_min_samples))

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """``step 20/40 | loss 0.5123 | 12.3 samples/s | ETA 1m23s | skipped 3 (0.4%: ...)``.

        ETA = remaining steps x the seconds per step of the last window, measured here as the
        wall time between two progress lines (so it counts sampling and checkpoints too, and
        does not depend on the throughput window); the first line of a fit (or of a resume)
        falls back on the ThroughputMonitor's ``perf/step_time_s``, else ``ETA --``."""
        max_steps = int(self.cfg.trainer.max_steps)
        parts = [f"step {step}/{max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "perf/samples_per_s" in self.last_perf:
            parts.append(f"{self.last_perf['perf/samples_per_s']:.1f} samples/s")
        now = time.perf_counter()
        mark = self._progress_mark
        per_step = self.last_perf.get("perf/step_time_s")
        if mark is not None and step > mark[0]:
            per_step = (now - mark[1]) / (step - mark[0])
        self._progress_mark = (step, now)
        if max_steps > 0 and step >= max_steps:
            parts.append("ETA 0s")
        elif max_steps > 0 and per_step is not None:
            parts.append(f"ETA {format_eta((max_steps - step) * per_step)}")
        else:
            parts.append("ETA --")
        skipped = skips.summary(self.data_totals)
        world = self._trainer.world_size if self._trainer is not None else 1
        parts.append((skipped or "skipped 0") + (f" over {world} ranks" if world > 1 else ""))
        return " | ".join(parts)

    def configure_optimizers(self) -> Any:
        return build_optimizer(self.model, self.cfg.optim, int(self.cfg.trainer.max_steps))

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings only, so the metadata loads with weights_only=True.
        checkpoint["onegen"] = {
            "config": OmegaConf.to_yaml(self.cfg),
            "mlflow_run_id": self.mlflow_run_id or "",
            "model_config": self.net_config.name,
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
            # Summed over ranks up to the last log window, plus this (the saving) rank's
            # window in progress: Lightning saves in the checkpoint callback's
            # on_train_batch_end, before the module's, which closes the window. Other
            # ranks' part of that window is not in the checkpoint (one window, FSDP only).
            "data_skips": skips.merge(skips.merge(skips.empty(), self.data_totals), self._skips),
            "lora_base": self.lora_base,
        }
        if self.lora:  # adapters, their EMA and the training state; the base is named above
            keep = self.checkpoint_keys()
            state = checkpoint.get("state_dict") or {}
            for name in [k for k in state if k not in keep]:
                del state[name]

    def checkpoint_keys(self) -> set[str] | None:
        """The state-dict keys a checkpoint holds: all (None), or for LoRA the adapters and
        their EMA (``training.checkpoint_io`` restores those and checks nothing is missing)."""
        if not self.lora:
            return None
        return {k for k in self.state_dict() if k.startswith("ema.") or lora.is_adapter(k)}

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
        cond_rays: Tensor | None = None,
        use_ema: bool = True,
        seed: int = 0,
        settings: SamplerSettings | None = None,
    ) -> Any:
        """Sample pixels [B, V, 3, H, W] in [-1, 1] with the EMA (or live) weights, by
        ``settings`` (default: the ``samples`` section's steps and guidance).

        With ``cond_rays`` [B, V, C, h, w] (a multiview batch: ``cond_pixels`` its V images,
        ``cond_mask`` [B, 2V] over img0, ray0, img1, ...) the result is a
        ``training.inference.generate.MultiviewSample``: the decoded images and the final ray
        views. Under FSDP every rank must call this with the same number of prompts-free
        forward calls (the sampler does ``steps`` forwards), because each forward all-gathers.
        """
        net = self.ema if use_ema and not self.lora else self.model
        # LoRA: the averaged adapters in the model while it samples (no second base).
        averaged = lora.swapped(self.ema_pairs()) if use_ema and self.lora else nullcontext()
        with averaged:
            if settings is None:
                settings = SamplerSettings.from_config(self.cfg, seed=seed)
            else:
                settings = dataclasses.replace(settings, seed=seed)
            return generate_any(
                self.denoiser(net),
                self.frozen,
                prompts,
                settings,
                device=self.device,
                views=views,
                size=size,
                cond_pixels=cond_pixels,
                cond_mask=cond_mask,
                cond_rays=cond_rays,
            )
