"""One datagen run, start to finish: lock, resume, execute, account, report.

The accounting rule is checked at the end of every run, not assumed: for each
subset, every input key is committed exactly once, as written or as
quarantined. A run whose quarantine rate exceeds ``max_error_rate`` still
commits everything it made, then fails loudly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from datagen import shards, sources
from datagen.preview import contact_sheet
from orchestration import tracking
from orchestration.ray_runtime import init_ray
from pipelines import builder, dag
from pipelines.ops import OPS

LOCK = "_onegen.lock"
RECIPE = "_dag.yaml"


class DatagenError(RuntimeError):
    pass


@dataclass
class RunResult:
    output: str
    inputs: int
    pending: int
    seconds: float
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    preview: str | None = None
    error_rate: float = 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One writer per output folder: cleanup of interrupted commits is only
    safe when nobody else is committing. A lock left by a killed job is stale
    once its process is gone."""

    def __init__(self, out: str):
        self.fs, root = shards.filesystem(out)
        self.path = f"{root}/{LOCK}"

    def __enter__(self) -> RunLock:
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "rb") as fh:
                holder = json.loads(fh.read() or b"{}")
            same_host = holder.get("host") == socket.gethostname()
            if same_host and holder.get("pid") and _pid_alive(int(holder["pid"])) and holder["pid"] != os.getpid():
                raise DatagenError(f"{self.path}: another datagen job (pid {holder['pid']}) is writing here")
            if not same_host and time.time() - holder.get("started", 0) < 24 * 3600:
                raise DatagenError(f"{self.path}: held by {holder.get('host')} pid {holder.get('pid')}; "
                                   "remove the file if that job is dead")
        shards.atomic_write(self.fs, self.path, json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path)


def _absolute(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def check_recipe(cfg: DictConfig, out: str) -> str:
    """Refuse to resume an output made by a different recipe (the digest of
    source, seed, stage params and subsets), unless told to."""
    fs, root = shards.filesystem(out)
    digest = dag.config_digest(cfg)
    path = f"{root}/{RECIPE}"
    if fs.exists(path):
        with fs.open(path, "rb") as fh:
            previous = OmegaConf.create(fh.read().decode())
        old = dag.config_digest(previous)
        if old != digest and not cfg.get("allow_recipe_change", False):
            raise DatagenError(
                f"{out} was made by a different recipe (digest {old}, now {digest}); "
                "use a new --output, or pass allow_recipe_change=true to mix them knowingly"
            )
    shards.atomic_write(fs, path, OmegaConf.to_yaml(cfg, resolve=True).encode())
    return digest


def pending_work(manifest: pa.Table, out: str, subset_names: list[str]) -> tuple[pa.Table, list[list[str]]]:
    """Rows with at least one subset not yet committed, and which subsets."""
    done = {s: shards.committed_keys(out, s) for s in subset_names}
    todo_all = [[s for s in subset_names if key not in done[s]]
                for key in manifest.column("key").to_pylist()]
    keep = [i for i, t in enumerate(todo_all) if t]
    return manifest.take(pa.array(keep, pa.int64())), [todo_all[i] for i in keep]


def account(manifest: pa.Table, committed: dict[str, tuple[pa.Table, pa.Table]]) -> dict[str, dict[str, Any]]:
    """Check, per subset, input keys == written + quarantined, each once.
    ``committed``: subset -> (its index, its quarantine) as read at the end of the run."""
    inputs = set(manifest.column("key").to_pylist())
    report = {}
    for subset, (index, quarantine) in committed.items():
        written_list = index.column("key").to_pylist()
        quarantined_list = quarantine.column("key").to_pylist()
        dup_w = [k for k, c in Counter(written_list).items() if c > 1]
        dup_q = [k for k, c in Counter(quarantined_list).items() if c > 1]
        written, quarantined = set(written_list), set(quarantined_list)
        both = written & quarantined
        missing = inputs - written - quarantined
        problems = []
        if dup_w or dup_q:
            problems.append(f"{len(dup_w) + len(dup_q)} keys committed twice, e.g. {(dup_w + dup_q)[:3]}")
        if both:
            problems.append(f"{len(both)} keys both written and quarantined, e.g. {sorted(both)[:3]}")
        if missing:
            problems.append(f"{len(missing)} input keys neither written nor quarantined, e.g. {sorted(missing)[:3]}")
        report[subset] = {"inputs": len(inputs), "written": len(written & inputs),
                          "quarantined": len(quarantined & inputs), "problems": problems}
    return report


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onegen", "ray", "webdataset", "pyarrow", "numpy", "pillow", "opencv-python-headless", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def run(cfg: DictConfig, log=print) -> RunResult:
    out = _absolute(str(cfg.output))
    fs, root = shards.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    started = time.time()
    with RunLock(out):
        removed = shards.clean_incomplete(out)
        if removed:
            log(f"removed {len(removed)} leftovers of an interrupted run (uncommitted, will be redone)")
        digest = check_recipe(cfg, out)
        inputs_dir = str(Path(out) / "_inputs") if "://" not in out else "/tmp/onegen-inputs"
        manifest = sources.resolve(OmegaConf.to_container(cfg.source, resolve=True), work_dir=inputs_dir)
        subset_names = [s.name for s in dag.subsets(cfg)]
        pending, todo = pending_work(manifest, out, subset_names)
        log(f"{manifest.num_rows} inputs, {pending.num_rows} with work left "
            f"({manifest.num_rows - pending.num_rows} already committed in every subset)")

        run_ctx = tracking.datagen_run(cfg, out, digest)
        result = RunResult(output=out, inputs=manifest.num_rows, pending=pending.num_rows, seconds=0.0,
                           mlflow_run_id=run_ctx.run_id)
        with run_ctx:
            totals: dict[str, Counter] = defaultdict(Counter)
            stages: dict[str, Counter] = defaultdict(Counter)
            if pending.num_rows:
                init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
                plan = builder.build(cfg, builder.input_rows(pending, todo), out)
                done_rows, plan_started = 0, time.time()
                for summary in plan.iter_rows():
                    if summary["subset"]:
                        t = totals[summary["subset"]]
                        t["written"] += int(summary["written"])
                        t["quarantined"] += int(summary["quarantined"])
                        t["bytes"] += int(summary["bytes"])
                        t["shards"] += len(json.loads(summary["shards"]))
                        continue
                    per_stage = json.loads(summary["stages"])
                    for stage, s in per_stage.items():
                        stages[stage].update(s)
                    first = next(iter(per_stage.values()), {"in": 0})
                    done_rows += int(first["in"])
                    rate = done_rows / max(time.time() - plan_started, 1e-9)
                    log(f"  {done_rows}/{pending.num_rows} keys processed, {rate:.1f} samples/s; " +
                        ", ".join(f"{s}: {t['written']} written {t['quarantined']} quarantined"
                                  for s, t in sorted(totals.items())))
            result.seconds = time.time() - started
            info = {
                "config_digest": digest,
                "dag": str(cfg.name),
                "packages": package_versions(),
                "labelers": {s.op: f"{s.op}@{OPS[s.op].version}" for s in dag.stages(cfg)},
            }
            # One read of every index and quarantine file serves the manifests, the
            # accounting and MLflow (on object storage each read lists and opens them all).
            committed = {s: (shards.read_indexes(out, s), shards.read_quarantine(out, s)) for s in subset_names}
            manifests = {s: shards.write_manifest(out, s, info, *committed[s]) for s in subset_names}
            accounting = account(manifest, committed)
            problems = [f"{s}: {p}" for s, a in accounting.items() for p in a["problems"]]
            result.subsets = {s: {**a, **dict(totals[s])} for s, a in accounting.items()}
            result.stages = {k: dict(v) for k, v in stages.items()}
            total_q = sum(a["quarantined"] for a in accounting.values())
            total_n = sum(a["inputs"] for a in accounting.values()) or 1
            result.error_rate = total_q / total_n
            try:
                sheet = contact_sheet(out, Path(inputs_dir).parent / "_preview.png" if "://" not in out
                                      else "/tmp/onegen-preview.png",
                                      samples_per_subset=int(cfg.preview.samples_per_subset))
                result.preview = str(sheet)
            except FileNotFoundError:
                result.preview = None
            run_ctx.log_result(result, manifests, {s: q for s, (_, q) in committed.items()})
            if problems:
                raise DatagenError("accounting failed: " + "; ".join(problems))
            if result.error_rate > float(cfg.max_error_rate):
                raise DatagenError(
                    f"quarantine rate {result.error_rate:.1%} exceeds max_error_rate "
                    f"{float(cfg.max_error_rate):.1%}; everything was committed, see "
                    f"{out}/<subset>/quarantine/ for the reasons"
                )
    return result
