"""Deterministic synthetic batches of the training batch contract (tests, benchmarks, smoke
runs without shards): batch k of rank r is a pure function of (seed, r, k)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from model.encoders import TINY_WORDS
from training.data.seeding import mix_seed


def synthetic_batch(
    seed: int,
    rank: int,
    index: int,
    *,
    batch_size: int,
    resolution: int,
    max_views: int,
    tasks: list[str],
    multiview_fraction: float = 0.5,
) -> dict:
    """Batch ``index`` of rank ``rank``: a pure function of its arguments (CPU, float32).

    Smooth random images (4x4 noise, bilinear up), one shape per batch: either 1 view of
    ``text2image`` samples, or ``max_views`` views where views 1.. are conditions.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, 7, rank, index))
    i2i = [t for t in tasks if t != "text2image"]
    use_multi = (
        bool(i2i)
        and max_views > 1
        and ("text2image" not in tasks or float(torch.rand((), generator=g)) < multiview_fraction)
    )
    views = max_views if use_multi else 1
    low = torch.rand(batch_size, views, 3, 4, 4, generator=g) * 2 - 1
    pixels = torch.nn.functional.interpolate(
        low.flatten(0, 1), size=(resolution, resolution), mode="bilinear", align_corners=False
    ).unflatten(0, (batch_size, views))
    cond = torch.zeros(batch_size, views, dtype=torch.bool)
    if use_multi:
        cond[:, 1:] = True
        picks = torch.randint(len(i2i), (batch_size,), generator=g).tolist()
        names = [i2i[i] for i in picks]
    else:
        names = ["text2image"] * batch_size
    words = torch.randint(len(TINY_WORDS), (batch_size, 2), generator=g).tolist()
    prompts = [
        f"[[{t}]] a photo of a {TINY_WORDS[a]} {TINY_WORDS[b]}"
        for t, (a, b) in zip(names, words, strict=True)
    ]
    keys = [f"r{rank}-b{index:08d}-{i}" for i in range(batch_size)]
    return {
        "pixels": pixels.contiguous(),
        "cond_mask": cond,
        "prompts": prompts,
        "tasks": names,
        "subsets": ["synthetic"] * batch_size,
        "keys": keys,
    }


class SyntheticBatches(IterableDataset):
    """Endless deterministic batches from ``start``; see ``synthetic_batch``."""

    def __init__(self, seed: int, rank: int, start: int, **kwargs: Any) -> None:
        self.seed, self.rank, self.start, self.kwargs = seed, rank, start, kwargs

    def __iter__(self):
        index = self.start
        while True:
            yield synthetic_batch(self.seed, self.rank, index, **self.kwargs)
            index += 1


class SyntheticDataModule(pl.LightningDataModule):
    """Deterministic stand-in for ``OneGenDataModule`` (tests, benchmarks, smoke runs).

    Position = ``trainer.global_step * accumulate_grad_batches`` micro-batches, read when the
    loader is built, i.e. after Lightning restored the loops from a checkpoint."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.start_step = 0

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        if trainer is not None:
            self.start_step = trainer.global_step * trainer.accumulate_grad_batches
        d = self.cfg.data.synthetic
        ds = SyntheticBatches(
            int(self.cfg.seed),
            rank,
            self.start_step,
            batch_size=int(self.cfg.data.batch_size),
            resolution=int(d.resolution),
            max_views=int(d.max_views),
            tasks=[str(t) for t in d.tasks],
            multiview_fraction=float(d.multiview_fraction),
        )
        return DataLoader(ds, batch_size=None, num_workers=0)
