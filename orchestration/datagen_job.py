"""One datagen run, start to finish: lock, resume, execute, account, report.

The accounting rule is checked at the end of every run, not assumed: for each
subset, every input key is committed exactly once, as written or as
quarantined. A run whose quarantine rate exceeds ``max_error_rate`` still
commits everything it made, then fails loudly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from common.console import quiet_library_logs
from common.durations import format_eta
from datagen import shards
from datagen.preview import contact_sheet
from datagen.shards.frames import frame_problem
from orchestration import tracking
from orchestration.errors import DatagenError
from orchestration.ray_runtime import apply_offline_env, init_ray, quiet_native_stderr
from orchestration.run_lock import RunLock
from pipelines import builder, dag

RECIPE = "_dag.yaml"
PREVIEW = "_preview.png"


@dataclass
class RunResult:
    """What a run did. ``subsets[s]``: ``inputs`` (keys the source lists), ``written`` and
    ``quarantined`` (committed in all, this run and earlier ones), ``written_this_run``,
    ``quarantined_this_run``, ``already_committed`` (before this run), ``bytes`` and
    ``shards`` (this run), ``problems`` (accounting)."""

    output: str
    inputs: int
    pending: int
    seconds: float
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    preview: str | None = None
    error_rate: float = 0.0


def _absolute(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def check_recipe(cfg: dag.Dag, out: str) -> dict[str, str]:
    """Refuse to resume a subset made by a different recipe (the digest of source, seed,
    the stages it needs with their code versions and parameters), unless told to. The
    digests an output was made with are read back as written (the recipe's header, or
    for outputs older than it a subset manifest), not recomputed by today's code. A
    subset this output does not have yet is simply added; subsets this run does not
    make keep their recorded digests."""
    fs, root = shards.filesystem(out)
    digests = cfg.subset_digests
    path = f"{root}/{RECIPE}"
    recorded = recorded_digests(fs, path, out) if fs.exists(path) else {}
    changed = [
        f"{s} (digest {recorded[s]}, now {d})"
        for s, d in digests.items()
        if s in recorded and recorded[s] != d
    ]
    for subset in digests:  # never mixed, even knowingly: a fit could not tell them apart
        old = shards.read_manifest(out, subset)
        problem = frame_problem(old, subset) if old and old.get("written") else None
        if problem:
            raise DatagenError(f"{out}/{subset} cannot be resumed: {problem}")
    if changed and not cfg.allow_recipe_change:
        raise DatagenError(
            f"{out} was made by a different recipe for {', '.join(changed)}; use a new "
            "--output, or pass allow_recipe_change=true to mix them knowingly"
        )
    merged = {**{k: v for k, v in recorded.items() if k != ""}, **digests}
    header = "".join(f"{SUBSET_HEADER}{s}: {d}\n" for s, d in sorted(merged.items()))
    body = f"{DIGEST_HEADER}{cfg.config_digest}\n{header}" + cfg.to_yaml()
    shards.atomic_write(fs, path, body.encode())
    return digests


DIGEST_HEADER = "# config_digest: "
SUBSET_HEADER = "# subset_digest "


def recorded_digests(fs: Any, path: str, out: str) -> dict[str, str]:
    """Subset -> digest as the output recorded it. An output from before per-subset
    digests has one digest for all its subsets (header or manifest); ``""`` stands for
    it when nothing names its subsets."""
    with fs.open(path, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith(SUBSET_HEADER):
            name, _, digest = line[len(SUBSET_HEADER) :].partition(":")
            found[name.strip()] = digest.strip()
    if found:
        return found
    old = None
    if text.startswith(DIGEST_HEADER):
        old = text[len(DIGEST_HEADER) :].split("\n", 1)[0].strip()
    subsets = shards.subsets_in(out)
    for subset in subsets:
        manifest = shards.read_manifest(out, subset) or {}
        if old is None and isinstance(manifest.get("config_digest"), str):
            old = manifest["config_digest"]
    if old is None:
        return {}
    return {s: old for s in subsets} or {"": old}


def pending_work(
    manifest: pa.Table, out: str, subset_names: list[str]
) -> tuple[pa.Table, list[list[str]], dict[str, int]]:
    """Rows with at least one subset not yet committed, which subsets, and per subset how
    many of the inputs were already committed (written or quarantined) before this run."""
    keys = manifest.column("key").to_pylist()
    done = {s: shards.committed_keys(out, s) for s in subset_names}
    todo_all = [[s for s in subset_names if key not in done[s]] for key in keys]
    keep = [i for i, t in enumerate(todo_all) if t]
    already = {s: len(done[s].intersection(keys)) for s in subset_names}
    return manifest.take(pa.array(keep, pa.int64())), [todo_all[i] for i in keep], already


def account(
    manifest: pa.Table, committed: dict[str, tuple[pa.Table, pa.Table]]
) -> dict[str, dict[str, Any]]:
    """Check, per subset, input keys == written + quarantined + filtered, each once.
    ``committed``: subset -> (its index, its quarantine) as read at the end of the run;
    quarantine records of kind ``filtered`` (expected non-samples) are counted apart."""
    inputs = set(manifest.column("key").to_pylist())
    report = {}
    for subset, (index, quarantine) in committed.items():
        written_list = index.column("key").to_pylist()
        quarantined_list = quarantine.column("key").to_pylist()
        kinds = (
            quarantine.column("kind").to_pylist()
            if "kind" in quarantine.column_names
            else [None] * quarantine.num_rows
        )
        dup_w = [k for k, c in Counter(written_list).items() if c > 1]
        dup_q = [k for k, c in Counter(quarantined_list).items() if c > 1]
        written, quarantined = set(written_list), set(quarantined_list)
        filtered = {
            k for k, kind in zip(quarantined_list, kinds, strict=True) if kind == "filtered"
        }
        both = written & quarantined
        missing = inputs - written - quarantined
        problems = []
        if dup_w or dup_q:
            problems.append(
                f"{len(dup_w) + len(dup_q)} keys committed twice, e.g. {(dup_w + dup_q)[:3]}"
            )
        if both:
            problems.append(
                f"{len(both)} keys both written and quarantined, e.g. {sorted(both)[:3]}"
            )
        if missing:
            problems.append(
                f"{len(missing)} input keys neither written nor quarantined, e.g. {sorted(missing)[:3]}"
            )
        report[subset] = {
            "inputs": len(inputs),
            "written": len(written & inputs),
            "quarantined": len((quarantined - filtered) & inputs),
            "filtered": len(filtered & inputs),
            "problems": problems,
        }
    return report


def subset_summary(subset: str, s: dict[str, Any]) -> str:
    """One line per subset that reads right after a resume (not as a loss)."""
    filtered = s.get("filtered_this_run", 0)
    return (
        f"{subset}: {s.get('written_this_run', 0)} written this run, "
        f"{s.get('already_committed', 0)} already committed, "
        f"{s.get('quarantined_this_run', 0)} quarantined, "
        + (f"{filtered} filtered, " if filtered else "")
        + f"{s['inputs']} inputs in all"
    )


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "onegen",
        "ray",
        "webdataset",
        "pyarrow",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "torch",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@contextlib.contextmanager
def work_dir(out: str) -> Iterator[Path]:
    """Where demo inputs are staged and the preview is drawn: inside a local output, else a
    private temporary folder (unpredictable name, mode 0700), removed afterwards. Never a
    fixed name under /tmp, where anyone could plant a symlink first."""
    if "://" not in out:
        yield Path(out)
        return
    private = Path(tempfile.mkdtemp(prefix="onegen-run-"))
    try:
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


def load_inputs(cfg: dag.Dag, work: Path) -> pa.Table:
    """The source's inputs; an empty list is an error unless ``allow_empty`` (an empty
    folder or a wrong glob would otherwise "succeed" with nothing made)."""
    manifest = cfg.source_cls.rows(cfg.source, str(work / "_inputs"), cfg.seed)
    if manifest.num_rows == 0 and not cfg.allow_empty:
        spec = cfg.source_spec
        where = spec.get("path") or spec.get("urls") or ""
        raise DatagenError(
            f"the source lists no inputs: {spec.get('kind')} {where}".rstrip()
            + "; pass allow_empty=true to accept"
        )
    return manifest


def progress_line(
    done: int,
    pending: int,
    already: int,
    elapsed: float,
    totals: dict[str, Counter],
    stages: dict[str, Counter],
) -> str:
    """The run's progress as one line: keys, samples/s, ETA at this run's rate so far, each
    stage's rows/s per worker (the busiest is the one to scale) and what each subset
    committed."""
    rate = done / max(elapsed, 1e-9)
    eta = f", ETA {format_eta((pending - done) / rate)}" if 0 < done < pending else ""
    per_stage = ", ".join(
        f"{name} {s['in'] / s['seconds']:.1f}"
        for name, s in stages.items()
        if s.get("in") and s.get("seconds")
    )
    per_subset = ", ".join(
        f"{s}: {t['written']} written, {t['quarantined']} quarantined"
        for s, t in sorted(totals.items())
    )
    return (
        f"  {done}/{pending} keys processed this run ({already} already committed), "
        f"{rate:.1f} samples/s{eta}"
        + (f"; rows/s per worker: {per_stage}" if per_stage else "")
        + f"; so far {per_subset or 'nothing committed'}"
    )


def execute(
    cfg: dag.Dag,
    out: str,
    pending: pa.Table,
    todo: list[list[str]],
    already: int,
    log: Callable[[str], Any],
    verbose: bool = False,
) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """Run the plan over the pending rows; per-subset totals and per-stage counters of
    this run, from the sink's summary rows. Ray's console is quiet unless ``verbose``
    (:mod:`orchestration.ray_runtime`): the progress lines are the run's."""
    totals: dict[str, Counter] = defaultdict(Counter)
    stages: dict[str, Counter] = defaultdict(Counter)
    if not pending.num_rows:
        return totals, stages
    resources = init_ray(
        cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory, verbose=verbose
    )
    check_gpus(cfg, resources)
    subset_names = cfg.subset_names
    plan = builder.build(cfg, builder.input_rows(pending, todo, subset_names), out)
    done_rows, plan_started = 0, time.time()
    with quiet_native_stderr(verbose):
        for summary in _unwrapped(plan.iter_rows(), out):
            if summary["subset"]:
                t = totals[summary["subset"]]
                t["written"] += int(summary["written"])
                t["quarantined"] += int(summary["quarantined"])
                t["filtered"] += int(summary["filtered"])
                t["bytes"] += int(summary["bytes"])
                t["shards"] += len(json.loads(summary["shards"]))
                continue
            per_stage = json.loads(summary["stages"])
            for stage, s in per_stage.items():
                stages[stage].update(s)
            done_rows += int(next(iter(per_stage.values()), {"rows": 0})["rows"])
            elapsed = time.time() - plan_started
            log(progress_line(done_rows, pending.num_rows, already, elapsed, totals, stages))
    return totals, stages


def check_gpus(cfg: dag.Dag, resources: dict[str, Any]) -> None:
    """A stage asking for GPUs on a cluster that has none would wait forever (Ray queues
    the actor without a word): a one-line error instead."""
    if resources.get("GPU", 0):
        return
    msg = dag.gpu_less_error(cfg)
    if msg:
        raise DatagenError(msg)


# Errors of the machine, not of the code: a stage hitting one fails the run with a
# one-line message (the CLI's); anything else keeps Ray's traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


_ERRNO_LINE = re.compile(r"^\w*(?:Error|Exception): \[Errno (\d+)\]", re.MULTILINE)


def _unwrapped(rows: Iterator[dict[str, Any]], out: str) -> Iterator[dict[str, Any]]:
    """``rows``, with a worker's full disk or refused write raised as an OSError on
    ``out``. Ray Data hands the driver a UserCodeException that keeps the worker's
    exception only as traceback text (its ``__cause__`` does not survive pickling), so
    the errno is read from that text's ``[Errno N]``."""
    from ray.exceptions import RayTaskError

    try:
        yield from rows
    except RayTaskError as exc:
        codes = [int(n) for n in _ERRNO_LINE.findall(str(exc))]
        code = next((c for c in reversed(codes) if c in ENVIRONMENT_ERRNOS), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), out) from exc


def preview(cfg: dag.Dag, out: str, work: Path) -> tuple[str | None, Path | None]:
    """(where the contact sheet is for the user, the local file MLflow logs). A URL
    output gets it copied in beside its subsets."""
    try:
        sheet = contact_sheet(
            out, work / PREVIEW, samples_per_subset=cfg.preview.samples_per_subset
        )
    except FileNotFoundError:
        return None, None
    if "://" not in out:
        return str(sheet), sheet
    fs, root = shards.filesystem(out)
    shards.atomic_write(fs, f"{root}/{PREVIEW}", sheet.read_bytes())
    return f"{out.rstrip('/')}/{PREVIEW}", sheet


def run(cfg: dag.Dag, log: Callable[[str], Any] = print, verbose: bool = False) -> RunResult:
    apply_offline_env()
    quiet_library_logs(verbose)
    out = _absolute(cfg.output)
    fs, root = shards.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    started = time.time()
    with RunLock(out), work_dir(out) as work:
        removed = shards.clean_incomplete(out)
        if removed:
            log(
                f"removed {len(removed)} leftovers of an interrupted run (uncommitted, will be redone)"
            )
        digests = check_recipe(cfg, out)
        digest = cfg.config_digest
        manifest = load_inputs(cfg, work)
        subset_names = cfg.subset_names
        pending, todo, already = pending_work(manifest, out, subset_names)
        log(
            f"{manifest.num_rows} inputs, {pending.num_rows} with work left this run "
            f"({manifest.num_rows - pending.num_rows} already committed in every subset)"
        )

        run_ctx = tracking.datagen_run(cfg, out, digest)
        result = RunResult(
            output=out,
            inputs=manifest.num_rows,
            pending=pending.num_rows,
            seconds=0.0,
            mlflow_run_id=run_ctx.run_id,
        )
        with run_ctx:
            totals, stages = execute(
                cfg, out, pending, todo, manifest.num_rows - pending.num_rows, log, verbose
            )
            result.seconds = time.time() - started
            info = {
                "dag": cfg.name,
                "packages": package_versions(),
                "labelers": {s.name: f"{s.name}@{s.cls.version}" for s in cfg.stages},
            }
            # One read of every index and quarantine file serves the manifests, the
            # accounting and MLflow (on object storage each read lists and opens them all).
            committed = {
                s: (shards.read_indexes(out, s), shards.read_quarantine(out, s))
                for s in subset_names
            }
            manifests = {
                s: shards.write_manifest(
                    out,
                    s,
                    {**info, "config_digest": digests[s]},
                    *committed[s],
                    datagen_run=run_ctx.record(),
                )
                for s in subset_names
            }
            accounting = account(manifest, committed)
            problems = [f"{s}: {p}" for s, a in accounting.items() for p in a["problems"]]
            result.subsets = {
                s: {
                    **a,
                    "written_this_run": totals[s]["written"],
                    "quarantined_this_run": totals[s]["quarantined"],
                    "filtered_this_run": totals[s]["filtered"],
                    "already_committed": already[s],
                    "bytes": totals[s]["bytes"],
                    "shards": totals[s]["shards"],
                }
                for s, a in accounting.items()
            }
            result.stages = {k: dict(v) for k, v in stages.items()}
            total_q = sum(a["quarantined"] for a in accounting.values())
            total_n = sum(a["inputs"] for a in accounting.values()) or 1
            result.error_rate = total_q / total_n
            result.preview, sheet = preview(cfg, out, work)
            run_ctx.log_result(
                result, manifests, {s: q for s, (_, q) in committed.items()}, sheet, digests
            )
            if problems:
                raise DatagenError("accounting failed: " + "; ".join(problems))
            if result.error_rate > cfg.max_error_rate:
                raise DatagenError(
                    f"quarantine rate {result.error_rate:.1%} exceeds max_error_rate "
                    f"{cfg.max_error_rate:.1%}; everything was committed, see "
                    f"{out}/<subset>/quarantine/ for the reasons"
                )
    return result
