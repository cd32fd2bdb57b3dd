"""A user's mistake gets one line naming the file, through the real CLI; a bug keeps its
traceback.

Each case runs ``onegen datagen run`` on the demo DAG, in-process (``cli.main``) or as a
subprocess; a full disk is a real 64 KiB tmpfs (when this process may mount one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration import datagen_job
from orchestration.cli import main as cli
from orchestration.run_lock import LOCK
from tests.helpers import REPO, small_run_args

DEMO = str(REPO / "pipelines" / "demo.yaml")
ONEGEN = str(Path(sys.executable).parent / "onegen")


def _args(tmp_path: Path, output: Path | str, *extra: str) -> list[str]:
    return small_run_args(tmp_path, output, *extra)


def _one_error_line(stderr: str, *expected: str) -> str:
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert errors[0].startswith("onegen datagen run: error: "), errors
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_missing_input_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert cli(_args(tmp_path, tmp_path / "out", "--input", str(missing))) == 1
    _one_error_line(capsys.readouterr().err, str(missing), "does not exist")


def test_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a folder")
    out = tmp_path / "file.txt" / "out"
    assert cli(_args(tmp_path, out)) == 1
    _one_error_line(capsys.readouterr().err, str(out), "Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through mode 555: nothing to refuse")
def test_unwritable_output_folder(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert cli(_args(tmp_path, parent / "out")) == 1
    finally:
        parent.chmod(0o755)
    _one_error_line(capsys.readouterr().err, str(parent / "out"), "Permission denied")


def test_empty_source_is_an_error_unless_allowed(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(_args(tmp_path, tmp_path / "out", "--input", str(empty))) == 1
    _one_error_line(
        capsys.readouterr().err,
        f"the source lists no inputs: folder {empty}",
        "pass allow_empty=true to accept",
    )
    assert not list((tmp_path / "out").glob("*/*.tar"))

    # Accepted: nothing to do, no Ray, an honest summary; not part of the recipe.
    assert cli(_args(tmp_path, tmp_path / "out", "--input", str(empty), "allow_empty=true")) == 0
    printed = capsys.readouterr().out
    assert "t2i: 0 written this run, 0 already committed, 0 quarantined, 0 inputs in all" in printed
    from pipelines import dag

    strict, lenient = (
        dag.load(DEMO, [f"allow_empty={v}", "weights=random-tiny"]) for v in ("false", "true")
    )
    assert strict.config_digest == lenient.config_digest


def test_garbled_lock_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(b"\x00\x01 not a lock")
    assert cli(_args(tmp_path, out)) == 1
    _one_error_line(capsys.readouterr().err, f"remove {out / LOCK} if no job is running")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*_: object, **__: object) -> None:
        raise KeyError("a bug, not the user's doing")

    monkeypatch.setattr(datagen_job, "run", broken)
    with pytest.raises(KeyError):
        cli(_args(tmp_path, tmp_path / "out"))


def test_missing_input_folder_as_a_subprocess(tmp_path):
    missing = tmp_path / "no-such-folder"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [ONEGEN, *_args(tmp_path, tmp_path / "out", "--input", str(missing))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    _one_error_line(proc.stderr, str(missing))


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_full_disk_as_a_subprocess(tmp_path):
    """The shards' writes fail with ENOSPC inside a Ray worker; the driver says so in one
    line naming the output, and the MLflow run is marked failed."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [ONEGEN, *_args(tmp_path, disk / "out")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "No space left on device")
    assert line == f"onegen datagen run: error: {disk / 'out'}: No space left on device"

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("onegen-datagen").experiment_id])
    assert runs[0].info.status == "FAILED"
    assert "No space left on device" in runs[0].data.tags["onegen.failure"]
