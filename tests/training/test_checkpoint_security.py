"""Checkpoints are read without running code from them, and broken ones are told apart.

Real checkpoints from real fits, made once per module: a 2-process FSDP2 fit (sharded DCP
folders at steps 2 and 4, ``python -m training.fit`` in a subprocess) and a single-device fit
(``.ckpt`` files at steps 2 and 4, in process). Each test copies what it breaks or crafts.

A crafted ``.metadata`` is a pickle that would create a marker file (``os.system('touch')``
through ``__reduce__``, or ``builtins.exec`` / ``eval``); a control test shows plain pickle
really runs it, the others that every path that opens a checkpoint refuses it in one line.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

FIT_YAML = """
name: ckpt-test
seed: 1
model: {config: tiny, meta_init: true}
encoders: {kind: tiny, text_max_length: 24}
optim: {lr: 5.0e-4, warmup_steps: 1}
ema: {decay: 0.9}
trainer: {accelerator: cpu, devices: 2, max_steps: 4, log_every_n_steps: 2}
checkpoint: {every_n_steps: 2, keep: -1}
data:
  kind: synthetic
  batch_size: 2
  synthetic: {resolution: 32, max_views: 2, tasks: [text2image, canny2image]}
mlflow: {enabled: false}
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from training.config import load_config
    from training.fit import fit

    work = tmp_path_factory.mktemp("ckpts")
    cfg_path = work / "fit.yaml"
    cfg_path.write_text(FIT_YAML)
    cmd = [sys.executable, "-m", "training.fit", "--config", str(cfg_path),
           f"run_dir={work / 'sharded'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fit(load_config(cfg_path, [f"run_dir={work / 'single'}", "trainer.devices=1"]))
    out = {"work": work, "cfg": cfg_path}
    for kind in ("sharded", "single"):
        for step in (2, 4):
            path = work / kind / "checkpoints" / f"step{step:08d}.ckpt"
            assert path.exists(), path
            out[f"{kind}{step}"] = path
    assert out["sharded4"].is_dir() and out["single4"].is_file()
    return out


class _Call:
    """Pickles as ``func(arg)``: what an attacker puts in a checkpoint."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: Path) -> dict[str, object]:
    import builtins

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "system": _Call(os.system, f"touch {marker}"),
        "exec": _Call(builtins.exec, touch),
        "eval": _Call(builtins.eval, touch),
    }


def _crafted_folder(src: Path, dst: Path, payload: object) -> Path:
    """A copy of a genuine sharded checkpoint whose ``.metadata`` is the genuine metadata
    with ``payload`` tucked inside (unpickling it runs the payload)."""
    from training.checkpoint_io import read_dcp_metadata

    shutil.copytree(src, dst)
    metadata = read_dcp_metadata(src)
    metadata.planner_data = {"x": payload}
    (dst / ".metadata").write_bytes(pickle.dumps(metadata))
    return dst


def _one_error_line(err: str, prefix: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def _sample_args(ckpt: Path, out: Path) -> list[str]:
    return ["sample", "--checkpoint", str(ckpt), "--task", "text2image", "--out", str(out),
            "--steps", "1", "--size", "32", "--device", "cpu"]  # fmt: skip


# --------------------------------------------------------------------------- code in a folder


@pytest.mark.slow
def test_control_plain_pickle_of_the_crafted_metadata_runs_code(ckpts, tmp_path):
    """The crafted folders below are real attacks: torch's own reader would run them."""
    from torch.distributed.checkpoint import FileSystemReader

    for name, payload in _payloads(tmp_path / "ran").items():
        marker = tmp_path / "ran"
        folder = _crafted_folder(ckpts["sharded4"], tmp_path / name, payload)
        FileSystemReader(str(folder)).read_metadata()
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["system", "exec", "eval"])
def test_sample_refuses_code_in_metadata(ckpts, tmp_path, capsys, kind):
    from orchestration.cli import main

    marker = tmp_path / "MARKER"
    folder = _crafted_folder(ckpts["sharded4"], tmp_path / "evil.ckpt", _payloads(marker)[kind])
    assert main(_sample_args(folder, tmp_path / "out")) == 1
    line = _one_error_line(capsys.readouterr().err, "onegen sample: error: ")
    name = {"system": "posix.system", "exec": "builtins.exec", "eval": "builtins.eval"}[kind]
    assert f"{folder / '.metadata'} refers to {name}" in line
    assert "refusing to load it" in line
    assert not marker.exists()


@pytest.mark.slow
def test_sample_subprocess_refuses_code_in_metadata(ckpts, tmp_path):
    marker = tmp_path / "MARKER"
    folder = _crafted_folder(ckpts["sharded4"], tmp_path / "evil.ckpt", _payloads(marker)["system"])
    cmd = [sys.executable, "-m", "orchestration.cli", *_sample_args(folder, tmp_path / "out")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr, "onegen sample: error: ")
    assert "refers to posix.system, which a checkpoint may not contain" in line
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "last"])
def test_resume_refuses_code_in_metadata(ckpts, tmp_path, capsys, how):
    """``resume=DIR`` and ``resume=last`` (an unsafe newest checkpoint is not stepped over)."""
    from orchestration.cli import main

    marker = tmp_path / "MARKER"
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    shutil.copytree(ckpts["sharded2"], ckdir / ckpts["sharded2"].name)
    folder = _crafted_folder(ckpts["sharded4"], ckdir / "step00000004.ckpt",
                             _payloads(marker)["exec"])  # fmt: skip
    resume = str(folder) if how == "path" else "last"
    rc = main(["train", "fit", "--config", str(ckpts["cfg"]), f"resume={resume}",
               f"run_dir={tmp_path}"])  # fmt: skip
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "onegen train fit: error: ")
    assert "refers to builtins.exec" in line and "refusing to load it" in line
    assert not marker.exists()


@pytest.mark.slow
def test_lightning_meta_file_with_code_is_refused(ckpts, tmp_path, capsys):
    from orchestration.cli import main

    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil.ckpt"
    shutil.copytree(ckpts["sharded4"], folder)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    meta["onegen"]["x"] = _payloads(marker)["system"]
    torch.save(meta, folder / "meta.pt")
    assert main(_sample_args(folder, tmp_path / "out")) == 1
    line = _one_error_line(capsys.readouterr().err, "onegen sample: error: ")
    assert "meta.pt holds objects a checkpoint may not contain" in line
    assert not marker.exists()


def test_non_tensor_items_load_weights_only(tmp_path):
    """DCP's default planner unpickles non-tensor items freely; ``safe_dcp_load`` does not."""
    import torch.distributed.checkpoint as dcp

    from training.checkpoint_io import safe_dcp_load
    from training.errors import UnsafeCheckpointError

    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil"
    dcp.save({"hp": _payloads(marker)["system"], "w": torch.ones(2)}, checkpoint_id=str(folder),
             no_dist=True)  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
        safe_dcp_load({"hp": None, "w": torch.zeros(2)}, folder, no_dist=True)
    assert not marker.exists()
    good = tmp_path / "good"
    dcp.save({"hp": {"lr": 0.1, "betas": (0.9, 0.95)}, "w": torch.ones(2)},
             checkpoint_id=str(good), no_dist=True)  # fmt: skip
    state = {"hp": {"lr": 0.0, "betas": None}, "w": torch.zeros(2)}  # nested: flattened keys
    safe_dcp_load(state, good, no_dist=True)
    assert state["hp"] == {"lr": 0.1, "betas": (0.9, 0.95)} and torch.equal(
        state["w"], torch.ones(2)
    )


@pytest.mark.slow
def test_storage_paths_outside_the_folder_are_refused(ckpts, tmp_path):
    from training.checkpoint_io import read_dcp_metadata, verify_checkpoint
    from training.errors import UnsafeCheckpointError

    folder = tmp_path / "escape.ckpt"
    shutil.copytree(ckpts["sharded4"], folder)
    metadata = read_dcp_metadata(folder)
    next(iter(metadata.storage_data.values())).relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside its checkpoint folder"):
        verify_checkpoint(folder)


@pytest.mark.parametrize("damage", ["no_storage_map", "offset_not_int", "negative_length"])
def test_malformed_storage_map_is_a_checkpoint_error(ckpts, tmp_path, damage):
    """Metadata that unpickles with allowed classes but describes no real byte ranges is
    corrupt: one CheckpointError, not an AttributeError/TypeError from deeper down."""
    from training.checkpoint_io import read_dcp_metadata, verify_checkpoint
    from training.errors import CheckpointError

    folder = tmp_path / f"{damage}.ckpt"
    shutil.copytree(ckpts["sharded4"], folder)
    metadata = read_dcp_metadata(folder)
    info = next(iter(metadata.storage_data.values()))
    if damage == "no_storage_map":
        metadata.storage_data = None
    elif damage == "offset_not_int":
        info.offset = "0"
    else:
        info.length = -1
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="corrupt DCP metadata"):
        verify_checkpoint(folder)


@pytest.mark.slow
def test_genuine_checkpoints_pass_the_restricted_reader(ckpts, tmp_path, capsys):
    from orchestration.cli import main
    from training.checkpoint_io import read_dcp_metadata

    keys = read_dcp_metadata(ckpts["sharded4"]).state_dict_metadata
    assert any(k.startswith("state_dict.ema.") for k in keys)
    assert any(k.startswith("optimizer_0.") for k in keys)
    assert main(_sample_args(ckpts["sharded4"], tmp_path / "out")) == 0
    assert (tmp_path / "out" / "text2image_grid.png").is_file()


# --------------------------------------------------------------------------- broken checkpoints


def _copy_dir(ckpts: dict, kind: str, dst: Path) -> Path:
    dst.mkdir()
    for step in (2, 4):
        src = ckpts[f"{kind}{step}"]
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / src.name)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,breakage", [("sharded", "no_metadata"), ("sharded", "short_shard"), ("single", "short")]
)
@pytest.mark.parametrize("mode", ["last", "auto"])
def test_broken_newest_checkpoint_falls_back_with_a_warning(
    ckpts, tmp_path, capsys, kind, breakage, mode
):
    from training.config import load_config
    from training.errors import warn
    from training.run.folders import plan_run

    ckdir = _copy_dir(ckpts, kind, tmp_path / "checkpoints")
    newest = ckdir / "step00000004.ckpt"
    if breakage == "no_metadata":
        (newest / ".metadata").unlink()
    elif breakage == "short_shard":
        _truncate(newest / "__1_0.distcp")
    else:
        _truncate(newest)
    cfg = load_config(ckpts["cfg"], [f"resume={mode}", f"run_dir={tmp_path}"])
    assert plan_run(cfg, warn).resume_from == str(ckdir / "step00000002.ckpt")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and "step00000002.ckpt instead" in err


@pytest.mark.slow
def test_resume_last_after_a_truncated_file_continues_from_the_previous(ckpts, tmp_path, capsys):
    """A real single-device resume (Lightning loads the file with weights_only=True)."""
    from training.config import load_config
    from training.fit import fit

    ckdir = _copy_dir(ckpts, "single", tmp_path / "checkpoints")
    _truncate(ckdir / "step00000004.ckpt")
    cfg = load_config(ckpts["cfg"], [
        "trainer.devices=1", "trainer.max_steps=3", "checkpoint.every_n_steps=3",
        "resume=last", f"run_dir={tmp_path}"])  # fmt: skip
    result = fit(cfg)
    assert result.resumed_from == str(ckdir / "step00000002.ckpt") and result.global_step == 3
    assert "skipping checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "single"])
def test_named_broken_checkpoint_is_one_error_line(ckpts, tmp_path, capsys, kind):
    from orchestration.cli import main

    ckdir = _copy_dir(ckpts, kind, tmp_path / "checkpoints")
    newest = ckdir / "step00000004.ckpt"
    _truncate(newest / "__0_0.distcp" if kind == "sharded" else newest)
    rc = main(["train", "fit", "--config", str(ckpts["cfg"]), f"resume={newest}",
               f"run_dir={tmp_path / 'run'}", "trainer.devices=1"])  # fmt: skip
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "onegen train fit: error: ")
    assert ("cut short" if kind == "sharded" else "truncated or corrupt") in line
    assert main(_sample_args(newest, tmp_path / "out")) == 1
    _one_error_line(capsys.readouterr().err, "onegen sample: error: ")


def test_sample_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    from orchestration.cli import main

    assert main(_sample_args(tmp_path / "nope.ckpt", tmp_path / "out")) == 1
    line = _one_error_line(capsys.readouterr().err, "onegen sample: error: ")
    assert "checkpoint not found" in line


@pytest.mark.parametrize("kind", ["text", "fifo", "missing"])
def test_sample_bad_condition_image_is_one_error_line(ckpts, tmp_path, capsys, kind):
    """A condition image that is not an image (or not a file: a FIFO would block) is the
    user's mistake: one line, no traceback, nothing opened."""
    from orchestration.cli import main

    image = tmp_path / f"cond-{kind}.png"
    if kind == "text":
        image.write_text("not an image")
    elif kind == "fifo":
        os.mkfifo(image)
    args = [*_sample_args(ckpts["single4"], tmp_path / "out"), "--task", "canny2image"]
    assert main([*args, "--image", str(image)]) == 1
    line = _one_error_line(capsys.readouterr().err, "onegen sample: error: ")
    assert str(image) in line


@pytest.mark.slow
def test_every_checkpoint_broken_is_an_error_not_a_fresh_start(ckpts, tmp_path):
    from training.config import ConfigError, load_config
    from training.errors import warn
    from training.run.folders import plan_run

    ckdir = _copy_dir(ckpts, "single", tmp_path / "checkpoints")
    for p in ckdir.iterdir():
        _truncate(p)
    cfg = load_config(ckpts["cfg"], ["resume=auto", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no whole checkpoint"):
        plan_run(cfg, warn)


def test_restricted_reader_on_a_dcp_save_folder(tmp_path):
    """Fast twin of the FSDP tests: a folder ``dcp.save`` writes (several dtypes, a memory
    format, nested non-tensor values) reads; the same metadata with code in it does not."""
    import torch.distributed.checkpoint as dcp

    from training.checkpoint_io import SafeFileSystemReader, read_dcp_metadata
    from training.errors import UnsafeCheckpointError

    folder = tmp_path / "plain"
    state = {
        "a": torch.zeros(3, dtype=torch.bfloat16),
        "b": torch.arange(4),
        "c": torch.zeros(1, 3, 2, 2).to(memory_format=torch.channels_last),
        "hp": {"lr": 0.1, "betas": (0.9, 0.95)},
    }
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    metadata = read_dcp_metadata(folder)
    assert metadata.state_dict_metadata["a"].properties.dtype == torch.bfloat16
    SafeFileSystemReader(str(folder)).read_metadata()
    marker = tmp_path / "MARKER"
    for name, payload in _payloads(marker).items():
        metadata.planner_data = {"x": payload}
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(UnsafeCheckpointError, match="which a checkpoint may not contain"):
            SafeFileSystemReader(str(folder)).read_metadata()
        assert not marker.exists(), name
