"""``onegen eval --benchmark unsplash50-id``: ArcFace's IResNet in arcface_torch's keys (a
tiny one saved as ``backbone.pth``), a random one-class face YOLO saved as ultralytics saves it
(``detector.pt``; mechanics only: its faces are meaningless), a tiny CLIP, and the benchmark
end to end on a folder of reference photos and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.eval_cli import eval_cli
from tests.helpers.tiny_face import save_face_folder, tiny_arcface
from training.config import ConfigError
from training.evaluation.arcface import load_arcface, shape_of

# The keys of arcface_torch's iresnet (recognition/arcface_torch/backbones/iresnet.py) with one
# block per stage: stem, each block's bn1 conv1 bn2 prelu conv2 bn3 (+ downsample conv / bn),
# bn2, fc, features (BatchNorm1d).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _published_keys() -> set[str]:
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{m}.{p}" for m in ("bn1", "bn2", "features") for p in _BN}
    for k in range(1, 5):
        b = f"layer{k}.0"
        keys |= {
            f"{b}.conv1.weight",
            f"{b}.conv2.weight",
            f"{b}.prelu.weight",
            f"{b}.downsample.0.weight",
        }
        keys |= {f"{b}.{m}.{p}" for m in ("bn1", "bn2", "bn3", "downsample.1") for p in _BN}
    return keys


def test_arcface_keys_and_loading(tmp_path):
    net = tiny_arcface()
    assert set(net.state_dict()) == _published_keys()
    torch.save(net.state_dict(), tmp_path / "backbone.pth")
    loaded = load_arcface(tmp_path / "backbone.pth")
    assert shape_of(loaded.state_dict()) == ((1, 1, 1, 1), (8, 8, 16, 16), 8, 16)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x)) and loaded(x).shape == (2, 16)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not an arcface_torch IResNet backbone"):
        load_arcface(tmp_path / "bad.pth")


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> Path:
    return save_face_folder(tmp_path_factory.mktemp("face"))


def _subjects(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("ava", "ben"):
        Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(
            folder / f"{name}.jpg"
        )
    (folder / "prompts.txt").write_text("a person in a red coat\n\na person at the beach\n")
    return folder


def _args(run, path: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", run["run"], "--benchmark", "unsplash50-id", "--path", str(path),
            "--out", str(out), "--steps", "2", "--size", "32", "--device", "cpu", *extra]  # fmt: skip


def test_unsplash50_id_end_to_end(run, face, tmp_path, capsys):
    from tests.helpers.tiny_clip import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "id"
    path = _subjects(tmp_path / "unsplash")
    code, _, err = eval_cli(
        capsys, *_args(run, path, out, "--face", str(face), "--clip", str(clip))
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    per = metrics["tasks"]["faceid"]
    assert per["n"] == 4 and metrics["done"] == 4  # 2 subjects x 2 prompts
    assert -1 <= per["id_sim"] <= 1 and 0 <= per["face_found"] <= 1 and 0 <= per["clip_t"] <= 100
    assert metrics["paper"] == {"id_sim": 0.283, "clip_t": 26.8}
    ids = sorted(json.loads(p.read_text())["id"] for p in (out / "samples").glob("*.json"))
    assert ids == ["ava/000", "ava/001", "ben/000", "ben/001"]
    assert "Table 3" in (out / "report.md").read_text()


def test_bad_id_inputs_are_one_line(run, face, tmp_path, capsys):
    path = _subjects(tmp_path / "unsplash")

    def fails(code_expected: int, expect: str, where: Path, *extra: str) -> None:
        code, _, err = eval_cli(capsys, *_args(run, where, tmp_path / "o", *extra))
        lines = err.strip().splitlines()
        assert code == code_expected and expect in lines[-1], lines

    fails(2, "needs --face", path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "backbone.pth").write_bytes((face / "backbone.pth").read_bytes())
    fails(1, "no detector.pt (expected backbone.pth", path, "--face", str(half))
    fails(2, "expected prompts.txt", tmp_path, "--face", str(face))
    fails(
        2,
        "--face is for --benchmark unsplash50-id",
        path,
        "--face",
        str(face),
        "--benchmark",
        "t2i",
    )
