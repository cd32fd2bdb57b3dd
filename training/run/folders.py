"""A folder per run: ``runs/<experiment>/<run name>/`` holds the run's checkpoints, resolved
configs and logs, and the ``resume`` setting finds the run (and checkpoint) to continue.

A fresh fit always gets a folder of its own (``<name>-<YYYYmmdd-HHMMSS>``, or the launcher's
job id), so a second fit never writes into a first fit's folder; a folder that already holds
checkpoints is only ever continued through ``resume``. ``resume``:

* ``last``: the newest run of the experiment that has a whole checkpoint, its newest whole
  checkpoint (newer ones cut short by a crash are skipped with a warning); an error when
  there is none. ``auto``: the same, or a fresh run when there is none.
* a run name (a folder under ``runs/<experiment>/``) or a run folder: its newest checkpoint.
* a checkpoint (``.ckpt`` file or sharded folder): that one, continuing the run folder that
  holds it (``<run>/checkpoints/<ckpt>``), or a fresh run when it lives elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from training.checkpoint_io import onegen_meta, verify_checkpoint
from training.config import ConfigError
from training.errors import CheckpointError, UnsafeCheckpointError
from training.run.cluster import RUN_NAME_ENV, agree, global_rank, launch_shape

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
STEP_RE = re.compile(r"step(\d+)")


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    run_name: str
    resume_from: str | None  # the checkpoint to restore, checked whole and safe
    continued: bool  # an existing run folder goes on (a resume)
    # The checkpoint's ``onegen`` entry (config, MLflow run id, world size), read when it was
    # checked: nothing reads the checkpoint again before Lightning restores it.
    resume_meta: dict = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS


def checkpoint_step(path: str | Path) -> int | None:
    match = STEP_RE.search(Path(str(path)).name)
    return int(match.group(1)) if match else None


def find_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints in ``ckpt_dir`` (files or sharded folders), oldest step first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.name.endswith(".ckpt") and checkpoint_step(p) is not None
    ]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime))


def newest_whole(
    ckpt_dir: str | Path, label: str, warn: Callable[[str], None]
) -> tuple[Path | None, dict, list[str]]:
    """The newest whole checkpoint in ``ckpt_dir``, its ``onegen`` entry, and the names of
    newer broken ones (each warned about, the warning led by ``label``: ``resume=auto``,
    ``export``, ``model.init_from``); code in a checkpoint is never stepped over
    (``UnsafeCheckpointError``)."""
    broken: list[str] = []
    for cand in reversed(find_checkpoints(ckpt_dir)):
        try:
            checked = verify_checkpoint(cand)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            warn(f"{label}: skipping checkpoint {cand}: {exc}")
            broken.append(cand.name)
            continue
        if broken:
            warn(f"{label}: using {cand} instead")
        return cand, onegen_meta(checked), broken
    return None, {}, broken


def checkpoint_or_newest(path: str | Path, label: str, warn: Callable[[str], None]) -> Path:
    """``path`` itself (a ``.ckpt`` file or sharded folder), or a run folder's newest whole
    checkpoint, found as ``resume`` finds it; ``CheckpointError`` when neither exists."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir() and (p / CHECKPOINTS).is_dir():
        ckpt, _, broken = newest_whole(p / CHECKPOINTS, label, warn)
        if ckpt is None:
            extra = f" (broken: {', '.join(broken)})" if broken else ""
            raise CheckpointError(f"{p}: a run folder with no whole checkpoint{extra}")
        return ckpt
    return p


def experiment_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.runs_dir)) / str(cfg.experiment)


def run_started(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / RUN_FILE).read_text())["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.stat().st_mtime


def list_runs(cfg: DictConfig) -> list[Path]:
    """The experiment's run folders, newest start first."""
    root = experiment_dir(cfg)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir()]
    return sorted(runs, key=lambda p: (run_started(p), p.name), reverse=True)


def _new_run_name(cfg: DictConfig) -> tuple[str, bool]:
    """(name, shared): ``shared`` when every process of the job derives the same name."""
    if cfg.run_name:
        return str(cfg.run_name), True
    if os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV], True
    shape = launch_shape()
    if shape is not None and shape.job_id:
        tag = "slurm" if shape.launcher == "slurm" else ""
        return f"{cfg.name}-{tag}{shape.job_id}", True
    if shape is None and int(cfg.trainer.num_nodes) > 1:
        raise ConfigError(
            "trainer.num_nodes > 1 without torchrun or SLURM: the nodes cannot agree on a run "
            "folder by themselves; give every node the same run_name=<name>"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return agree("run_name", f"{cfg.name}-{stamp}"), shape is not None


def _refuse_taken(run_dir: Path) -> None:
    found = find_checkpoints(run_dir / CHECKPOINTS)
    if found:
        raise ConfigError(
            f"{run_dir} already holds the checkpoints of a fit (newest {found[-1].name}); "
            "continue it with resume=last (or resume=<run name>), or start another run"
        )


def plan_run(cfg: DictConfig, warn: Callable[[str], None]) -> RunPlan:
    """Where this fit writes and what it restores (every process computes the same)."""
    resume = cfg.resume
    mode = str(resume) if resume not in (None, "", False) else None
    if mode is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        mode = "auto"  # torchrun restarted the job: continue what the first attempt wrote
    if mode in ("last", "auto"):
        candidates = [Path(str(cfg.run_dir))] if cfg.run_dir else list_runs(cfg)
        broken_all: list[str] = []
        for run_dir in candidates:
            ckpt, meta, broken = newest_whole(run_dir / CHECKPOINTS, f"resume={mode}", warn)
            broken_all += [f"{run_dir.name}/{b}" for b in broken]
            if ckpt is not None:
                return RunPlan(run_dir, run_dir.name, str(ckpt), True, meta)
        where = cfg.run_dir or experiment_dir(cfg)
        if broken_all:
            raise ConfigError(
                f"resume={mode}: no whole checkpoint in {where} (broken: {', '.join(broken_all)})"
            )
        if mode == "last":
            raise ConfigError(
                f"resume=last but no checkpoint in {where}; "
                "use resume=auto to start fresh when there is none"
            )
    elif mode is not None:
        return _plan_named(cfg, mode, warn)
    return _plan_fresh(cfg)


def _plan_named(cfg: DictConfig, name: str, warn: Callable[[str], None]) -> RunPlan:
    path = Path(name)
    if not path.exists() and "/" not in name:
        path = experiment_dir(cfg) / name
    if not path.exists():
        runs = [p.name for p in list_runs(cfg)[:5]]
        raise ConfigError(
            f"resume={name}: no such checkpoint, run folder or run of experiment "
            f"{cfg.experiment!r} (newest runs: {', '.join(runs) or 'none'})"
        )
    if path.name.endswith(".ckpt"):
        meta = onegen_meta(verify_checkpoint(path))  # named explicitly: it must be whole
        holder = path.resolve().parent
        if holder.name == CHECKPOINTS:
            return RunPlan(holder.parent, holder.parent.name, str(path), True, meta)
        fresh = _plan_fresh(cfg)
        return RunPlan(fresh.run_dir, fresh.run_name, str(path), False, meta)
    ckpt, meta, _ = newest_whole(path / CHECKPOINTS, f"resume={name}", warn)
    if ckpt is None:
        raise ConfigError(f"resume={name}: {path} holds no whole checkpoint")
    return RunPlan(path, path.name, str(ckpt), True, meta)


def _plan_fresh(cfg: DictConfig) -> RunPlan:
    if cfg.run_dir:
        run_dir = Path(str(cfg.run_dir))
        _refuse_taken(run_dir)
        return RunPlan(run_dir, str(cfg.run_name or run_dir.name), None, False)
    name, shared = _new_run_name(cfg)
    root = experiment_dir(cfg)
    run_dir = root / name
    if shared:
        _refuse_taken(run_dir)
        return RunPlan(run_dir, name, None, False)
    # A name this process made up: take the folder atomically, another suffix if it exists.
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        try:
            (root / candidate).mkdir()
        except FileExistsError:
            continue
        return RunPlan(root / candidate, candidate, None, False)
    raise ConfigError(f"{root}: could not find a free run folder for {name}")


def prepare(plan: RunPlan, cfg: DictConfig, config_yaml: str) -> None:
    """Write the run's record (rank 0): ``run.json``, the resolved config (``config.yaml``; a
    resume adds ``config.resume-stepXXXXXXXX.yaml``) and ``logs/``."""
    if global_rank() != 0:
        return
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / LOGS).mkdir(exist_ok=True)
    record_path = plan.run_dir / RUN_FILE
    record = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}
    record.setdefault("run_name", plan.run_name)
    record.setdefault("experiment", str(cfg.experiment))
    record.setdefault("started", time.time())
    record.setdefault("started_at", time.strftime("%Y-%m-%d %H:%M:%S"))
    if plan.resume_from:
        record.setdefault("resumes", []).append(
            {"from": str(plan.resume_from), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
    write_text_atomic(record_path, json.dumps(record, indent=1))
    if plan.continued and plan.resume_from:
        step = checkpoint_step(plan.resume_from) or 0
        name = f"config.resume-step{step:08d}.yaml"
    else:
        name = "config.yaml"
    write_text_atomic(plan.run_dir / name, config_yaml)


@contextlib.contextmanager
def shared_run_name(name: str) -> Iterator[None]:
    """The run name in the environment of the processes Lightning launches from this one
    (they re-run the command line and must land in the same folder); restored after."""
    old = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = old


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` at ``path`` so readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_line(run_dir: str | Path, line: str) -> None:
    """Append one line to ``<run_dir>/logs/fit.log`` (rank 0's progress, warnings, result)."""
    folder = Path(run_dir) / LOGS
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "fit.log", "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as exc:  # a log must not stop a fit
        print(f"onegen: warning: cannot write {folder / 'fit.log'}: {exc}", file=sys.stderr)
