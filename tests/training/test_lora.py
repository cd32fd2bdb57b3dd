"""LoRA fine-tuning: only the adapters train (the base is bit-identical after steps), the
checkpoints hold adapters, their EMA and the base's identity, resume is exact, under FSDP2
too and on another process count, and every bad input is one line before anything starts.

The base is a tiny folder in the release's exact layout (``test_init_from``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.fit_states import assert_restored
from tests.training.test_init_from import (
    PREFIX,
    TINY_RELEASE_CONFIG,
    _cli,
    _ours,
    _overrides,
    write_release_folder,
)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("lora-base") / "OneDiffusion"
    return root, write_release_folder(root, TINY_RELEASE_CONFIG)


def _lora(tmp: Path, root: Path, *extra: str) -> list[str]:
    return _overrides(tmp, f"model.init_from={root}", "model.config=from_init", "lora.rank=4",
                      "lora.alpha=8", "optim.lr=1e-2", *extra)  # fmt: skip


def _fit(tmp: Path, root: Path, *extra: str):
    from training.config import load_config
    from training.fit import fit

    return fit(load_config(None, _lora(tmp, root, *extra)))


def _end(report: Path) -> dict:
    return torch.load(report / "end_state.pt", weights_only=True)


def test_lora_trains_only_the_adapters_and_checkpoints_them_alone(release, tmp_path):
    from training.lora import base_name, is_adapter

    root, tensors = release
    report = tmp_path / "report"
    result = _fit(tmp_path, root, "trainer.max_steps=3", "checkpoint.every_n_steps=3",
                  f"debug.report_dir={report}")  # fmt: skip
    end = _end(report)
    ours = _ours(tensors)
    base = {k: v for k, v in end["model"].items() if k.startswith("model.") and not is_adapter(k)}
    assert {base_name(k)[len("model.") :] for k in base} == set(ours)
    for key, value in base.items():  # frozen: bit-identical to the folder after 3 steps
        assert torch.equal(value, ours[base_name(key)[len("model.") :]]), key
    lora_b = [v for k, v in end["model"].items() if k.startswith("model.") and ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # zero at init, trained since
    assert set(end["optimizer"]["state"]) == {k for k in end["model"] if "lora_" in k and
                                             k.startswith("model.")}  # fmt: skip
    start = json.loads((report / "start.json").read_text())
    assert start["ema_equals_model"] and start["n_optimizer_params"] == len(lora_b) * 2

    ckpt = torch.load(Path(result.checkpoint_dir) / "step00000003.ckpt", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(is_adapter(k) for k in keys)  # no base tensor in the checkpoint
    assert {k for k in keys if k.startswith("ema.")} and {k for k in keys if k.startswith("model.")}
    record = ckpt["onegen"]["lora_base"]
    assert record["path"] == str((root / "transformer").resolve())
    assert list(record["sha256"]) == ["diffusion_pytorch_model.safetensors"]


def test_lora_starts_as_its_base_first_loss_equal_to_a_full_fine_tune(release, tmp_path):
    root, _ = release
    lora = tmp_path / "lora"
    _fit(tmp_path, root, f"debug.report_dir={lora}", "run_name=lora")
    full = tmp_path / "full"
    _fit(tmp_path, root, "lora.rank=0", f"debug.report_dir={full}", "run_name=full")
    first = json.loads((lora / "end.json").read_text())["losses"][0]
    assert first == pytest.approx(json.loads((full / "end.json").read_text())["losses"][0], 1e-6)


def test_lora_resume_equals_an_uninterrupted_run(release, tmp_path):
    root, _ = release
    _fit(tmp_path, root, "trainer.max_steps=4", "checkpoint.every_n_steps=4", "run_name=A",
         f"debug.report_dir={tmp_path / 'A'}")  # fmt: skip
    _fit(tmp_path, root, "trainer.max_steps=2", "checkpoint.every_n_steps=2", "run_name=B")
    resumed = _fit(tmp_path, root, "trainer.max_steps=4", "checkpoint.every_n_steps=2",
                   "run_name=B", "resume=last", f"debug.report_dir={tmp_path / 'B'}")  # fmt: skip
    assert resumed.resumed_from and resumed.resumed_from.endswith("step00000002.ckpt")
    a, b = _end(tmp_path / "A"), _end(tmp_path / "B")
    assert set(a["model"]) == set(b["model"])
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-6)
    ema_moved = max(
        (a["model"][k] - a["model"]["ema.shadow." + k[len("model.") :].replace(".", "/")])
        .abs()
        .max()
        for k in a["model"]
        if k.startswith("model.") and "lora_" in k
    )
    assert ema_moved > 0  # a real average of the adapters, not a copy
    for name, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(torch.as_tensor(b["optimizer"]["state"][name][k]),
                                       torch.as_tensor(v), rtol=0, atol=1e-6)  # fmt: skip


def test_lora_resume_refuses_another_base_rank_or_a_full_fit(release, tmp_path, capsys):
    root, tensors = release
    _fit(tmp_path, root, "trainer.max_steps=1", "run_name=R")
    other = tmp_path / "other"
    write_release_folder(other, TINY_RELEASE_CONFIG, seed=8)  # same layout, other weights
    same = ["experiment=onegen", "run_name=R", "resume=last", "trainer.max_steps=2"]
    args = [*_lora(tmp_path, other), *same]
    code, line = _cli(args, capsys)
    assert code == 2 and line.startswith(PREFIX + "resume: ") and "sha256 differ" in line, line
    code, line = _cli([*_lora(tmp_path, root), *same, "lora.rank=8"], capsys)
    assert code == 2 and "lora.rank 4, this fit has 8" in line, line
    code, line = _cli([*_lora(tmp_path, root), *same, "lora.rank=0", "resume=auto"], capsys)
    assert code == 2 and "lora.rank 4, this fit has 0" in line, line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["lora.targets=[attn.to_qq]"], "lora.targets: 'attn.to_qq' matches no linear layer"),
        (["model.init_from=null", "model.config=tiny"], "lora.rank > 0 needs model.init_from"),
        (["lora.rank=-1"], "lora.rank: must be >= 0"),
        (["lora.dropout=1.5"], "lora.dropout: must be in [0, 1)"),
        (["lora.base_dtype=int8"], "lora.base_dtype: must be one of"),
        (["lora.ranks=4"], "lora.ranks: unknown key; did you mean lora.rank?"),
    ],
    ids=["no-match", "no-base", "rank", "dropout", "dtype", "typo"],
)
def test_bad_lora_settings_are_one_line_before_anything_starts(
    release, tmp_path, capsys, extra, message
):
    root, _ = release
    code, line = _cli([*_lora(tmp_path, root), *extra], capsys)
    assert code == 2 and line.startswith(PREFIX) and message in line, line
    assert not (tmp_path / "runs").exists()


def _subprocess_fit(tmp: Path, root: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    (tmp / "fit.yaml").write_text("name: lora-fsdp\n")
    cmd = [sys.executable, "-m", "training.fit", "--config", str(tmp / "fit.yaml"),
           *_lora(tmp, root, "mlflow.enabled=false", *extra)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_process_fsdp_lora_fit_then_resume_on_one_process(release, tmp_path):
    """Meta init, frozen and trainable weights sharded together over 2 gloo processes; the
    sharded checkpoint (adapters, EMA, optimizer) restores whole into 1 process."""
    from training.lora import is_adapter

    root, tensors = release
    _subprocess_fit(tmp_path, root, "trainer.devices=2", "model.meta_init=true",
                    "trainer.max_steps=2", "checkpoint.every_n_steps=2", "run_name=S",
                    f"debug.report_dir={tmp_path / 'S1'}")  # fmt: skip
    saved = _end(tmp_path / "S1")
    ours = _ours(tensors)
    for key, value in saved["model"].items():
        if key.startswith("model.") and not is_adapter(key):
            assert torch.equal(value, ours[key[len("model.") :].replace(".base_layer", "")]), key
    start = json.loads((tmp_path / "S1" / "start.json").read_text())
    assert start["built_on_meta"] and start["world_size"] == 2 and start["ema_equals_model"]
    ckpt = next((tmp_path / "runs").rglob("step00000002.ckpt"))
    assert ckpt.is_dir()  # sharded (DCP)
    _subprocess_fit(tmp_path, root, "trainer.devices=1", "trainer.max_steps=3", "run_name=S",
                    "resume=last", f"debug.report_dir={tmp_path / 'S2'}")  # fmt: skip
    restored = torch.load(tmp_path / "S2" / "start_state.pt", weights_only=True)
    assert_restored(saved, restored)  # adapters, EMA, optimizer as saved; base as loaded


def test_a_lora_checkpoint_starts_a_full_fit_with_the_adapters_merged(release, tmp_path):
    """``init_from`` a LoRA run's checkpoint: its base plus ``alpha / rank * B @ A`` of the
    averaged adapters, computed here by hand from the checkpoint's tensors."""
    root, tensors = release
    lora = _fit(tmp_path, root, "trainer.max_steps=2", "checkpoint.every_n_steps=2", "run_name=L")
    ckpt = Path(lora.checkpoint_dir) / "step00000002.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    report = tmp_path / "report"
    _fit(tmp_path, root, f"model.init_from={ckpt}", "lora.rank=0", "optim.lr=0.0",
         "run_name=M", f"debug.report_dir={report}")  # fmt: skip
    end = _end(report)["model"]
    merged = 0
    for name, base in _ours(tensors).items():
        module = name.removesuffix(".weight")
        a = saved.get(f"ema.shadow.{module.replace('.', '/')}/lora_A/default/weight")
        expected = base
        if a is not None:
            b = saved[f"ema.shadow.{module.replace('.', '/')}/lora_B/default/weight"]
            expected = base + (8 / 4) * b @ a
            merged += 1
        torch.testing.assert_close(end[f"model.{name}"], expected, rtol=1e-6, atol=1e-6)
    assert merged == 2 * 9  # two blocks, nine adapted linears each


def test_the_shipped_finetune_lora_config_runs_on_the_tiny_folder(release, tmp_path):
    """``training/configs/finetune-lora.yaml`` as shipped, with only what its header says to
    set (the folder, the data) and the machine's limits (CPU, tiny encoders, small sizes)."""
    from training.config import load_config
    from training.fit import fit
    from training.lora import is_adapter

    root, _ = release
    cfg = load_config(REPO / "training/configs/finetune-lora.yaml", [
        f"model.init_from={root}", "encoders.kind=tiny", "encoders.text_max_length=24",
        "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.accumulate_grad_batches=1",
        "checkpoint.every_n_steps=2", "data.kind=synthetic", "data.batch_size=1",
        "data.num_workers=0", "data.synthetic.resolution=32", "samples.every_n_steps=0",
        f"runs_dir={tmp_path}/runs", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "model.activation_checkpointing=true",
    ])  # fmt: skip
    assert cfg.lora.rank == 64 and cfg.model.config == "from_init"
    result = fit(cfg)
    ckpt = torch.load(Path(result.checkpoint_dir) / "step00000002.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(is_adapter(k) for k in ckpt["state_dict"])


def test_sampling_with_the_ema_swaps_the_averaged_adapters_in_and_back(release, tmp_path):
    from training.config import load_config
    from training.module import OneGenModule

    root, _ = release
    cfg = load_config(None, _lora(tmp_path, root, "model.config=tiny", "samples.steps=2"))
    cfg.run_dir = str(tmp_path / "run")
    module = OneGenModule(cfg)
    module.configure_model()
    pairs = module.ema_pairs()
    with torch.no_grad():
        for p in module.model.parameters():  # no zero-initialised layer hides the adapters
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for i, (live, avg) in enumerate(pairs):  # adapters and averages that differ
            live.copy_(torch.randn(live.shape, generator=torch.Generator().manual_seed(i)))
            avg.copy_(torch.randn(avg.shape, generator=torch.Generator().manual_seed(99 + i)))
    before = [live.clone() for live, _ in pairs]
    kw = {"size": (32, 32), "seed": 3}
    with_ema = module.generate(["a photo"], use_ema=True, **kw)
    live_only = module.generate(["a photo"], use_ema=False, **kw)
    assert all(torch.equal(live, b) for (live, _), b in zip(pairs, before, strict=True))
    with torch.no_grad():
        for live, avg in pairs:
            live.copy_(avg)
    assert torch.equal(module.generate(["a photo"], use_ema=False, **kw), with_ema)
    assert not torch.equal(with_ema, live_only)
