"""``onegen sample --weights``: sampling from a released (or ``onegen export``-ed) folder.

A real tiny fit's checkpoint is exported (bf16, the default) once per module, alone and with
a released pipeline's tiny encoders beside it (``--components``); every task kind
``onegen sample`` runs then samples from the folder. The tiny weights' images mean nothing:
what is checked is that each run writes its PNGs, the weights arrive in fp32 as they were
exported, and each wrong request is one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.training.test_export import checkpoint_net, forward, make_checkpoint, write_components

PREFIX = "onegen sample: error: "


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    from training.export import export_checkpoint

    tmp = tmp_path_factory.mktemp("sample-weights")
    _, ckpt = make_checkpoint(tmp)
    components = write_components(tmp / "OneDiffusion")
    return {
        "ckpt": ckpt,
        "bare": export_checkpoint(ckpt, tmp / "bare").out,
        "pipeline": export_checkpoint(ckpt, tmp / "pipeline", components=components).out,
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sample-weights-img")
    paths = []
    for i, colour in enumerate([(200, 30, 90), (20, 160, 60)]):
        paths.append(folder / f"view{i}.png")
        Image.new("RGB", (40, 32), colour).save(paths[-1])
    return paths


def _run(args: list[str], capsys) -> tuple[int, list[str], str]:
    """``onegen sample ARGS`` in process: (exit code, the files it wrote, its one error line)."""
    from orchestration.cli import main

    try:
        rc = main(["sample", *args])
    except SystemExit as exc:  # argparse
        rc = int(exc.code)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    errors = [ln for ln in captured.err.splitlines() if "error" in ln]
    assert len(errors) <= 1, captured.err
    wrote = [
        ln.removeprefix("wrote ") for ln in captured.out.splitlines() if ln.startswith("wrote")
    ]
    return rc, wrote, errors[0] if errors else ""


def _sample(folder: Path, out: Path, *args: str) -> list[str]:
    return ["--weights", str(folder), "--out", str(out), "--steps", "1", "--size", "32",
            "--device", "cpu", *args]  # fmt: skip


@pytest.mark.parametrize(
    ("task", "images", "extra", "names"),
    [
        ("text2image", 0, [], ["text2image_grid.png", "text2image_view0_generated.png"]),
        ("depth2image", 1, [], ["depth2image_grid.png", "depth2image_view0_generated.png",
                                "depth2image_view1_condition.png"]),
        ("multiview", 1, ["--azimuths", "0,90"], ["multiview_grid.png",
                                                   "multiview_view0_condition.png",
                                                   "multiview_view1_generated.png",
                                                   "transforms.json"]),
        ("camera_pose", 2, [], ["camera_pose_grid.png", "transforms.json"]),
    ],
)  # fmt: skip
def test_every_kind_of_task_samples_from_an_exported_folder(
    exported, photos, tmp_path, capsys, task, images, extra, names
):
    out = tmp_path / "out"
    given = [a for p in photos[:images] for a in ("--image", str(p))]
    args = _sample(exported["bare"], out, "--encoders", "tiny", "--task", task, *given, *extra)
    rc, wrote, err = _run(args, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == sorted(Path(p).name for p in wrote) == names
    for name in names:
        if name.endswith("view0_generated.png"):
            assert Image.open(out / name).size == (32, 32)


def test_the_transformer_folder_and_the_folders_own_encoders(exported, tmp_path, capsys):
    out = tmp_path / "t"
    transformer = exported["bare"] / "transformer"
    rc, wrote, err = _run(_sample(transformer, out, "--encoders", "tiny", "--task", "text2image"),
                          capsys)  # fmt: skip
    assert rc == 0 and len(wrote) == 2, err
    out = tmp_path / "own"  # vae/, text_encoder/, tokenizer/ beside transformer/
    rc, wrote, err = _run(_sample(exported["pipeline"], out, "--task", "[[text2image]]"), capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["text2image_grid.png", "text2image_view0_generated.png"]


def test_a_bf16_export_loads_in_fp32_on_cpu_as_the_checkpoint(exported):
    from training.inference.weights import ReleaseWeights

    source = ReleaseWeights(exported["bare"], "tiny")
    cfg, mcfg, stride = source.read("text2image")
    assert stride == (16, 16) and cfg.encoders.kind == "tiny"
    net, _ = source.load(cfg, mcfg, "cpu")
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert {p.device.type for p in net.parameters()} == {"cpu"} and not net.training
    ckpt = checkpoint_net(exported["ckpt"])
    for (name, got), want in zip(net.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(got, want.to(torch.bfloat16).float()), name
    rounded = checkpoint_net(exported["ckpt"])
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert torch.equal(forward(net)[0], forward(rounded)[0])


def test_checkpoint_and_weights_together_is_argparse_exit_2(exported, tmp_path, capsys):
    args = ["--checkpoint", str(exported["ckpt"]), "--weights", str(exported["bare"]),
            "--task", "text2image", "--out", str(tmp_path / "out")]  # fmt: skip
    rc, _, line = _run(args, capsys)
    assert rc == 2 and "argument --weights: not allowed with argument --checkpoint" in line, line
    rc, _, line = _run(["--task", "text2image", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "one of the arguments --checkpoint --weights is required" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--encoders", "pretrained"], 2, "has no vae/, text_encoder/, tokenizer/: pass "
                                          "--encoders tiny"),
        ([], 2, "has no vae/, text_encoder/, tokenizer/: pass --encoders tiny"),
        (["--no-ema"], 2, "--ema/--no-ema choose a --checkpoint's weights"),
    ],
)  # fmt: skip
def test_a_folder_without_encoders_or_a_checkpoint_flag_is_one_line(
    exported, tmp_path, capsys, args, code, message
):
    out = tmp_path / "out"
    rc, _, line = _run([*_sample(exported["bare"], out, "--task", "text2image"), *args], capsys)
    assert rc == code and line.startswith(PREFIX) and message in line, line
    assert not out.exists()


def test_encoders_with_a_checkpoint_is_one_line(exported, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(exported["ckpt"]), "--encoders", "tiny", "--task", "text2image",
            "--out", str(out)]  # fmt: skip
    rc, _, line = _run(args, capsys)
    assert rc == 2 and line == PREFIX + (
        "--encoders is for --weights; a --checkpoint's config names its encoders"
    ), line
    assert not out.exists()


def test_a_folder_that_is_not_a_release_is_one_line(exported, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, line = _run(_sample(tmp_path, out, "--encoders", "tiny", "--task", "text2image"),
                       capsys)  # fmt: skip
    assert rc == 1 and line == (
        f"{PREFIX}--weights {tmp_path}: neither config.json nor transformer/config.json "
        "(the release's layout)"
    ), line
    rc, _, line = _run(_sample(tmp_path / "nope", out, "--task", "text2image"), capsys)
    assert rc == 1 and "nope: not a folder" in line, line
    assert not out.exists()
