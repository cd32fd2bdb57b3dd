"""``onegen sample`` checks its inputs before it reads any weights, and writes only its PNGs.

Usage errors (a task there is not, a missing or needless ``--image``, a ``--size`` off the
patch grid, a task the checkpoint never trained) are one ``onegen sample: error:`` line with
exit code 2, no traceback, no ``--out`` folder. A checkpoint from a real tiny fit on the
synthetic tasks text2image, canny2image and depth2image, made once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PREFIX = "onegen sample: error: "
TRAINED = ["text2image", "canny2image", "depth2image"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from training.config import load_config
    from training.fit import fit

    tmp = tmp_path_factory.mktemp("sample-cli")
    cfg = load_config(None, [
        "data.kind=synthetic", "data.batch_size=2", "data.synthetic.resolution=32",
        f"data.synthetic.tasks=[{','.join(TRAINED)}]", "trainer.max_steps=2",
        "checkpoint.every_n_steps=2", f"runs_dir={tmp}/runs", "mlflow.enabled=false",
        "encoders.text_max_length=24", "samples.resolution=32",
    ])  # fmt: skip
    path = Path(fit(cfg).checkpoint_dir) / "step00000002.ckpt"
    assert path.exists(), path
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("sample-img") / "cond.png"
    Image.new("RGB", (40, 36), (200, 30, 90)).save(path)
    return path


def _error_line(err: str) -> str:
    """The one error line (argparse's own errors print the usage above it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and errors[0] == lines[-1] and lines[-1].startswith(PREFIX), err
    return lines[-1]


def _run(args: list[str], capsys) -> tuple[int, str]:
    """``onegen sample ARGS`` in process: (exit code, its one error line)."""
    from orchestration.cli import main

    try:
        rc = main(["sample", *args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, _error_line(capsys.readouterr().err)


def test_help_lists_every_task(capsys):
    from orchestration.cli import main
    from training.data.tasks import all_task_names

    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help text wraps anywhere
    for name in all_task_names():
        assert f" {name}," in text or f" {name} " in text, name


def test_unknown_task_is_argparse_error(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(out)]
    rc, line = _run([*args, "--task", "image2sketch"], capsys)
    assert rc == 2 and "--task: invalid choice: 'image2sketch'" in line, line
    assert "image2depth" in line and "pose2image" in line  # the choices are listed
    assert not out.exists()


def _missing(tmp_path: Path) -> list[str]:
    """Arguments naming a checkpoint that does not exist: never read, the usage is wrong."""
    return ["--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "depth2image"], "--task depth2image needs --image: the depth.png condition "
         "(a depth map, view 1) to generate a photo"),
        (["--task", "[[depth2image]]"], "--task depth2image needs --image: the depth.png"),
        (["--task", "image2pose"], "--task image2pose needs --image: the jpg condition (a photo"),
        (["--task", "canny2image"], "needs --image: the canny.png condition (a canny map"),
        (["--task", "text2image", "--image", "x.jpg"], "from the prompt alone: drop --image"),
        (["--task", "text2image", "--size", "0"], "--size must be a positive number"),
        (["--task", "text2image", "--size", "-32"], "--size must be a positive number"),
        (["--task", "text2image", "--steps", "0"], "--steps must be at least 1"),
        (["--task", "text2image", "--device", "gpu7"], "--device 'gpu7' is not a device"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_before_the_checkpoint(tmp_path, capsys, extra, message):
    rc, line = _run([*_missing(tmp_path), *extra], capsys)
    assert rc == 2 and message in line, line
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    rc, line = _run(["--checkpoint", "x.ckpt", "--out", str(out), "--task", "text2image"], capsys)
    assert rc == 2 and f"--out {out} exists and is not a folder" in line, line
    assert out.read_text() == "mine"


def test_missing_checkpoint_is_still_exit_1(tmp_path, capsys):
    rc, line = _run([*_missing(tmp_path), "--task", "text2image", "--size", "32"], capsys)
    assert rc == 1 and "checkpoint not found" in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_weights(monkeypatch):
    """Reading the weights fails the test: these checks must come before it."""
    import training.inference.sample

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(training.inference.sample, "load_weights", refuse)


@pytest.mark.parametrize("size", ["40", "24", "8"])
def test_size_off_the_patch_grid_is_refused_before_the_weights(
    ckpt, tmp_path, capsys, no_weights, size
):
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--task", "text2image"]
    rc, line = _run([*args, "--size", size], capsys)
    assert rc == 2, line
    assert f"--size {size} is not a multiple of 16" in line, line
    assert not out.exists()


def test_untrained_task_is_refused_before_the_weights(ckpt, photo, tmp_path, capsys, no_weights):
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--image", str(photo)]
    rc, line = _run([*args, "--task", "pose2image", "--size", "32"], capsys)
    assert rc == 2, line
    assert "--task pose2image was never trained" in line, line
    assert line.endswith(f"its config trains {', '.join(TRAINED)}"), line
    rc, line = _run([*args, "--task", "image2depth"], capsys)  # the reverse was not trained
    assert rc == 2 and "--task image2depth was never trained" in line, line
    assert not out.exists()


def test_a_run_leaves_only_the_reported_pngs(ckpt, tmp_path, capsys, monkeypatch):
    """In process: the tiny vocabulary went to a temporary folder, removed afterwards."""
    import tempfile

    from orchestration.cli import main

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    rc = main(["sample", "--checkpoint", str(ckpt), "--task", "text2image", "--out", str(out),
               "--steps", "1", "--size", "32", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    reported = [ln.removeprefix("wrote ") for ln in captured.out.splitlines()]
    assert sorted(os.listdir(out)) == sorted(Path(p).name for p in reported)
    assert sorted(os.listdir(out)) == ["text2image_grid.png", "text2image_view0_generated.png"]
    assert os.listdir(scratch) == []


@pytest.mark.slow
def test_subprocess_sample_writes_only_what_it_reports(ckpt, photo, tmp_path):
    """``python -m orchestration.cli sample`` end to end, the task given as its token."""
    out = tmp_path / "nested" / "out"
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "orchestration.cli", "sample", "--checkpoint", str(ckpt),
           "--task", "[[depth2image]]", "--image", str(photo), "--out", str(out),
           "--steps", "1", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reported = [ln.removeprefix("wrote ") for ln in proc.stdout.splitlines()]
    assert all(Path(p).parent == out for p in reported), proc.stdout
    names = ["depth2image_grid.png", "depth2image_view0_generated.png",
             "depth2image_view1_condition.png"]  # fmt: skip
    assert sorted(Path(p).name for p in reported) == names
    assert sorted(os.listdir(out)) == names  # nothing hidden beside them
    assert sorted(os.listdir(tmp_path)) == ["nested"]  # nor in the working folder


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("faceid", "[[faceid]] [[img0]] a man in a suit [[img1]]"),  # the release's PROMPT_GUIDE
        ("text2image", "[[text2image]] a man in a suit"),
        ("image2depth", "[[depth2image]] a man in a suit"),
    ],
)
def test_sample_prompts_are_the_trainers(task, expected):
    """The prompt a sample (and ``onegen eval``) sends is the one the trainer builds for that
    task's two-view sample: faceid's image markers included."""
    from training.data.tasks import build_prompt, task_spec
    from training.inference.sample import normalise_task, sample_prompt

    assert sample_prompt(task, "a man in a suit") == expected
    if task == "faceid":
        spec = task_spec(normalise_task(task), num_views=2)
        assert build_prompt(spec, ["a man in a suit", ""]) == expected
