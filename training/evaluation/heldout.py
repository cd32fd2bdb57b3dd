"""Held-out evaluation: the ``data.holdout`` samples of each task, generated with the model
and scored against their own ground truth (``task_metrics``).

The items are a pure function of the held-out keys (ordered by their hash point, so the same
items on every rank, in every run and resume), built exactly as training builds a sample of
that task (the stream's reader and layouts) with the caption always kept. Every rank builds
the whole list and evaluates its share (item i on rank i mod world); under FSDP every rank
must run as many sampler calls as the others (each forward all-gathers), so a rank short of
items repeats one and does not count it. Results are sums and counts per task and metric,
gathered over ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.data import tasks as T
from training.data.config import DataConfig
from training.data.holdout import holdout_point
from training.data.index import SubsetIndex
from training.data.layouts import BatchPlan, layout_of
from training.data.stream import DATA_ERRORS, OneGenStream
from training.data.views import assemble_pixels
from training.evaluation import task_metrics as TM
from training.evaluation.scored import CLIP_TASKS, FACE_TASKS, PHOTO_TASKS, SCORED_TASKS

# task draw, direction (one task allowed: irrelevant), caption dropout and source caption
# draws that keep the VLM caption; the bucket draw (aspect mode: unused) in the middle.
_DRAWS = np.array([0.0, 0.5, 1.0, 1.0])
_BUCKET_U = 0.5


@dataclass
class EvalItem:
    """One held-out sample as one task, ready for the sampler."""

    task: str
    subset: str
    key: str
    prompt: str
    pixels: Tensor  # [1, V, 3, H, W] in [-1, 1], the target first
    cond_mask: Tensor  # [1, V] (or [1, 2V] over img0, ray0, ... with rays)
    rays: Tensor | None = None  # [1, V, C, h, w]


def scored_tasks(
    subsets: Sequence[str], wanted: Sequence[str] | None, scorable: Sequence[str] = SCORED_TASKS
) -> list[str]:
    """The tasks of ``subsets`` that have a metric (in ``scorable``), in ``wanted`` when
    given."""
    out: list[str] = []
    for subset in subsets:
        for task in T.subset_task_names(subset):
            if task in scorable and (wanted is None or task in wanted) and task not in out:
                out.append(task)
    return out


def held_out_items(
    cfg: DataConfig,
    held: Mapping[str, SubsetIndex],
    tasks: Sequence[str] | None,
    per_task: int,
    scorable: Sequence[str] = SCORED_TASKS,
) -> tuple[list[EvalItem], dict[str, int]]:
    """Up to ``per_task`` items of every scored task (in ``scorable``: text2image too with a
    CLIP) the held-out samples carry, and how many held-out samples could not be read or
    built (by reason)."""
    cfg = dataclasses.replace(cfg, caption_dropout=0.0, source_caption_prob=0.0, tasks=None)
    names = [s for s in held if held[s].num_samples]
    if not names:
        return [], {}
    stream = OneGenStream({s: held[s] for s in names}, {s: 1.0 for s in names}, cfg, rank=0)
    items: list[EvalItem] = []
    problems: dict[str, int] = {}
    for subset in names:
        index = held[subset]
        wanted = scored_tasks([subset], tasks, scorable)
        have = dict.fromkeys(wanted, 0)
        order = sorted(range(index.num_samples), key=lambda i: holdout_point(subset, index.key(i)))
        layout = layout_of(subset)
        plan = BatchPlan(stream.buckets, _BUCKET_U)
        for i in order:
            need = [t for t in wanted if have[t] < per_task]
            if not need:
                break
            shard = int(np.searchsorted(index.shard_start, i, side="right")) - 1
            cand = stream.read_window(index, shard, i, i + 1)[0]
            if cand.error is not None:
                problems[cand.reason] = problems.get(cand.reason, 0) + 1
                continue
            for task in need:
                try:
                    built = stream.build_sample(
                        layout, subset, index.key(i), cand.files, _DRAWS, plan, None,
                        layout.num_views, allowed={task},
                    )  # fmt: skip
                except DATA_ERRORS as exc:
                    reason = type(exc).__name__
                    problems[reason] = problems.get(reason, 0) + 1
                    break
                if built is None:
                    continue
                rays = None if built.rays is None else torch.from_numpy(built.rays[None])
                items.append(
                    EvalItem(
                        task=built.task,
                        subset=subset,
                        key=built.key,
                        prompt=built.prompt,
                        pixels=assemble_pixels([built.views], built.bucket),
                        cond_mask=torch.tensor([built.cond_mask], dtype=torch.bool),
                        rays=rays,
                    )
                )
                have[task] += 1
    return items, problems


def views01(pixels: Tensor) -> np.ndarray:
    """[V, 3, H, W] in [-1, 1] -> float [V, H, W, 3] in [0, 1]."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def score_item(item: EvalItem, out: Any, scorers: Any = None) -> dict[str, float]:
    """``out``: what ``OneGenModule.generate`` returned for the item; ``scorers``: the
    optional model-based ones (``training.evaluation.scorers.Scorers``)."""
    clip, lpips, face = (
        (scorers.clip, scorers.lpips, scorers.face) if scorers is not None else (None,) * 3
    )
    truth = views01(item.pixels[0])
    if item.rays is None:
        gen = views01(out[0])
        if item.task in CLIP_TASKS:
            return TM.text_alignment(gen, item.prompt, clip) if clip is not None else {}
        if item.task in FACE_TASKS:
            return TM.identity(gen, truth, face) if face is not None else {}
        scores = TM.PAIR_SCORERS[item.task](gen, truth)
        if lpips is not None and item.task in PHOTO_TASKS:
            scores["lpips"] = lpips.distance(gen[0], truth[0])
        return scores
    if item.task == "camera_pose":
        size = tuple(item.pixels.shape[-2:])
        return TM.camera_accuracy(out.rays[0].float().cpu().numpy(), item.rays[0].numpy(), size)
    image_cond = item.cond_mask[0, 0::2].tolist()
    return TM.novel_views(views01(out.pixels[0]), truth, image_cond, lpips)


Generate = Callable[..., Any]


def run_items(
    generate: Generate,
    items: Sequence[EvalItem],
    rank: int,
    world: int,
    seed: int,
    scorers: Any = None,
) -> dict:
    """This rank's share of ``items`` generated and scored: ``{task: {metric: [sum, count]}}``.
    Every rank makes ``ceil(len(items) / world)`` sampler calls."""
    totals: dict[str, dict[str, list[float]]] = {}
    if not items:
        return totals
    calls = math.ceil(len(items) / world)
    for j in range(calls):
        i = rank + j * world
        real = i < len(items)
        item = items[i if real else rank % len(items)]
        kw: dict[str, Any] = {"cond_pixels": item.pixels, "cond_mask": item.cond_mask}
        if item.rays is not None:
            kw["cond_rays"] = item.rays
        out = generate([item.prompt], seed=seed + (i if real else 0), **kw)
        if not real:
            continue
        task = totals.setdefault(item.task, {})
        for name, value in score_item(item, out, scorers).items():
            acc = task.setdefault(name, [0.0, 0.0])
            acc[0] += float(value)
            acc[1] += 1.0
    return totals


def merge_totals(parts: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Ranks' sums and counts -> ``{task: {metric: mean, "n": samples}}``."""
    merged: dict[str, dict[str, list[float]]] = {}
    for part in parts:
        for task, per in (part or {}).items():
            for name, (s, c) in per.items():
                acc = merged.setdefault(task, {}).setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
    out: dict[str, dict[str, float]] = {}
    for task, per in merged.items():
        out[task] = {name: s / c for name, (s, c) in per.items() if c}
        out[task]["n"] = max(c for _, c in per.values())
    return out


def headline(results: Mapping[str, Mapping[str, float]]) -> str:
    """``canny2image edge_f1 0.412 | image2depth abs_rel 0.321``: each task's first metric."""
    parts = []
    for task, per in results.items():
        first = next((k for k in per if k != "n"), None)
        if first is not None:
            parts.append(f"{task} {first} {per[first]:.3f}")
    return " | ".join(parts)
