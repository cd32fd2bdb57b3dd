"""``onegen eval --benchmark t2i``: a local CLIP saved in the published format (random tiny
weights: mechanics only), its CLIP score against torchmetrics' ``CLIPScore`` on the same
folder, and the benchmark end to end: GenEval's output layout, CLIP score, FD-CLIP against a
reference folder, resuming per prompt, and bad inputs as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.eval_cli import eval_cli
from tests.helpers.tiny_clip import save_tiny_clip

PROMPTS = [
    {
        "tag": "single_object",
        "include": [{"class": "cat", "count": 1}],
        "prompt": "a photo of a cat",
    },
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog and a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1}], "prompt": "a red car"},
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


class _Projections(torch.nn.Module):
    """transformers 5's CLIPModel returns outputs from get_*_features; torchmetrics wants the
    projected tensors."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *a, **k):
        return self.model.get_image_features(*a, **k).pooler_output

    def get_text_features(self, *a, **k):
        return self.model.get_text_features(*a, **k).pooler_output


def test_clip_score_matches_torchmetrics_per_pair(clip):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from training.evaluation import metrics as M
    from training.evaluation.scorers import ClipScorer

    scorer = ClipScorer(clip)
    reference = CLIPScore(
        model_name_or_path=lambda: (
            _Projections(CLIPModel.from_pretrained(clip)),
            CLIPProcessor.from_pretrained(clip),
        )
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)]
    texts = ["a red cat", "two dogs on a sofa", "x", "a bench in a park at night"]
    ours = [
        M.clip_score(scorer.images([i]), scorer.texts([t]))
        for i, t in zip(images, texts, strict=True)
    ]
    theirs = []
    for image, text in zip(images, texts, strict=True):
        reference.reset()
        theirs.append(float(reference(torch.from_numpy(image).permute(2, 0, 1), text).detach()))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert any(o > 0 for o in ours)  # a pair the clamp does not zero
    embeds = scorer.texts(texts)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-12)


def _prompts(folder: Path) -> Path:
    path = folder / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _args(run, path: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", run["run"], "--benchmark", "t2i", "--path", str(path),
            "--out", str(out), "--steps", "2", "--size", "32", "--device", "cpu", *extra]  # fmt: skip


def test_t2i_end_to_end_geneval_layout_clip_and_fd(run, clip, tmp_path, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            reference / f"{i}.jpg"
        )
    out = tmp_path / "t2i"
    args = _args(run, _prompts(tmp_path), out, "--clip", str(clip), "--reference", str(reference))
    code, stdout, err = eval_cli(capsys, *args)
    assert code == 0, err
    for i, record in enumerate(PROMPTS):  # GenEval's evaluate_images.py input
        folder = out / "images" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == record
        assert Image.open(folder / "samples" / "00000.png").size == (32, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    t2i = metrics["tasks"]["text2image"]
    assert t2i["n"] == 3 and 0 <= t2i["clip_score"] <= 100
    assert t2i["fd_clip"] >= 0 and t2i["fd_images"] == 3
    assert "GenEval" in (out / "report.md").read_text() and (out / "grid.png").is_file()
    assert (out / "reference_features.npz").is_file()
    # resume: one prompt lost, only it runs again; the same image and scores come back
    lost = sorted((out / "samples").glob("*.json"))[1]
    png = out / "images" / "00001" / "samples" / "00000.png"
    before, pixels = json.loads(lost.read_text()), np.asarray(Image.open(png))
    lost.unlink()
    code, _, err = eval_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(lost.read_text()) == before
    assert np.array_equal(np.asarray(Image.open(png)), pixels)
    assert json.loads((out / "metrics.json").read_text())["tasks"] == metrics["tasks"]


def test_t2i_without_clip_writes_images_only(run, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\na dog\n")
    code, _, err = eval_cli(capsys, *_args(run, path, tmp_path / "o"))
    assert code == 0, err
    assert (tmp_path / "o" / "images" / "00001" / "samples" / "00000.png").is_file()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["done"] == 2


def test_bad_t2i_inputs_are_one_line(run, clip, tmp_path, capsys):
    prompts = _prompts(tmp_path)

    def fails(code_expected: int, expect: str, path: Path, *extra: str) -> None:
        code, _, err = eval_cli(capsys, *_args(run, path, tmp_path / "o", *extra))
        lines = err.strip().splitlines()
        assert code == code_expected and expect in lines[-1], lines

    fails(2, "--reference needs --clip", prompts, "--reference", str(tmp_path))
    fails(1, "not a CLIP folder (expected config.json", prompts, "--clip", str(tmp_path))
    fails(
        2, "--clip is for --benchmark t2i", prompts, "--clip", str(clip), "--benchmark", "gso-nvs"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + '{"text": "no prompt key"}\n')
    fails(2, 'bad.jsonl:2: expected an object with a "prompt" string', bad)
    fails(2, "not a prompt file", tmp_path / "missing.txt")
