"""The console of a run: Ray's driver-side filters (``orchestration.ray_runtime``), the
libraries' levels (``common.console``) and the progress line's ETA and per-stage rates."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections import Counter

import pytest

from common.console import (
    LIGHTNING_MLFLOW_LOGGER,
    MLFLOW_LEVEL_ENV,
    RANK_ZERO_LOGGERS,
    quiet_library_logs,
)
from orchestration.datagen_job import progress_line
from tests.helpers import REPO

NOISE = (
    "[2026-12-06 13:08:41,337 E 18349 18349] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(StageActor))' and ID: '9d11' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope"
)
FILTER_SCRIPT = """
import os, sys
from orchestration.ray_runtime import quiet_native_stderr
with quiet_native_stderr(verbose=sys.argv[1] == "verbose"):
    os.write(2, b"kept before\\n" + sys.argv[2].encode() + b"\\nkept after\\n")
    print("a python line", file=sys.stderr, flush=True)
    os.write(2, b"a partial line")
os.write(2, b"|after the block\\n")
"""


def _filtered(mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", FILTER_SCRIPT, mode, NOISE],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stderr


def test_native_stderr_loses_the_actor_restart_line_and_keeps_every_other():
    """Ray core's C++ logger writes to fd 2 itself: the filter is on the file descriptor,
    and what else goes there (Python's own stderr, a partial line) comes out in order."""
    assert _filtered("quiet") == (
        "kept before\nkept after\na python line\na partial line|after the block\n"
    )


def test_native_stderr_is_untouched_when_verbose():
    assert _filtered("verbose") == (
        f"kept before\n{NOISE}\nkept after\na python line\na partial line|after the block\n"
    )


def _record(level: int, msg: str, name: str = "ray.data") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_ray_data_console_shows_warnings_not_progress_blocks():
    from orchestration.ray_runtime import configure_ray_logs

    progress = _record(logging.INFO, "======= Running Dataset: dataset_0 =======")
    warning = _record(logging.WARNING, "the object store is full: spilling")
    try:
        configure_ray_logs(verbose=False)
        consoles = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
        assert consoles, "Ray Data has no console handler to filter"
        assert [h.filter(progress) for h in consoles] == [False] * len(consoles)
        assert all(h.filter(warning) for h in consoles)
        configure_ray_logs(verbose=True)
        assert all(h.filter(progress) for h in consoles)
    finally:
        configure_ray_logs(verbose=False)  # what init_ray leaves


@pytest.fixture
def library_loggers(monkeypatch):
    monkeypatch.delenv(MLFLOW_LEVEL_ENV, raising=False)
    names = ("mlflow", *RANK_ZERO_LOGGERS)
    levels = {n: logging.getLogger(n).level for n in names}
    filters = list(logging.getLogger(LIGHTNING_MLFLOW_LOGGER).filters)
    with warnings.catch_warnings():
        yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger(LIGHTNING_MLFLOW_LOGGER).filters[:] = filters


def test_library_lines_are_quiet_unless_verbose(library_loggers):
    import lightning.pytorch  # noqa: F401  (its console handler, as in a fit)
    import mlflow  # noqa: F401

    info = logging.getLogger(RANK_ZERO_LOGGERS[0])
    lightning_mlflow = logging.getLogger(LIGHTNING_MLFLOW_LOGGER)
    created = _record(logging.WARNING, "Experiment with name x not found. Creating it.")
    other = _record(logging.WARNING, "could not log the config artifact")

    quiet_library_logs(verbose=False)
    assert not info.isEnabledFor(logging.INFO) and info.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert os.environ[MLFLOW_LEVEL_ENV] == "WARNING"  # for the processes a fit starts
    assert not lightning_mlflow.filter(created) and lightning_mlflow.filter(other)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
            "TreeSpec) and treespec.is_leaf()` instead.",
            DeprecationWarning,
            stacklevel=1,
        )
        warnings.warn("a warning of the project's", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a warning of the project's"]

    quiet_library_logs(verbose=True)
    assert info.isEnabledFor(logging.INFO)
    assert logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert lightning_mlflow.filter(created)


def test_a_users_mlflow_level_is_kept(library_loggers, monkeypatch):
    monkeypatch.setenv(MLFLOW_LEVEL_ENV, "DEBUG")
    quiet_library_logs(verbose=False)
    assert os.environ[MLFLOW_LEVEL_ENV] == "DEBUG"


def test_progress_line_has_an_eta_and_each_stages_rate_per_worker():
    stages = {
        "decode": Counter({"rows": 40, "in": 40, "seconds": 0.5}),
        "depth": Counter({"rows": 40, "in": 40, "seconds": 8.0}),
        "pose": Counter({"rows": 40, "in": 0, "seconds": 0.0}),  # nothing of this run needed it
    }
    totals = {"depth": Counter({"written": 38, "quarantined": 2})}
    line = progress_line(40, 100, 7, 20.0, totals, stages)
    assert line == (
        "  40/100 keys processed this run (7 already committed), 2.0 samples/s, ETA 30s; "
        "rows/s per worker: decode 80.0, depth 5.0; so far depth: 38 written, 2 quarantined"
    )
    done = progress_line(100, 100, 7, 50.0, totals, stages)
    assert "ETA" not in done and "100/100 keys processed this run (7 already committed)" in done
