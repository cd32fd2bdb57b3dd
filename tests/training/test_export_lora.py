"""A LoRA fit handed back: ``onegen export --merge-lora`` (the merged transformer in the
release's layout), the adapters alone in peft's layout under the release's module names, and
``onegen sample --checkpoint`` of a LoRA run (base + averaged adapters). With a checkout of
the release (``ONEGEN_RELEASE_SRC``), peft loads the exported adapters onto the release's own
``NextDiT`` and it computes what our adapted model computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.training.test_export import (
    export,
    forward,
    leftovers,
    release_forward,
    release_nextdit,  # noqa: F401  (fixture)
)
from tests.training.test_init_from import TINY_RELEASE_CONFIG, write_release_folder
from tests.training.test_lora import _fit


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lora-export")
    root = tmp / "OneDiffusion"
    write_release_folder(root, TINY_RELEASE_CONFIG)
    result = _fit(tmp, root, "trainer.max_steps=2", "checkpoint.every_n_steps=2", "run_name=L")
    return {"base": root, "run": Path(result.run_dir),
            "ckpt": Path(result.checkpoint_dir) / "step00000002.ckpt"}  # fmt: skip


def adapted_net(ckpt: Path, merge: bool) -> torch.nn.Module:
    from training.inference.sample import fit_config, net_config
    from training.init_from import load_lora_checkpoint

    cfg = fit_config(ckpt)
    return load_lora_checkpoint(ckpt, cfg, net_config(cfg, ckpt), "ema", merge=merge).eval()


def test_merge_lora_exports_a_transformer_computing_what_the_adapted_model_computes(
    lora_run, tmp_path, capsys
):
    from model import NextDiT
    from model.convert import load_released
    from model.release import read_release_weights
    from training.init_from import read_release_folder

    out = tmp_path / "merged"
    rc, stdout, line = export(["--checkpoint", str(lora_run["run"]), "--out", str(out),
                               "--merge-lora", "--dtype", "float32"], capsys)  # fmt: skip
    assert rc == 0 and not line and "transformer/" in stdout, line
    _, _, mcfg, _ = read_release_folder(out)
    with torch.device("meta"):
        loaded = NextDiT(mcfg)
    load_released(loaded, read_release_weights(out))
    theirs, _ = forward(loaded.eval())
    ours, _ = forward(adapted_net(lora_run["ckpt"], merge=False))  # peft layers, unmerged
    assert (theirs - ours).abs().max().item() <= 1e-5
    base, _ = forward(adapted_net(lora_run["ckpt"], merge=True).requires_grad_(False))
    assert (base - ours).abs().max().item() <= 1e-5


def test_without_merge_the_adapters_alone_in_peft_layout_and_release_names(
    lora_run, tmp_path, capsys
):
    from model.convert import from_released_name

    out = tmp_path / "adapters"
    rc, stdout, line = export(["--checkpoint", str(lora_run["ckpt"]), "--out", str(out)], capsys)
    assert rc == 0 and "peft's layout" in stdout, line
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert "layers.0.attention.wq" in config["target_modules"]
    assert "layers.1.feed_forward.w2" in config["target_modules"]
    net = adapted_net(lora_run["ckpt"], merge=False)
    ours = {n: p for n, p in net.named_parameters() if "lora_" in n}
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        assert len(keys) == len(ours)
        for k in keys:  # base_model.model.<release module>.lora_A.weight
            module, which = k.removeprefix("base_model.model.").rsplit(".", 2)[:2]
            name = from_released_name(f"{module}.weight").removesuffix(".weight")
            value = f.get_tensor(k)  # --dtype's default, bf16, as a transformer export
            assert value.dtype == torch.bfloat16, k
            assert torch.equal(value, ours[f"{name}.{which}.default.weight"].to(value.dtype)), k
    assert leftovers(tmp_path) == []


def test_lora_export_options_that_do_not_fit_are_one_line(lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, line = export(["--checkpoint", str(lora_run["ckpt"]), "--out", str(out),
                          "--components", str(lora_run["base"])], capsys)  # fmt: skip
    assert rc == 2 and "--components: a LoRA checkpoint without --merge-lora" in line, line
    assert not out.exists()


def test_sample_from_a_lora_checkpoint_and_a_changed_base_is_one_line(lora_run, tmp_path, capsys):
    from orchestration.cli import main

    args = ["sample", "--checkpoint", str(lora_run["ckpt"]), "--task", "text2image",
            "--size", "32", "--steps", "2", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "s").iterdir()) == [".png", ".png"]
    capsys.readouterr()
    moved = tmp_path / "base-copy"
    shutil.copytree(lora_run["base"], moved)
    weights = lora_run["base"] / "transformer" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    try:
        write_release_folder(tmp_path / "other", TINY_RELEASE_CONFIG, seed=9)
        shutil.copy(tmp_path / "other" / "transformer" / weights.name, weights)
        assert main([*args, "--out", str(tmp_path / "t")]) == 1
    finally:
        weights.write_bytes(original)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no longer holds those weights (sha256 differ)" in err[0], err
    assert not (tmp_path / "t").exists()


def test_peft_loads_the_adapters_onto_the_releases_nextdit(
    release_nextdit,  # noqa: F811
    lora_run,
    tmp_path,
):
    from peft import PeftModel

    from training.export import export_checkpoint

    result = export_checkpoint(lora_run["ckpt"], tmp_path / "adapters", dtype="float32")
    base = tmp_path / "base"
    shutil.copytree(lora_run["base"] / "transformer", base)
    raw = json.loads((base / "config.json").read_text())
    raw["rotary_max_length"] = 32  # changes no weight; 384 precomputes a 5 GB table
    (base / "config.json").write_text(json.dumps(raw))
    theirs = release_nextdit.from_pretrained(str(base)).eval()
    theirs = PeftModel.from_pretrained(theirs, str(result.out)).eval()
    ours, inputs = forward(adapted_net(lora_run["ckpt"], merge=False))
    grid, grid_inputs = forward(
        adapted_net(lora_run["ckpt"], merge=False), torch.tensor([[0.125, 0.875], [0.5, 1.0]])
    )
    diff = (release_forward(theirs.base_model.model, grid_inputs) - grid).abs().max().item()
    print(f"release NextDiT + peft adapters vs ours, fp32: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    # Random times: the release averages each patch's t x 1000 in fp32 (an ulp, 6e-5, of
    # time before its sinusoids; see test_export), relative to the outputs' size.
    random_diff = (release_forward(theirs.base_model.model, inputs) - ours).abs().max().item()
    assert random_diff <= 1e-4 * ours.abs().max().item()
