"""``onegen``: the user's surface for datagen, training and sampling."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_dag(args: argparse.Namespace, address: str | None = None, local: bool = True):
    """The DAG with the command line applied: overrides, then --output, --input.
    ``local``: it runs from here (model weights must exist on this machine)."""
    from pipelines import dag

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={args.output}")
    if address:
        overrides.append(f"ray.address={address}")
    source = None
    if args.input:
        from datagen.sources import guess_spec

        source = guess_spec(args.input)
    return dag.load(args.pipeline, overrides, source=source, local_weights=local)


def _os_error(exc: OSError, where: str) -> str:
    """``<file>: <reason>``; a failed write often carries no file name (ENOSPC from
    ``write``), then the output it was writing to is named."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename or where}: {reason}"


def _datagen_run(args: argparse.Namespace) -> int:
    """Exit code 2: a DAG that does not validate (nothing started, nothing written);
    1: a run that failed."""
    from orchestration.datagen_job import DatagenError, run, subset_summary
    from pipelines.dag import DagError

    where = str(args.output or args.pipeline)
    try:
        cfg = _load_dag(args, args.address)
        where = str(cfg.output)
        result = run(cfg, verbose=args.verbose)
    except DagError as exc:  # raised by validation, before Ray or the output
        print(f"onegen datagen run: error: {exc}", file=sys.stderr)
        return 2
    except (DatagenError, ValueError) as exc:  # SourceError, ShardFileError
        print(f"onegen datagen run: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unwritable output, full disk, missing file: the user's to fix
        print(f"onegen datagen run: error: {_os_error(exc, where)}", file=sys.stderr)
        return 1
    print(
        f"done in {result.seconds:.1f}s: {result.pending} inputs processed this run, "
        f"{result.inputs - result.pending} already committed, {result.inputs} in all"
    )
    for subset, a in result.subsets.items():
        print(f"  {subset_summary(subset, a)}")
    print(f"shards:  {result.output}")
    if result.preview:
        print(f"preview: {result.preview}")
    if result.mlflow_run_id:
        print(
            f"mlflow:  run {result.mlflow_run_id} in {cfg.mlflow.tracking_uri} "
            f"(review: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri})"
        )
    return 0


def _datagen_submit(args: argparse.Namespace) -> int:
    from ray.exceptions import RayError

    from orchestration.submit import follow, submit
    from pipelines.dag import DagError

    try:
        cfg = _load_dag(args, local=False)
        job_id, job_cfg = submit(
            cfg,
            args.address,
            submission_id=args.submission_id,
            python=args.python,
            verbose=args.verbose,
        )
    except DagError as exc:  # as for run: a usage error, nothing submitted
        print(f"onegen datagen submit: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError, RayError) as exc:
        print(f"onegen datagen submit: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id} to {args.address}: {job_cfg.name} -> {job_cfg.output}")
    print(f"  logs:   ray job logs --address {args.address} --follow {job_id}")
    print(f"  stop:   ray job stop --address {args.address} {job_id}")
    print(f"  status: onegen datagen status {job_cfg.output}")
    if args.no_wait:
        return 0
    try:
        final = follow(args.address, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster", file=sys.stderr)
        return 130
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _datagen_status(args: argparse.Namespace) -> int:
    from datagen.shards.index import status

    try:
        info = status(args.output)
    except (ValueError, OSError) as exc:  # ShardFileError names the damaged file
        print(f"onegen datagen status: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    if not info:
        print(f"{args.output}: no subsets")
        return 1
    print(
        f"{'subset':<12}{'written':>10}{'quarantined':>13}{'filtered':>10}{'shards':>8}{'bytes':>14}"
    )
    for subset, s in info.items():
        print(
            f"{subset:<12}{s['written']:>10}{s['quarantined']:>13}{s.get('filtered', 0):>10}"
            f"{s['shards']:>8}{s['bytes']:>14}"
        )
        for error, count in sorted(s["errors"].items()):
            print(f"{'':<14}{count:>6} x {error}")
    return 0


def _datagen_verify(args: argparse.Namespace) -> int:
    from datagen.shards.verify import VerifyReport, verify

    try:
        report = verify(args.output)
    except Exception as exc:  # verify reports damage itself; this only keeps the promise
        report = VerifyReport(
            defects=[f"{args.output}: verify failed: {type(exc).__name__}: {exc}"]
        )
    for defect in report.defects:
        print(f"DEFECT {defect}")
    print(
        f"checked {report.checked_shards} shards, {report.checked_samples} samples: "
        f"{'OK' if report.ok else f'{len(report.defects)} defects'}"
    )
    return 0 if report.ok else 1


def _datagen_preview(args: argparse.Namespace) -> int:
    from datagen.preview import contact_sheet

    try:
        path = contact_sheet(args.output, args.out, samples_per_subset=args.samples)
    except (ValueError, OSError) as exc:  # ShardFileError names the damaged file
        print(f"onegen datagen preview: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _train_fit(args: argparse.Namespace) -> int:
    from training.config import config_from_args

    cfg = config_from_args(args, "onegen train fit")
    if isinstance(cfg, int):  # a config error (2) or --print-config (0): nothing imported
        return cfg
    from training.fit import run

    return run(cfg, "onegen train fit", args.verbose)


def _sample_source(args: argparse.Namespace):
    """``--checkpoint`` (its EMA or model weights) or ``--weights`` (a released or exported
    folder): the source and which weights; the flags of the other are usage errors."""
    from training.inference.sample import SampleUsageError

    if args.weights is not None:
        if args.ema is not None:
            raise SampleUsageError(
                "--ema/--no-ema choose a --checkpoint's weights; a --weights folder holds one set"
            )
        from training.inference.weights import ReleaseWeights

        return ReleaseWeights(Path(args.weights), args.encoders), "ema"
    if args.encoders is not None:
        raise SampleUsageError(
            "--encoders is for --weights; a --checkpoint's config names its encoders"
        )
    return args.checkpoint, "model" if args.ema is False else "ema"


def _eval(args: argparse.Namespace) -> int:
    """Exit code 2: a usage error or a benchmark folder in the wrong layout, found before any
    weights are read; 1: a missing or broken checkpoint or folder."""
    from training.config import ConfigError
    from training.errors import FitError
    from training.evaluation.errors import BenchmarkError
    from training.evaluation.run import EvalRequest, evaluate
    from training.inference.sample import SampleUsageError

    try:
        source, weights = _sample_source(args)
        if args.checkpoint is not None:  # a run folder: its newest whole checkpoint
            from training.errors import warn
            from training.run.folders import checkpoint_or_newest

            source = checkpoint_or_newest(args.checkpoint, "eval", warn)
        index, count = (int(x) for x in args.shard.split("/"))
        req = EvalRequest(
            benchmark=args.benchmark, path=args.path, out=args.out, num=args.num,
            steps=args.steps, guidance=args.guidance, seed=args.seed, size=args.size,
            split=args.split, device=args.device, devices=args.devices, shard=(index, count),
            tasks=tuple(t for t in args.tasks.split(",") if t) if args.tasks else None,
            clip=args.clip, reference=args.reference, lpips=args.lpips, face=args.face,
        )  # fmt: skip
        result = evaluate(source, weights, req)
    except (SampleUsageError, BenchmarkError) as exc:
        print(f"onegen eval: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, FitError) as exc:  # a missing or broken model
        print(f"onegen eval: error: {exc}", file=sys.stderr)
        return 1
    if result:
        for task, per in result["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in per.items() if k != "n")
            print(f"{task} (n={int(per['n'])}): {shown}")
        print(f"{result['done']}/{result['cases']} samples; {Path(args.out) / 'report.md'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    """Exit code 2: a usage error, found before any weights are read (nothing written);
    1: a missing or broken checkpoint or folder, an unreadable condition image."""
    from training.config import ConfigError
    from training.data.tasks import MULTIVIEW_TASKS
    from training.errors import FitError
    from training.inference.sample import SampleUsageError, sample_from_checkpoint

    images = list(args.image or [])
    lines: list[str] = []
    try:
        source, weights = _sample_source(args)
        common = {
            "prompt": args.prompt,
            "steps": args.steps,
            "guidance": args.guidance,
            "size": args.size,
            "seed": args.seed,
            "weights": weights,
            "device": args.device,
        }
        if args.task in MULTIVIEW_TASKS:
            from training.inference.multiview import sample_multiview_from_checkpoint

            result = sample_multiview_from_checkpoint(
                source,
                args.task,
                args.out,
                images=images,
                azimuths=args.azimuths,
                elevations=args.elevations,
                distance=args.distance,
                cameras=args.cameras,
                **common,
            )
            paths, lines = result.paths, result.lines
        else:
            camera_flags = [
                flag
                for flag, value in (
                    ("--azimuths", args.azimuths),
                    ("--elevations", args.elevations),
                    ("--distance", args.distance),
                    ("--cameras", args.cameras),
                )
                if value is not None
            ]
            if camera_flags:
                raise SampleUsageError(
                    f"{camera_flags[0]} is for --task multiview or camera_pose, not {args.task}"
                )
            if len(images) > 1:
                raise SampleUsageError(f"--task {args.task} takes one --image, got {len(images)}")
            paths = sample_from_checkpoint(
                source,
                args.task,
                args.out,
                image=images[0] if images else None,
                **common,
            )
    except SampleUsageError as exc:
        print(f"onegen sample: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, FitError) as exc:  # FitError: a broken checkpoint
        print(f"onegen sample: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    for line in lines:
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    """Exit code 2: a usage error (``--out``, ``--max-shard-size``, ``--components``), found
    before any weights are read; 1: a missing or broken checkpoint, a failed write. Either
    way nothing is left at ``--out``."""
    from training.export import export_checkpoint, export_error_code

    try:
        result = export_checkpoint(
            args.checkpoint,
            args.out,
            ema=args.ema,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            components=args.components,
            force=args.force,
            merge_lora=args.merge_lora,
        )
    except Exception as exc:
        code = export_error_code(exc)
        if code is None:
            raise
        text = _os_error(exc, str(args.out)) if isinstance(exc, OSError) else str(exc)
        print(f"onegen export: error: {' '.join(text.split())}", file=sys.stderr)
        return code
    print(result.summary())
    return 0


def _task_name(text: str) -> str:
    """``--task``: a task name, or its prompt token in brackets (``[[depth2image]]``)."""
    from training.inference.sample import normalise_task

    return normalise_task(text)


def version() -> str:
    """The installed distribution's version (an editable install: pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("onegen")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onegen", description="One-Gen datagen and training")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    top = p.add_subparsers(dest="command", required=True)
    datagen = top.add_parser(
        "datagen", help="build One-Gen WebDataset shards with Ray"
    ).add_subparsers(dest="action", required=True)

    r = datagen.add_parser("run", help="run a pipeline DAG (resumes by key on an existing output)")
    r.add_argument("pipeline", type=Path, help="pipelines/<dag>.yaml")
    r.add_argument("--output", help="output folder or fsspec URL (default: the DAG's output)")
    r.add_argument("--input", help="a folder, a .parquet manifest, tar shards, or 'demo'")
    r.add_argument("--address", help="an existing Ray cluster (e.g. auto, ray://head:10001)")
    r.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's INFO lines and Ray Data's progress blocks on the console too "
        "(default: its warnings; its log files keep everything)",
    )
    r.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the DAG")
    r.set_defaults(func=_datagen_run)

    sb = datagen.add_parser(
        "submit", help="run a pipeline DAG as a Ray job on a cluster (follows its log)"
    )
    sb.add_argument("pipeline", type=Path, help="pipelines/<dag>.yaml")
    sb.add_argument(
        "--address", required=True, help="the cluster's dashboard, e.g. http://head:8265"
    )
    sb.add_argument("--output", help="output every node can reach: shared folder or fsspec URL")
    sb.add_argument("--input", help="a folder, a .parquet manifest, tar shards, or 'demo'")
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sb.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    sb.add_argument("--python", default="python", help="the cluster's Python for the job's driver")
    sb.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's INFO lines and Ray Data's progress blocks on the console too "
        "(default: its warnings; its log files keep everything)",
    )
    sb.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the DAG")
    sb.set_defaults(func=_datagen_submit)

    s = datagen.add_parser("status", help="per subset: written, quarantined, shards, bytes")
    s.add_argument("output")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_datagen_status)

    v = datagen.add_parser("verify", help="re-read every tar and index; exit 1 on any defect")
    v.add_argument("output")
    v.set_defaults(func=_datagen_verify)

    pv = datagen.add_parser("preview", help="a contact sheet of samples from every subset")
    pv.add_argument("output")
    pv.add_argument("--out", default="preview.png")
    pv.add_argument("--samples", type=int, default=4, help="samples per subset")
    pv.set_defaults(func=_datagen_preview)

    train = top.add_parser(
        "train", help="fit the model with Lightning (FSDP2 when devices > 1)"
    ).add_subparsers(dest="action", required=True)
    f = train.add_parser("fit", help="run a fit from an OmegaConf YAML (resume: resume=last)")
    from training.config import add_fit_arguments

    add_fit_arguments(f)
    f.set_defaults(func=_train_fit)

    sm = top.add_parser(
        "sample", help="generate with a checkpoint's EMA weights or a released folder, write PNGs"
    )
    model = sm.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a .ckpt file or sharded .ckpt folder")
    model.add_argument(
        "--weights",
        metavar="FOLDER",
        help="a released OneDiffusion folder or an onegen export (the pipeline root or its "
        "transformer/); every task is allowed",
    )
    from training.data.tasks import all_task_names

    tasks = all_task_names()
    sm.add_argument(
        "--task",
        required=True,
        type=_task_name,
        choices=tasks,
        metavar="TASK",
        help=f"one of: {', '.join(tasks)} (a prompt token such as [[depth2image]] is taken "
        "too). text2image: the prompt only; a map task, map -> photo: depth2image, "
        "pose2image, canny2image, ...; its reverse, photo -> map: image2depth, image2pose, "
        "image2canny, ...; deblurring and image_inpainting: the degraded photo -> the photo; "
        "faceid: a photo of the face -> another. A --checkpoint must have trained it",
    )
    sm.add_argument(
        "--image",
        action="append",
        help="the condition (view 1; view 0 is generated), needed by every task but "
        "text2image: the map for depth2image / pose2image (a 16-bit depth PNG keeps its "
        "precision), the photo for image2depth / image2pose (a depth map comes out as a "
        "16-bit gray PNG). Repeat it for multiview (the given views, which take the first "
        "cameras) and camera_pose (2 or more; image 0 gets the identity camera); they are "
        "centre-cropped to squares",
    )
    sm.add_argument("--prompt", default="a photo", help="caption after the task token")
    sm.add_argument(
        "--out",
        required=True,
        help="output folder, created when the PNGs are written; holds nothing else",
    )
    sm.add_argument("--steps", type=int, help="Euler steps (default: the config's samples.steps)")
    sm.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sm.add_argument(
        "--size",
        type=int,
        help="square output side in pixels, a multiple of the model's patch grid in pixels "
        "(16 for the tiny and released models; default: the config's samples.resolution, "
        "or the --image's size rounded down to the grid)",
    )
    cams = sm.add_argument_group(
        "cameras (multiview, camera_pose)",
        "multiview: one camera per view, the given images first; camera 0 becomes the "
        "identity. camera_pose: --cameras is the ground truth the estimate is scored against "
        "(metrics.json)",
    )
    cams.add_argument(
        "--azimuths", metavar="DEG,DEG,...", help="an orbit's azimuths, e.g. 0,30,60,90"
    )
    cams.add_argument(
        "--elevations", metavar="DEG,DEG,...", help="one per azimuth (default: all 0)"
    )
    cams.add_argument(
        "--distance",
        type=float,
        help="the orbit's radius, and the distance a --cameras rig is scaled to "
        "(default 1.7, the released pipeline's)",
    )
    cams.add_argument(
        "--cameras",
        metavar="TRANSFORMS_JSON",
        help="a nerfstudio transforms.json (OpenGL c2w, fl_x/fl_y/cx/cy/w/h), frames in order",
    )
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--checkpoint: its EMA weights (the default) or, --no-ema, the trained ones",
    )
    sm.add_argument(
        "--encoders",
        choices=["tiny", "pretrained"],
        help="--weights: pretrained, the folder's vae/, text_encoder/, tokenizer/ (the "
        "default when it has them); tiny, random tiny encoders, for checking the mechanics",
    )
    sm.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    sm.set_defaults(func=_sample)

    ex = top.add_parser(
        "export", help="a checkpoint as the released OneDiffusion folder (diffusers layout)"
    )
    ex.add_argument(
        "--checkpoint",
        required=True,
        help="a .ckpt file, a sharded .ckpt folder, or a run folder (its newest whole one)",
    )
    ex.add_argument(
        "--out",
        required=True,
        help="the folder to write (new or empty; --force replaces it): transformer/, and "
        "with --components the whole pipeline",
    )
    ex.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the EMA weights (the default) or, --no-ema, the trained ones",
    )
    ex.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ex.add_argument(
        "--max-shard-size",
        default="5GB",
        help="safetensors shards of at most this size, with an index (default 5GB, as diffusers)",
    )
    ex.add_argument(
        "--components",
        metavar="FOLDER",
        help="a released pipeline folder: its vae/, text_encoder/, tokenizer/ and scheduler/ "
        "are copied (files only) and model_index.json written",
    )
    ex.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA fit's checkpoint: its adapters merged into the base (model.init_from) as "
        "a whole transformer; without it, the adapters alone in peft's layout "
        "(adapter_config.json, adapter_model.safetensors, the release's module names)",
    )
    ex.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ex.set_defaults(func=_export)

    from training.evaluation.run import BENCHMARKS

    ev = top.add_parser(
        "eval", help="a checkpoint or released folder on one of the paper's benchmarks"
    )
    model = ev.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a .ckpt file, sharded folder or run folder")
    model.add_argument("--weights", metavar="FOLDER", help="a released or exported folder")
    ev.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    ev.add_argument(
        "--path",
        required=True,
        help="the benchmark's folder in its published layout (nyuv2: Marigold's "
        "nyu_labeled_extracted with filename_list_test.txt; diode: the val folder with "
        "diode_val_all_filename_list.txt; gso-nvs, gso-pose: EscherNet's GSO30 renders, "
        "<object>/render_mvs_25/model/NNN.png + NNN.npy; co3d-pose: the CO3D v2 root holding "
        "RayDiffusion's co3d_v2_annotations/<category>_test.jgz; t2i: a prompt file, one a "
        "line, or GenEval's evaluation_metadata.jsonl; unsplash50-id: prompts.txt beside "
        "one reference photo per subject; onegen: a datagen output)",
    )
    ev.add_argument("--out", required=True, help="results: metrics.json, report.md, grid.png")
    ev.add_argument("--split", help="the split list, when it is not in --path")
    ev.add_argument(
        "--num",
        type=int,
        help="the first N samples (gso-*: objects; co3d-pose: sequences; onegen: N per "
        "task, default 8)",
    )
    ev.add_argument("--tasks", help="onegen: comma-separated tasks (default: every scored one)")
    ev.add_argument("--steps", type=int, help="Euler steps (default: the config's samples.steps)")
    ev.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    ev.add_argument("--size", type=int, help="the long side to generate at (pixels)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None)
    ev.add_argument(
        "--encoders", choices=["tiny", "pretrained"], help="--weights: as onegen sample"
    )
    ev.add_argument(
        "--clip", metavar="FOLDER", help="t2i, onegen: a local CLIP folder (CLIP score)"
    )
    ev.add_argument(
        "--face",
        metavar="FOLDER",
        help="unsplash50-id: backbone.pth (arcface_torch IResNet) + detector.pt (face YOLO)",
    )
    ev.add_argument(
        "--lpips",
        metavar="FOLDER",
        help="gso-nvs, onegen: LPIPS weights (vgg.pth + vgg16-397923af.pth, or the alex pair)",
    )
    ev.add_argument(
        "--reference", metavar="FOLDER", help="t2i: reference images (FD-CLIP; needs --clip)"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--devices", type=int, default=1, help="processes sharing the samples")
    ev.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    ev.set_defaults(func=_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from common.overrides import parse_args_with_overrides
    from orchestration.ray_runtime import apply_offline_env

    apply_offline_env()  # before any command imports ray, mlflow, transformers
    p = parser()
    args = parse_args_with_overrides(p, argv)  # overrides before or after options
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
