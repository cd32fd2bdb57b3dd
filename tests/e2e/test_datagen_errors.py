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


def test_lying_weights_fail_before_ray_as_a_subprocess(tmp_path):
    """A header-lying safetensors file as ``stages.depth.params.weights``: one line naming
    the key and the file, exit 2, fast, no Ray started and no output folder made."""
    import struct
    import time

    from datagen.stages.models.tiny.depth import save_tiny

    weights = save_tiny(tmp_path / "depth")
    st = weights / "model.safetensors"
    size = st.stat().st_size
    st.write_bytes(struct.pack("<Q", size) + st.read_bytes()[8:])
    out = tmp_path / "out"
    args = [
        "datagen",
        "run",
        str(REPO / "pipelines" / "depth.yaml"),
        "--output",
        str(out),
        f"source.cache_dir={tmp_path / 'inputs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"stages.depth.params.weights={weights}",
    ]
    ray_tmp = tmp_path / "ray"  # where a started Ray would make its session folder
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": str(ray_tmp),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [ONEGEN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"onegen datagen run: error: stages.depth.params.weights: {st}: safetensors header "
        f"length {size} runs past the end of the file ({size} bytes)"
    ]
    assert proc.stdout == "" and "Ray" not in proc.stderr and not ray_tmp.exists()
    assert not out.exists() and not (tmp_path / "inputs").exists()
    assert not (tmp_path / "mlflow.db").exists()


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
