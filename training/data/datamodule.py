"""Training data: One-Gen shards -> mixed, bucketed, multi-view batches.

Batch contract (what the LightningModule gets, every batch one shape)::

    {"pixels":    FloatTensor [B, V, 3, H, W] in [-1, 1]
     "rays":      FloatTensor [B, V, C, h, w]  multiview batches only: each image view's
                                       Plücker rays at the latent grid (datagen.cameras); the
                                       model's views alternate image and ray (2V views)
     "cond_mask": BoolTensor  [B, V]   True = condition view (held clean, no loss); [B, 2V]
                                       over the alternating views of a multiview batch
     "prompts":   list[str] (B)        task token [+ colour tags / [[imgX]] markers] + caption
     "tasks":     list[str] (B)        e.g. "text2image", "canny2image", "image2canny"
     "subsets":   list[str] (B)
     "keys":      list[str] (B)
     "skipped":   int                  samples dropped while building this batch
     "skip_reasons": dict[str, int]    the same by reason (SKIP_REASONS): unreadable (read or
                                       tar error), truncated (shard cut short), schema
                                       (fields / metadata fail the schema), decode (image bytes)
     "skip_last": str                  "reason: message" of the batch's last skip, or ""
     "batch_index": int}               the rank's batch number k

Determinism and resume: batch ``k`` of rank ``r`` is a pure function of
``(seed, r, k)`` and the data (see :mod:`training.data.index`). Worker ``w`` of
``W`` builds batches ``start + w, start + w + W, ...`` and torch's DataLoader
yields workers round-robin, so the loader's i-th batch is batch ``start + i``
whatever ``W`` is. ``start = global_step * batches_per_step``: a loader built
after a resume yields exactly what the uninterrupted run yields from there.
Every rank streams forever (the trainer stops at ``max_steps``), so ranks
always have the same number of batches.

Per batch: one subset (by the mixing weights), ``reads_per_batch`` windows of
consecutive samples each read with one byte-range request, a shuffle, then
per sample a task (uniform over the sample's tasks; map tasks reversed with
``reverse_prob``) and caption dropout. The bucket is the one nearest the
aspect ratio of the batch's first sample (or drawn, ``bucket_mode=random``);
every view of a sample gets the same cover-and-center-crop geometry. Samples
that cannot be read, fail ``validate_sample`` or do not decode are skipped,
counted in ``skipped`` / ``skip_reasons``, and replaced by further reads, so batches are
always full; a batch that skips more than ``max_skipped_per_batch`` raises. The trainer sums
the counts over ranks, logs them and stops past ``max_skip_rate`` (``training.module``).

Modules: this one (the LightningDataModule: paths, mixing, where the stream starts, loaders,
checkpoint state), :mod:`training.data.stream` (the per-rank batch stream and its skips),
:mod:`training.data.layouts` (a sample's views and prompt, per sample kind),
:mod:`training.data.views` (decoding, crop plans, ray views), :mod:`training.data.config`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datagen.schema import SUBSETS
from datagen.shards.layout import MANIFEST
from datagen.shards.reader import ShardReader
from training.data import tasks as T
from training.data.config import DataConfig
from training.data.holdout import split_holdout
from training.data.index import SubsetIndex, build_subset_index, mix_weights
from training.data.layouts import LAYOUTS
from training.data.stream import OneGenStream

__all__ = ["DataConfig", "OneGenDataModule", "OneGenStream", "resolve_paths"]


def resolve_paths(paths: Any) -> dict[str, list[str]]:
    """``{subset: [roots]}`` from the config's ``paths``."""
    if isinstance(paths, str):
        paths = [paths]
    if isinstance(paths, Mapping):
        out = {}
        for subset, roots in paths.items():
            out[str(subset)] = [roots] if isinstance(roots, str) else [str(r) for r in roots]
        return out
    out: dict[str, list[str]] = {}
    for root in paths:
        found = ShardReader(str(root)).subsets(with_manifest=True)
        if not found:
            raise FileNotFoundError(f"{root}: no subset folder with a {MANIFEST}")
        for s in found:
            out.setdefault(s, []).append(str(root))
    return out


class OneGenDataModule(LightningDataModule):
    """Streams One-Gen shards of several subsets as mixed, bucketed batches.

    ``start_step``: the optimizer step to resume at (when attached to a
    trainer whose ``global_step`` is > 0, that wins). The stream starts at
    batch ``start_step * batches_per_step``.
    """

    def __init__(self, config: Any = None, start_step: int = 0, **overrides: Any):
        super().__init__()
        self.cfg = DataConfig.from_any(config, **overrides)
        self.start_step = int(start_step)
        self.indexes: dict[str, SubsetIndex] | None = None
        self.probs: dict[str, float] | None = None
        # data.holdout's part of each subset: never in the training stream (evaluation reads it)
        self.held_out: dict[str, SubsetIndex] = {}

    # -- setup --

    def setup(self, stage: str | None = None) -> None:
        if self.indexes is not None:
            return
        paths = resolve_paths(self.cfg.paths)
        unknown = sorted(set(paths) - set(SUBSETS))
        if unknown:
            raise ValueError(f"unknown subsets {unknown}; the schema knows {sorted(SUBSETS)}")
        probs = mix_weights(list(paths), self.cfg.mix)
        wanted = [s for s, p in probs.items() if p > 0]
        missing = [s for s in wanted if SUBSETS[s].kind not in LAYOUTS]
        if missing:
            raise NotImplementedError(f"training on subset(s) {missing} is not implemented")
        if self.cfg.tasks is not None:
            idle = [s for s in wanted if not set(T.subset_task_names(s)) & set(self.cfg.tasks)]
            if idle:
                raise ValueError(
                    f"data.tasks {self.cfg.tasks} leaves subset(s) {idle} nothing to train; "
                    "give them weight 0 in data.mix or allow one of their tasks"
                )
        indexes = {s: build_subset_index(paths[s], s) for s in wanted}
        self.held_out = {}
        if self.cfg.holdout > 0:
            for s, index in list(indexes.items()):
                indexes[s], self.held_out[s] = split_holdout(index, self.cfg.holdout)
                if indexes[s].num_samples == 0:
                    raise ValueError(
                        f"data.holdout {self.cfg.holdout} holds out every one of subset {s!r}'s "
                        f"{index.num_samples} samples: nothing is left to train on"
                    )
        self.indexes = indexes
        self.probs = {s: probs[s] for s in wanted}

    # -- where the stream starts --

    def _attached_trainer(self):
        try:
            return self.trainer
        except (AttributeError, RuntimeError):
            return None

    def rank(self) -> int:
        if self.cfg.rank is not None:
            return int(self.cfg.rank)
        trainer = self._attached_trainer()
        if trainer is not None:
            return int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return int(torch.distributed.get_rank())
        return 0

    def current_step(self) -> int:
        trainer = self._attached_trainer()
        if trainer is not None and int(trainer.global_step) > 0:
            return int(trainer.global_step)
        return self.start_step

    def batches_per_step(self) -> int:
        trainer = self._attached_trainer()
        if trainer is not None:
            return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        return int(self.cfg.batches_per_step)

    def start_batch(self) -> int:
        return self.current_step() * self.batches_per_step()

    # -- loaders --

    def stream(self, start_batch: int | None = None, rank: int | None = None) -> OneGenStream:
        self.setup()
        assert self.indexes is not None and self.probs is not None
        return OneGenStream(
            self.indexes,
            self.probs,
            self.cfg,
            self.rank() if rank is None else rank,
            self.start_batch() if start_batch is None else start_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def loader(self, start_batch: int | None = None, rank: int | None = None) -> DataLoader:
        cfg = self.cfg
        workers = int(cfg.num_workers)
        return DataLoader(
            self.stream(start_batch, rank),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            persistent_workers=bool(cfg.persistent_workers) and workers > 0,
            pin_memory=bool(cfg.pin_memory),
            multiprocessing_context=cfg.multiprocessing_context if workers > 0 else None,
        )

    # -- checkpoint state --

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.current_step(),
            "seed": int(self.cfg.seed),
            "batches_per_step": self.batches_per_step(),
            "batch_size": int(self.cfg.batch_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = int(state_dict.get("step", 0))
        seed = int(state_dict.get("seed", self.cfg.seed))
        if seed != self.cfg.seed:
            warnings.warn(
                f"data seed {self.cfg.seed} differs from the checkpoint's {seed}: using the "
                "checkpoint's so the resumed stream continues the original one",
                stacklevel=2,
            )
            self.cfg.seed = seed
        if int(state_dict.get("batch_size", self.cfg.batch_size)) != self.cfg.batch_size:
            warnings.warn(
                "data.batch_size differs from the checkpoint's: the resumed stream is not the "
                "continuation of the original one",
                stacklevel=2,
            )
