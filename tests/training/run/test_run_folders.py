"""A folder per run and resume by run: real single-process fits (synthetic data) into
``runs/<experiment>/<run name>/``, tracked in a real sqlite MLflow store; and the README's
training commands run in the order it gives them, on real demo-format shards."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, depth_pose_shards

FIT_YAML = """
name: folders
experiment: folders-test
seed: 1
model: {config: tiny}
encoders: {kind: tiny, text_max_length: 24}
trainer: {accelerator: cpu, devices: 1, max_steps: 2, log_every_n_steps: 1}
checkpoint: {every_n_steps: 2}
data:
  kind: synthetic
  batch_size: 2
  synthetic: {resolution: 32, max_views: 2, tasks: [text2image, canny2image]}
mlflow: {system_metrics: false}
"""


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fit.yaml").write_text(FIT_YAML)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _fit(*overrides: str):
    from training.config import load_config
    from training.fit import fit

    return fit(load_config("fit.yaml", list(overrides)))


def test_each_fit_gets_its_own_folder_and_resume_last_takes_the_newest(work):
    from mlflow.tracking import MlflowClient

    first = _fit()
    second = _fit()
    runs = sorted(p.name for p in (work / "runs" / "folders-test").iterdir())
    assert len(runs) == 2 and first.run_dir != second.run_dir
    for result in (first, second):
        folder = Path(result.run_dir)
        assert re.fullmatch(r"folders-\d{8}-\d{6}(-\d+)?", folder.name)
        assert (folder / "checkpoints" / "step00000002.ckpt").is_file()
        assert (folder / "config.yaml").is_file() and (folder / "logs" / "fit.log").is_file()
        assert json.loads((folder / "run.json").read_text())["run_name"] == folder.name
        assert "done: step 2" in (folder / "logs" / "fit.log").read_text()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    names = {client.get_run(r.run_id).info.run_name for r in (first, second)}
    assert names == {Path(first.run_dir).name, Path(second.run_dir).name}

    resumed = _fit("resume=last", "trainer.max_steps=3")
    assert resumed.run_dir == second.run_dir and resumed.global_step == 3
    assert resumed.run_id == second.run_id  # the same MLflow run goes on
    assert (Path(second.run_dir) / "config.resume-step00000002.yaml").is_file()

    by_name = _fit(f"resume={Path(first.run_dir).name}", "trainer.max_steps=4")
    assert by_name.run_dir == first.run_dir and by_name.global_step == 4
    assert by_name.resumed_from.endswith("step00000002.ckpt")
    assert len(list((work / "runs" / "folders-test").iterdir())) == 2


def test_a_fresh_fit_never_writes_into_a_folder_with_checkpoints(work, capsys):
    from orchestration.cli import main

    first = _fit("run_name=taken")
    assert Path(first.run_dir).name == "taken"
    rc = main(["train", "fit", "--config", "fit.yaml", "run_name=taken"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("onegen train fit: error: ") and "already holds the checkpoints" in err
    assert "resume=last" in err
    assert sorted(p.name for p in (Path(first.run_dir) / "checkpoints").iterdir()) == [
        "step00000002.ckpt"
    ]


def test_resume_of_an_unknown_run_names_the_runs_there_are(work, capsys):
    from orchestration.cli import main

    _fit("run_name=alpha")
    rc = main(["train", "fit", "--config", "fit.yaml", "resume=beta"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "resume=beta: no such checkpoint, run folder or run" in err and "alpha" in err


def test_a_different_model_is_refused_on_resume(work, capsys):
    from orchestration.cli import main

    _fit("run_name=small")
    rc = main(["train", "fit", "--config", "fit.yaml", "resume=last", "model.overrides={depth: 3}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a different model (depth" in err


# --------------------------------------------------------------------------- the README


def readme_training_commands() -> list[list[str]]:
    """The ``onegen train fit`` / ``onegen sample`` lines of the README's Training block,
    in order, comments dropped (the 2.8B one and those on /models/OneDiffusion need a GPU
    cluster or the released weights: left out)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Training\n", 1)[1].split("```", 2)[1]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        # the 2.8B and the released-folder lines need a GPU cluster or the release's weights
        if (
            line.startswith("onegen ")
            and "onediffusion-2.8b" not in line
            and "/models/" not in line
        ):
            commands.append(shlex.split(line))
    return commands


@pytest.mark.slow
def test_the_readme_training_commands_run_in_order(tmp_path):
    """Each command as the README writes it, from a folder laid out like the repo (the demo
    config, demo-format shards in data/demo), with overrides appended only to keep it short
    (steps, checkpoint interval, no sample grids, no loader workers)."""
    commands = readme_training_commands()
    assert [c[1] for c in commands] == ["train"] * 4 + ["sample"], commands
    (tmp_path / "training" / "configs").mkdir(parents=True)
    shutil.copy(REPO / "training/configs/demo.yaml", tmp_path / "training/configs/demo.yaml")
    depth_pose_shards.write_all(str(tmp_path / "data" / "demo"))
    Image.new("RGB", (64, 64), (90, 140, 200)).save(tmp_path / "in.jpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    short = ["checkpoint.every_n_steps=2", "samples.every_n_steps=0", "data.num_workers=0",
             "mlflow.system_metrics=false"]  # fmt: skip
    steps = iter([2, 2, 4])
    for argv in commands:
        args = argv[1:]
        if args[0] == "train" and "--print-config" not in args:
            args = args + short + [f"trainer.max_steps={next(steps)}"]
        if args[0] == "sample":
            ckpts = sorted((tmp_path / "runs" / "onegen-demo").glob("*/checkpoints/*.ckpt"))
            newest = max(ckpts, key=lambda p: p.stat().st_mtime)
            args = [newest.as_posix() if "<run>" in a else a for a in args] + ["--steps", "2"]
        proc = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"{' '.join(argv)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    runs = sorted((tmp_path / "runs" / "onegen-demo").iterdir())
    assert len(runs) == 2  # two fits, two folders; resume=last continued the second
    newest = max(runs, key=lambda p: json.loads((p / "run.json").read_text())["started"])
    assert (newest / "checkpoints" / "step00000004.ckpt").is_file()  # 1 process, after 2
    assert (newest / "checkpoints" / "step00000002.ckpt").is_dir()  # sharded by the 2
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())
