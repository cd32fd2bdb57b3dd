"""``onegen eval``: a checkpoint or a released / exported folder on one of the paper's
benchmarks, with the same sampler as ``onegen sample`` and the metrics of
``training.evaluation.metrics``.

    onegen eval --weights /models/OneDiffusion --benchmark nyuv2 --path /data/nyuv2 --out eval/nyu
    onegen eval --checkpoint runs/onegen-demo/<run> --benchmark onegen --path data/demo --out eval/demo

A benchmark is a list of :class:`Case` (one generation each: its inputs and its scorer),
read and checked before any weights are loaded: ``depth_benchmarks`` (nyuv2, diode),
``scene_benchmarks`` (gso-nvs, gso-pose, co3d-pose), ``id_benchmark`` (unsplash50-id),
``t2i_benchmark`` (t2i) and the fit's own held-out samples (onegen). Model-based scores
(``--clip``, ``--lpips``, ``--face``) load from local folders (``scorers``). Each case's
scores go to ``<out>/samples/<id>.json`` as soon as it is done, so a killed eval reruns only what is
missing; ``--devices N`` runs N processes on disjoint shares of the missing cases (case i on
process i mod N). At the end ``metrics.json`` (the means, the sample count, the settings),
``report.md`` (ours beside the paper's published figure where there is one) and
``grid.png`` (the first cases: condition, generated, target) are written from every case's
file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.evaluation.cases import Bench, Case
from training.evaluation.errors import BenchmarkError

BENCHMARKS = (
    "nyuv2",
    "diode",
    "gso-nvs",
    "gso-pose",
    "co3d-pose",
    "unsplash50-id",
    "t2i",
    "onegen",
)
GRID_CASES = 4
SAMPLES = "samples"


@dataclass(frozen=True)
class EvalRequest:
    benchmark: str
    path: str
    out: str
    num: int | None = None  # the first N cases (None: all)
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    size: int | None = None  # the long side to generate at (None: the config's samples.resolution)
    split: str | None = None
    tasks: tuple[str, ...] | None = None  # onegen: these tasks only
    device: str = "auto"
    devices: int = 1
    shard: tuple[int, int] = (0, 1)  # (index, count): this process's share
    # model-based scorers' local folders (which benchmark reads which: SCORER_BENCHMARKS)
    clip: str | None = None  # a CLIP (CLIP score, CLIP-T, FD-CLIP's features)
    reference: str | None = None  # reference images for FD-CLIP
    lpips: str | None = None  # LPIPS weights
    face: str | None = None  # ArcFace + face detector weights


def case_file(out: Path, case_id: str) -> Path:
    """``<out>/samples/<id>.json``, the id made a safe file name (and kept unique)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("_")[:120]
    digest = hashlib.blake2b(case_id.encode(), digest_size=4).hexdigest()
    return out / SAMPLES / f"{safe}-{digest}.json"


def _write_json(path: Path, payload: Any) -> None:
    from training.run.folders import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- benchmarks


def _disparity(out: Any) -> np.ndarray:
    """The generated target view [H, W] in [0, 1] (channels averaged, near = bright)."""
    return ((out[0, 0].float().cpu().clamp(-1, 1) + 1) / 2).mean(0).numpy()


def depth_bench(req: EvalRequest, multiple: int, side: int) -> Bench:
    from training.data.views import to_unit
    from training.evaluation import depth_benchmarks as D

    spec = D.NYUV2 if req.benchmark == "nyuv2" else D.DIODE
    samples = D.read_split(Path(req.path), spec, req.split)
    D.check_first(spec, samples)
    frame = D.model_frame(spec.frame, side, multiple)

    def case(s: D.DepthSample) -> Case:
        def inputs() -> dict[str, Any]:
            import cv2

            rgb = D.read_rgb(s.rgb, spec.frame)
            img = torch.from_numpy(
                to_unit(cv2.resize(rgb, frame[::-1], interpolation=cv2.INTER_AREA))
            )
            return {
                "cond_pixels": torch.stack([torch.zeros_like(img), img])[None],
                "cond_mask": torch.tensor([[False, True]]),
            }

        return Case(s.id, "image2depth", "[[depth2image]]", inputs,
                    lambda out, _: D.score_depth(spec, _disparity(out), s), has_target=False)  # fmt: skip

    return Bench(spec.name, [case(s) for s in samples], dict(spec.paper),
                 "OneDiffusion (arXiv 2411.16318) Table 4")  # fmt: skip


def onegen_bench(req: EvalRequest, cfg: Any, side: int, scorers: Any) -> Bench:
    """Held-out samples of a datagen output: the checkpoint's ``data.holdout`` keys when its
    fit held some out (never trained on), every sample otherwise (a released model never saw
    them), each as every scored task it carries."""
    from training.data.config import DataConfig
    from training.data.datamodule import resolve_paths
    from training.data.holdout import split_holdout
    from training.data.index import build_subset_index
    from training.evaluation.heldout import held_out_items, score_item
    from training.evaluation.scored import scorable_tasks

    try:
        paths = resolve_paths(req.path)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchmarkError(f"--path {req.path}: {exc}") from None
    fraction = (
        float(cfg.data.get("holdout", 0.0) or 0.0) if cfg.data.get("kind") == "onegen" else 0.0
    )
    data = DataConfig(paths=req.path, buckets=[[side, side]], faceid_max_views=int(cfg.data.faceid_max_views),
                      multiview_max_views=int(cfg.data.multiview_max_views))  # fmt: skip
    held = {}
    for subset, roots in paths.items():
        index = build_subset_index(roots, subset)
        held[subset] = split_holdout(index, fraction)[1] if fraction > 0 else index
    per_task = req.num or 8
    scorable = scorable_tasks(scorers.clip, scorers.face)
    wanted = list(req.tasks) if req.tasks else None
    items, _ = held_out_items(data, held, wanted, per_task, scorable)
    if not items:
        raise BenchmarkError(
            f"--path {req.path}: no held-out sample of a scored task "
            f"(data.holdout {fraction} of the checkpoint's fit)"
        )

    def case(item: Any) -> Case:
        kw = {"cond_pixels": item.pixels, "cond_mask": item.cond_mask}
        if item.rays is not None:
            kw["cond_rays"] = item.rays
        return Case(f"{item.task}/{item.subset}/{item.key}", item.task, item.prompt,
                    lambda: kw, lambda out, _: score_item(item, out, scorers))  # fmt: skip

    return Bench("onegen", [case(i) for i in items])


# --------------------------------------------------------------------------- the run


def _sampler(net: Any, frozen: Any, settings: Any, device: str) -> Callable[..., Any]:
    from training.inference.generate import generate_any

    def run(prompt: str, seed: int, kw: dict[str, Any]) -> Any:
        pixels = kw.get("cond_pixels")  # None: text2image, its size in kw
        shape = (
            {} if pixels is None else {"views": pixels.shape[1], "size": tuple(pixels.shape[-2:])}
        )
        return generate_any(
            lambda x, t, txt, m: net(x, t, txt, m), frozen, [prompt],
            dataclasses.replace(settings, seed=seed), device=torch.device(device), **shape, **kw,
        )  # fmt: skip

    return run


def source_config(source: Any) -> tuple[Any, Any, tuple[int, int]]:
    """``(cfg, model config, patch grid in pixels)`` of a checkpoint (its metadata only) or a
    released folder (its config.json), no tensor read."""
    from training.inference.sample import fit_config, net_config, patch_grid

    if not isinstance(source, (str, Path)):
        return source.read("text2image")  # a folder: the release trained every task
    cfg = fit_config(source)
    mcfg = net_config(cfg, source)
    return cfg, mcfg, patch_grid(cfg, mcfg)


def check_tasks(source: Any, cfg: Any, tasks: Sequence[str]) -> None:
    """A checkpoint's fit trained every task the benchmark samples (one line if not)."""
    from training.inference.sample import check_trained

    if isinstance(source, (str, Path)):
        for task in tasks:
            check_trained(task, cfg, source)


def scene_bench(req: EvalRequest, cfg: Any, mcfg: Any, side: int, lpips: Any) -> Bench:
    """gso-nvs, gso-pose and co3d-pose (``scene_benchmarks``); ``--num``: the first N objects
    (GSO) or sequences (CO3D)."""
    from training.encoders import vae_stride
    from training.evaluation import scene_benchmarks as S

    geo = S.RayGeometry(vae_stride(cfg), int(mcfg.in_channels))
    if req.benchmark == "co3d-pose":
        items = S.co3d_sequences(Path(req.path))[: req.num]
        return Bench("co3d-pose", S.pose_cases(items, side, geo, pick=False))
    objects = S.gso_objects(Path(req.path))[: req.num]
    if req.benchmark == "gso-pose":
        return Bench("gso-pose", S.pose_cases(objects, side, geo, pick=True),
                     dict(S.GSO_POSE_PAPER), "OneDiffusion (arXiv 2411.16318) Table 5")  # fmt: skip
    max_images = int(cfg.data.get("multiview_max_views", 4))
    return Bench("gso-nvs", S.nvs_cases(objects, side, max_images, geo, lpips), dict(S.GSO_NVS_PAPER),
                 "OneDiffusion (arXiv 2411.16318) Table 2 (PSNR)")  # fmt: skip


# The side a benchmark's protocol scores at when --size is not given (else samples.resolution).
PROTOCOL_SIZE = {"gso-nvs": 256, "gso-pose": 256, "co3d-pose": 256}


def bench_side(req: EvalRequest, cfg: Any) -> int:
    return int(req.size or PROTOCOL_SIZE.get(req.benchmark) or cfg.samples.resolution)


def t2i_bench(req: EvalRequest, side: int, clip: Any) -> Bench:
    """Prompts of ``--path``; ``--num``: the first N."""
    from training.evaluation import t2i_benchmark as T

    records = T.read_prompts(Path(req.path))[: req.num]
    if req.reference is not None and not Path(req.reference).is_dir():
        raise BenchmarkError(f"--reference {req.reference}: not a folder of images")
    out = Path(req.out)
    bench = Bench("t2i", T.t2i_cases(records, side, out, clip),
                  paper_source="GenEval overall 0.65 in OneDiffusion (arXiv 2411.16318) Table 1; "
                  f"score {out / T.IMAGES} with GenEval's evaluate_images.py")  # fmt: skip
    if clip is not None and req.reference is not None:
        bench.finish = lambda: T.fd_clip(clip, Path(req.reference), out, len(records))
    return bench


# Which benchmarks read each scorer option.
SCORER_BENCHMARKS = {
    "--clip": ("t2i", "unsplash50-id", "onegen"),
    "--face": ("unsplash50-id", "onegen"),
    "--reference": ("t2i",),
    "--lpips": ("gso-nvs", "onegen"),
}


def id_bench(req: EvalRequest, side: int, clip: Any, face: Any) -> Bench:
    """Every subject x every prompt; ``--num``: the first N subjects."""
    from training.evaluation import id_benchmark as I

    photos, prompts = I.read_subjects(Path(req.path))
    cases = I.id_cases(photos[: req.num], prompts, side, face, clip)
    return Bench("unsplash50-id", cases, dict(I.PAPER), "OneDiffusion (arXiv 2411.16318) Table 3")


def scorer_folders(req: EvalRequest) -> dict[str, tuple[str | None, str]]:
    return {k: (getattr(req, k), f"--{k}") for k in ("clip", "lpips", "face")}


def check_scorer_options(req: EvalRequest) -> None:
    """Each scorer option given to a benchmark that reads it; its folder's files present."""
    from training.config import ConfigError
    from training.evaluation.scorer_folders import scorer_folders_problem
    from training.inference.sample import SampleUsageError

    given = {"--clip": req.clip, "--reference": req.reference, "--lpips": req.lpips,
             "--face": req.face}  # fmt: skip
    for flag, value in given.items():
        if value is not None and req.benchmark not in SCORER_BENCHMARKS[flag]:
            raise SampleUsageError(
                f"{flag} is for --benchmark {' / '.join(SCORER_BENCHMARKS[flag])}"
            )
    if req.reference is not None and req.clip is None:
        raise SampleUsageError("--reference needs --clip (the features are CLIP's)")
    if req.benchmark == "unsplash50-id" and req.face is None:
        raise SampleUsageError(
            "--benchmark unsplash50-id needs --face (a folder with backbone.pth and detector.pt)"
        )
    problem = scorer_folders_problem(scorer_folders(req))
    if problem:
        raise ConfigError(problem)


def open_bench(
    req: EvalRequest, cfg: Any, mcfg: Any, stride: tuple[int, int], scorers: Any
) -> Bench:
    side = bench_side(req, cfg)
    multiple = math.lcm(*stride)
    if side % multiple:
        raise BenchmarkError(f"--size {side}: not a multiple of {multiple}, the model's patch grid")
    if req.benchmark == "onegen":  # --num: samples per task
        return onegen_bench(req, cfg, side, scorers)
    if req.benchmark in SCENE_BENCHMARKS:
        return scene_bench(req, cfg, mcfg, side, scorers.lpips)
    if req.benchmark == "t2i":
        return t2i_bench(req, side, scorers.clip)
    if req.benchmark == "unsplash50-id":
        return id_bench(req, side, scorers.clip, scorers.face)
    bench = depth_bench(req, multiple, side)
    bench.cases = bench.cases[: req.num]  # --num: the first N (None: all)
    return bench


SCENE_BENCHMARKS = ("gso-nvs", "gso-pose", "co3d-pose")
BENCH_TASKS = {
    "nyuv2": ("image2depth",),
    "diode": ("image2depth",),
    "gso-nvs": ("multiview",),
    "gso-pose": ("camera_pose",),
    "co3d-pose": ("camera_pose",),
    "t2i": ("text2image",),
    "unsplash50-id": ("faceid",),
}


def evaluate(source: Any, weights: str, req: EvalRequest) -> dict[str, Any]:
    """Run (or finish) the benchmark; the parent of ``--devices N`` runs the shares as
    processes and writes the report. Returns the ``metrics.json`` payload."""
    from training.inference.generate import SamplerSettings
    from training.inference.sample import SampleUsageError, load_model, resolve_device

    if req.benchmark not in BENCHMARKS:
        raise BenchmarkError(f"--benchmark {req.benchmark}: one of {', '.join(BENCHMARKS)}")
    if req.devices < 1:
        raise SampleUsageError(f"--devices {req.devices}: must be >= 1")
    for key in ("num", "steps"):
        value = getattr(req, key)
        if value is not None and value < 1:
            raise SampleUsageError(f"--{key} {value}: must be >= 1")
    check_scorer_options(req)
    cfg, mcfg, stride = source_config(source)
    if req.benchmark == "onegen" and req.tasks is None and isinstance(source, (str, Path)):
        from training.config import trained_tasks

        req = dataclasses.replace(req, tasks=tuple(trained_tasks(cfg)))  # what it can do
    check_tasks(source, cfg, BENCH_TASKS.get(req.benchmark, ()))
    from training.evaluation.scorers import Scorers

    scorers = Scorers.load(scorer_folders(req), resolve_device(req.device))
    bench = open_bench(req, cfg, mcfg, stride, scorers)
    check_tasks(source, cfg, sorted({c.task for c in bench.cases}))
    out = Path(req.out)
    todo = [i for i, c in enumerate(bench.cases) if not case_file(out, c.id).is_file()]
    index, count = req.shard
    if req.devices > 1 and count == 1:
        if todo:
            _run_shares(source, weights, req)
    else:
        mine = [i for i in todo if i % count == index]
        if mine:
            device = resolve_device(req.device)
            net, frozen = load_model(source, cfg, mcfg, weights, device)
            settings = SamplerSettings.from_config(cfg, steps=req.steps, guidance=req.guidance)
            sample = _sampler(net, frozen, settings, device)
            for i in mine:
                _run_case(out, bench.cases[i], i, sample, req, settings)
    if count > 1:
        return {}
    return write_report(out, bench, req, cfg)


def _run_case(
    out: Path, case: Case, i: int, sample: Callable, req: EvalRequest, settings: Any
) -> None:
    kw = case.inputs()
    result = sample(case.prompt, req.seed + i, kw)
    scores = {k: float(v) for k, v in case.score(result, kw).items()}
    payload = {"id": case.id, "task": case.task, "metrics": scores, "seed": req.seed + i}
    if i < GRID_CASES:
        preview = out / SAMPLES / "preview" / f"{i:03d}.pt"
        preview.parent.mkdir(parents=True, exist_ok=True)
        pixels = (result.pixels if hasattr(result, "pixels") else result)[0].cpu()
        if "cond_pixels" in kw:
            cond, mask = kw["cond_pixels"][0].cpu(), kw["cond_mask"][0].cpu()
        else:  # text2image: nothing given
            cond, mask = torch.zeros_like(pixels), torch.zeros(pixels.shape[0], dtype=torch.bool)
        torch.save({"cond": cond, "mask": mask, "out": pixels}, preview)
    _write_json(case_file(out, case.id), payload)


def share_argv(source: Any, weights: str, req: EvalRequest, index: int, device: str) -> list[str]:
    """The ``onegen eval`` command line of share ``index`` of ``req.devices``."""
    if isinstance(source, (str, Path)):
        argv = ["--checkpoint", str(source), "--ema" if weights == "ema" else "--no-ema"]
    else:  # a released folder (training.inference.weights.ReleaseWeights)
        argv = ["--weights", str(source.path)]
        if source.encoders:
            argv += ["--encoders", str(source.encoders)]
    argv += ["--benchmark", req.benchmark, "--path", req.path, "--out", req.out,
             "--seed", str(req.seed), "--device", device, "--shard", f"{index}/{req.devices}"]  # fmt: skip
    for flag, value in (("--num", req.num), ("--steps", req.steps), ("--guidance", req.guidance),
                        ("--size", req.size), ("--split", req.split)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    if req.tasks:
        argv += ["--tasks", ",".join(req.tasks)]
    for flag, value in (("--clip", req.clip), ("--reference", req.reference),
                        ("--lpips", req.lpips), ("--face", req.face)):  # fmt: skip
        if value is not None:
            argv += [flag, value]
    return ["eval", *argv]


def _run_shares(source: Any, weights: str, req: EvalRequest) -> None:
    """``--devices N``: N processes of this command, each its share (``--shard i/N``), on
    ``cuda:i`` when the device is CUDA; their case files are the result."""
    procs = []
    for i in range(req.devices):
        device = req.device
        if torch.cuda.is_available() and req.device in ("auto", "cuda"):
            device = f"cuda:{i}"
        cmd = [
            sys.executable,
            "-m",
            "orchestration.cli",
            *share_argv(source, weights, req, i, device),
        ]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    if any(codes):
        from training.errors import FitError

        raise FitError(f"a share failed (exit codes {codes}); rerun to finish what is missing")


# --------------------------------------------------------------------------- the report


def write_report(out: Path, bench: Bench, req: EvalRequest, cfg: Any) -> dict[str, Any]:
    per_task: dict[str, dict[str, list[float]]] = {}
    done = 0
    for case in bench.cases:
        path = case_file(out, case.id)
        if not path.is_file():
            continue
        done += 1
        for name, value in json.loads(path.read_text())["metrics"].items():
            per_task.setdefault(case.row or case.task, {}).setdefault(name, []).append(value)
    results = {
        task: {name: float(np.mean(v)) for name, v in per.items()}
        | {"n": max(map(len, per.values()))}
        for task, per in per_task.items()
    }
    for task, extra in (bench.finish() if bench.finish else {}).items():
        results.setdefault(task, {"n": 0}).update(extra)
    settings = {
        "steps": int(req.steps or cfg.samples.steps),
        "guidance": float(req.guidance if req.guidance is not None else cfg.samples.guidance),
        "seed": req.seed,
        "size": bench_side(req, cfg),
    }
    payload = {
        "benchmark": bench.name,
        "path": str(Path(req.path).resolve()),
        "cases": len(bench.cases),
        "done": done,
        "tasks": results,
        "paper": bench.paper,
        "settings": settings,
    }
    _write_json(out / "metrics.json", payload)
    (out / "report.md").write_text(report_markdown(bench, results, settings))
    _write_grid(out, bench)
    return payload


def report_markdown(bench: Bench, results: dict, settings: dict) -> str:
    lines = [f"# {bench.name}", "",
             f"steps {settings['steps']}, guidance {settings['guidance']}, seed {settings['seed']}, "
             f"size {settings['size']}", "",
             "| task | metric | ours | paper | n |", "|---|---|---|---|---|"]  # fmt: skip
    for task, per in results.items():
        for name, value in per.items():
            if name == "n":
                continue
            paper = bench.paper.get(f"{task}/{name}", bench.paper.get(name))
            lines.append(f"| {task} | {name} | {value:.4f} | {'' if paper is None else f'{paper:g}'} "
                         f"| {int(per['n'])} |")  # fmt: skip
    if bench.paper_source:
        lines += ["", f"Paper figures: {bench.paper_source}."]
    return "\n".join(lines) + "\n"


def _write_grid(out: Path, bench: Bench) -> None:
    from training.inference.grid import conditional_row, render_grid, save_grid_image

    rows = []
    for i, case in enumerate(bench.cases[:GRID_CASES]):
        path = out / SAMPLES / "preview" / f"{i:03d}.pt"
        if not path.is_file():
            continue
        p = torch.load(path, weights_only=True)
        mask = p["mask"] if p["mask"].shape[0] == p["cond"].shape[0] else p["mask"][0::2]
        rows.append(conditional_row(case.task, case.prompt, p["cond"], mask, p["out"],
                                    targets=case.has_target))  # fmt: skip
    if rows:
        save_grid_image(render_grid(rows), out / "grid.png")
