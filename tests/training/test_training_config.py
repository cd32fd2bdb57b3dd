"""Strict fit configs: an unknown key or a wrong type is one line naming the key and the
closest valid one, exit 2, before any work (no run folder, no MLflow run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO

DEMO = REPO / "training" / "configs" / "demo.yaml"


def _fit_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``onegen train fit`` in a subprocess, from ``tmp_path``: nothing may appear there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "train", "fit", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("onegen train fit: error: "), proc.stderr
    return lines[-1]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_step=5", "trainer.max_step: unknown key; did you mean trainer.max_steps?"),
        ("optim.lr=fast", "optim.lr: value 'fast' of type 'str' could not be converted to Float"),
        ("data.batch_sise=3", "data.batch_sise: unknown key; did you mean data.batch_size?"),
        ("mlflow.experiment=x", "mlflow.experiment: unknown key; it moved to experiment"),
        ("trainer.strategy=ddp", "trainer.strategy: must be one of auto, fsdp, single; got 'ddp'"),
        ("data.buckets=[[64, 60]]", "data.buckets: [64, 60] must be [H, W], multiples of 16"),
    ],
)
def test_bad_override_is_one_line_exit_2_and_nothing_written(tmp_path, override, expected):
    proc = _fit_cli(tmp_path, "--config", str(DEMO), override)
    assert proc.returncode == 2
    assert expected in _error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no mlflow.db


def test_unknown_key_in_the_yaml_file_names_the_file_and_the_key(tmp_path):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(DEMO.read_text().replace("  max_steps: 40", "  max_step: 40"))
    proc = _fit_cli(tmp_path, "--config", str(cfg))
    assert proc.returncode == 2
    assert _error_line(proc).endswith(
        f"{cfg}: trainer.max_step: unknown key; did you mean trainer.max_steps?"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.yaml"]


def test_print_config_shows_the_resolved_config(tmp_path):
    proc = _fit_cli(tmp_path, "--config", str(DEMO), "trainer.max_steps=7", "--print-config")
    assert proc.returncode == 0, proc.stderr
    shown = OmegaConf.create(proc.stdout)
    assert shown.trainer.max_steps == 7 and shown.experiment == "onegen-demo"
    assert shown.mlflow.tracking_uri == "sqlite:///mlflow.db"  # resolved, not null
    assert shown.optim.betas == [0.9, 0.95] and "run_dir" in shown  # every key, defaults too
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_shipped_config_loads_and_round_trips():
    from training.config import load_config, to_yaml

    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        again = OmegaConf.create(to_yaml(cfg))
        assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg), path


def test_types_are_checked_in_nested_nodes():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^override data.mix.t2i: value 'lots'"):
        load_config(None, ["data.mix={t2i: lots}"])
    with pytest.raises(ConfigError, match=r"^trainer.devices: an integer or auto; got 2.5"):
        load_config(None, ["trainer.devices=2.5"])
    with pytest.raises(ConfigError, match=r"^samples.tasks: unknown task 'image2cat'"):
        load_config(None, ["samples.tasks=[text2image, image2cat]"])
    assert load_config(None, ["trainer.devices=auto"]).trainer.devices == "auto"


def test_checkpoint_configs_of_older_schemas_still_load():
    """A checkpoint outlives config changes: keys the schema dropped are ignored when
    sampling from it, known ones keep their values."""
    from training.config import from_checkpoint

    old = "name: x\nrun_dir: runs/x\nmodel: {config: tiny}\nmlflow: {experiment: old}\n"
    cfg = from_checkpoint(old)
    assert cfg.model.config == "tiny" and cfg.name == "x" and "experiment" not in cfg.mlflow
