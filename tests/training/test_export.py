"""``onegen export``: a real tiny fit's checkpoint written as the released OneDiffusion folder.

The folder is checked against the release's own names (``tests.training.test_init_from``
writes them from ``modeling_nextdit.py``, not from our exporter), read back the way
``model.init_from`` and ``onegen sample --weights`` read it, and, where a checkout of the
release is given (``ONEGEN_RELEASE_SRC``), loaded by the release's ``NextDiT`` itself and
run against ours.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from tests.helpers.threads import one_thread  # noqa: F401  (autouse fixture)
from tests.training.test_init_from import (
    TINY_RELEASE_CONFIG,
    release_parameters,
    write_release_folder,
)

PREFIX = "onegen export: error: "
RELEASE_SRC = os.environ.get("ONEGEN_RELEASE_SRC", "")
RELEASE_MODELING = "onediffusion/models/denoiser/nextdit/modeling_nextdit.py"
COMPONENT_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
# What the release's pipeline records for OneDiffusionPipeline(transformer, vae,
# text_encoder, tokenizer, scheduler), written out by hand from its code.
RELEASE_MODEL_INDEX = {
    "_class_name": "OneDiffusionPipeline",
    "_diffusers_version": "0.30.3",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["onediffusion.models.denoiser.nextdit.modeling_nextdit", "NextDiT"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# --------------------------------------------------------------------------- builders


def make_checkpoint(tmp: Path, *tasks: str) -> tuple[Path, Path]:
    """``(run folder, its checkpoint)`` of a real 2-step tiny fit."""
    from training.config import load_config
    from training.fit import fit

    cfg = load_config(None, [
        "data.kind=synthetic", "data.batch_size=2", "data.synthetic.resolution=32",
        f"data.synthetic.tasks=[{','.join(tasks or ('text2image', 'depth2image'))}]",
        "trainer.max_steps=2", "checkpoint.every_n_steps=2", f"runs_dir={tmp}/runs",
        "mlflow.enabled=false", "encoders.text_max_length=24", "samples.resolution=32",
    ])  # fmt: skip
    result = fit(cfg)
    ckpt = Path(result.checkpoint_dir) / "step00000002.ckpt"
    assert ckpt.is_file(), ckpt
    return Path(result.run_dir), ckpt


def rewrite_checkpoint(src: Path, dst: Path, *, noise: bool = False, **config) -> Path:
    """A copy of a Lightning checkpoint file, its model and EMA weights moved off their
    near-zero init (``noise``: every adaLN, gate and final layer nonzero, each differently)
    and its saved fit config edited (``config``: dotted key -> value; ``None`` drops it)."""
    ck = torch.load(src, map_location="cpu", weights_only=True)
    if noise:
        gen = torch.Generator().manual_seed(0)
        for key, value in ck["state_dict"].items():
            if key.startswith(("model.", "ema.")) and value.is_floating_point():
                ck["state_dict"][key] = value + 0.1 * torch.randn(value.shape, generator=gen)
    if config:
        if None in config.values():
            ck.pop("onegen")
        else:
            saved = OmegaConf.create(ck["onegen"]["config"])
            for key, value in config.items():
                OmegaConf.update(saved, key, value)
            ck["onegen"]["config"] = OmegaConf.to_yaml(saved)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, dst)
    return dst


def t5_tokenizer(folder: Path) -> int:
    """A tiny sentencepiece-style (Unigram) ``T5Tokenizer``, the class the release's pipeline
    loads, saved to ``folder``; returns its vocabulary size."""
    from transformers import T5Tokenizer

    words = ["a", "photo", "of", "cat", "dog", "[[", "]]", *"abcdefghijklmnopqrstuvwxyz"]
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *(f"\u2581{w}" for w in words), *words]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(dict.fromkeys(pieces))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_components(root: Path, caption_dim: int = 64) -> Path:
    """A released pipeline folder as the release ships it: ``transformer/`` (the release's
    names) and ``model_index.json``, a tiny ``vae/``, ``text_encoder/`` (T5, ``caption_dim``
    wide), ``tokenizer/`` and the ``scheduler/`` the release's pipeline loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from model.encoders import FrozenVAE

    write_release_folder(root, TINY_RELEASE_CONFIG)
    FrozenVAE.tiny().save_pretrained(root / "vae")
    t5_encoder(root / "text_encoder", t5_tokenizer(root / "tokenizer"), caption_dim)
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    return root


def t5_encoder(folder: Path, vocab: int, width: int) -> None:
    """A random 2-layer T5 encoder, ``width`` wide, saved to ``folder``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", pad_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder)


def forward(
    net: torch.nn.Module, t: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Our NextDiT on a fixed 2-sample, 2-view batch (one caption padded), at per-view times
    ``t`` (default: random): (out, inputs)."""
    gen = torch.Generator().manual_seed(0)
    cfg = net.config
    x = torch.randn(2, 2, cfg.in_channels, 8, 8, generator=gen)
    t = torch.rand(2, 2, generator=gen) if t is None else t
    text = torch.randn(2, 5, cfg.caption_dim, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        return net(x, t, text, mask), (x, t, text, mask)


def checkpoint_net(ckpt: Path, weights: str = "ema") -> torch.nn.Module:
    from training.inference.sample import fit_config, load_checkpoint_net, net_config

    cfg = fit_config(ckpt)
    return load_checkpoint_net(ckpt, net_config(cfg, ckpt), weights).eval()


def export(args: list[str], capsys) -> tuple[int, str, str]:
    """``onegen export ARGS`` in process: (exit code, stdout, its one error line or '')."""
    from orchestration.cli import main

    try:
        rc = main(["export", *args])
    except SystemExit as exc:  # argparse
        rc = int(exc.code)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) <= 1, err
    return rc, out, errors[0] if errors else ""


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export-fit")
    run_dir, ckpt = make_checkpoint(tmp)
    noisy = rewrite_checkpoint(ckpt, tmp / "noisy" / "step00000002.ckpt", noise=True)
    return {"run": run_dir, "ckpt": ckpt, "noisy": noisy, "tmp": tmp}


@pytest.fixture(scope="module")
def components_base(tmp_path_factory) -> Path:
    return write_components(tmp_path_factory.mktemp("components") / "OneDiffusion")


@pytest.fixture
def components(components_base, tmp_path) -> Path:
    """A copy of the released pipeline folder a test may break."""
    return Path(shutil.copytree(components_base, tmp_path / "OneDiffusion", symlinks=True))


# --------------------------------------------------------------------------- the layout


def test_fp32_export_is_the_release_layout_and_loads_back_to_the_same_forward(
    fitted, tmp_path, capsys
):
    from model import NextDiT
    from model.convert import load_released
    from model.release import read_release_weights
    from training.config import load_config
    from training.init_from import find_init, load_init_state, read_release_folder

    out = tmp_path / "exported"
    rc, stdout, err = export(["--checkpoint", str(fitted["noisy"]), "--out", str(out),
                              "--dtype", "float32"], capsys)  # fmt: skip
    assert rc == 0, err
    assert "transformer/" in stdout and "only: no --components" in stdout, stdout
    assert sorted(p.name for p in out.iterdir()) == ["transformer"]
    folder = out / "transformer"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert json.loads((folder / "config.json").read_text()) == TINY_RELEASE_CONFIG
    shapes = release_parameters(TINY_RELEASE_CONFIG)
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as f:
        names = list(f.keys())
        assert sorted(names) == sorted(shapes)
        assert all(tuple(f.get_slice(k).get_shape()) == shapes[k] for k in names)
        assert {f.get_slice(k).get_dtype() for k in names} == {"F32"}

    ours, _ = forward(checkpoint_net(fitted["noisy"]))
    # As model.init_from reads it.
    cfg = load_config(None, [f"model.init_from={out}", "model.config=from_init"])
    source = find_init(cfg)
    assert source is not None and source.kind == "release"
    net = NextDiT(source.net_config)
    net.load_state_dict(load_init_state(source, source.net_config))
    assert (forward(net.eval())[0] - ours).abs().max() <= 1e-5
    # As onegen sample --weights reads it: built on meta, given the tensors.
    _, _, mcfg, _ = read_release_folder(out)
    with torch.device("meta"):
        meta_net = NextDiT(mcfg)
    load_released(meta_net, read_release_weights(out))
    assert (forward(meta_net.eval())[0] - ours).abs().max() <= 1e-5


def test_bf16_is_the_default_and_no_ema_exports_the_trained_weights(fitted, tmp_path, capsys):
    from model.convert import export_released
    from model.release import read_release_weights

    rc, stdout, err = export(["--checkpoint", str(fitted["noisy"]), "--out",
                              str(tmp_path / "ema")], capsys)  # fmt: skip
    assert rc == 0 and "bfloat16" in stdout, err
    with safe_open(tmp_path / "ema/transformer/diffusion_pytorch_model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    rc, _, err = export(["--checkpoint", str(fitted["noisy"]), "--out", str(tmp_path / "model"),
                         "--no-ema"], capsys)  # fmt: skip
    assert rc == 0, err
    for weights in ("ema", "model"):
        expected = export_released(checkpoint_net(fitted["noisy"], weights))
        on_disk = read_release_weights(tmp_path / weights)
        assert on_disk.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(on_disk[name], tensor.to(torch.bfloat16)), (weights, name)
    ema = read_release_weights(tmp_path / "ema")
    model = read_release_weights(tmp_path / "model")
    assert not torch.equal(ema["x_embedder.weight"], model["x_embedder.weight"])


def test_a_small_max_shard_size_writes_an_index_covering_every_key(fitted, tmp_path, capsys):
    from model.release import read_release_weights

    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    base = ["--checkpoint", str(fitted["noisy"]), "--dtype", "float32"]
    assert export([*base, "--out", str(whole)], capsys)[0] == 0
    rc, stdout, err = export([*base, "--out", str(sharded), "--max-shard-size", "20KB"], capsys)
    assert rc == 0, err
    folder = sharded / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and f"{len(shards)} safetensors files" in stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors.index.json", *shards]
    )
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    expected = read_release_weights(whole)
    assert sorted(index["weight_map"]) == sorted(expected)
    total = 0
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == shard for k in keys)
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert size <= 20_000 or len(keys) == 1, (shard, size)
        total += size
    assert index["metadata"]["total_size"] == total
    loaded = read_release_weights(sharded)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_a_run_folder_exports_its_newest_whole_checkpoint(fitted, tmp_path, capsys):
    run = Path(shutil.copytree(fitted["run"], tmp_path / "run"))
    broken = run / "checkpoints" / "step00000004.ckpt"
    broken.write_bytes((run / "checkpoints" / "step00000002.ckpt").read_bytes()[:1000])
    from orchestration.cli import main

    rc = main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "step00000002.ckpt" in out and "onegen export: warning:" in err and broken.name in err


def test_components_are_copied_and_model_index_written(fitted, components, tmp_path, capsys):
    out = tmp_path / "pipeline"
    rc, stdout, err = export(["--checkpoint", str(fitted["ckpt"]), "--out", str(out),
                              "--components", str(components)], capsys)  # fmt: skip
    assert rc == 0, err
    assert "model_index.json" in stdout and str(components) in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model_index.json", "transformer", *COMPONENT_PARTS]
    )
    assert json.loads((out / "model_index.json").read_text()) == RELEASE_MODEL_INDEX
    for part in COMPONENT_PARTS:
        src = sorted(p.relative_to(components) for p in (components / part).rglob("*"))
        dst = sorted(p.relative_to(out) for p in (out / part).rglob("*"))
        assert src == dst and src, part
        for rel in src:
            if (components / rel).is_file():
                assert (components / rel).read_bytes() == (out / rel).read_bytes(), rel
    # The transformer is the checkpoint's, not the released one beside the components.
    from model.convert import export_released
    from model.release import read_release_weights

    ours = export_released(checkpoint_net(fitted["ckpt"]))
    on_disk = read_release_weights(out)
    assert all(torch.equal(on_disk[k], v.to(torch.bfloat16)) for k, v in ours.items())


def test_force_replaces_an_export(fitted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, _, line = export(["--checkpoint", str(fitted["ckpt"]), "--out", str(out)], capsys)
    assert rc == 2 and "not empty; pass --force" in line and (out / "old.txt").exists()
    rc, _, line = export(["--checkpoint", str(fitted["ckpt"]), "--out", str(out), "--force"],
                         capsys)  # fmt: skip
    assert rc == 0, line
    assert sorted(p.name for p in out.iterdir()) == ["transformer"]
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(["--checkpoint", str(fitted["ckpt"]), "--out", str(empty)], capsys)[0] == 0


@pytest.mark.slow
def test_a_sharded_checkpoint_of_a_two_process_fit_exports(tmp_path, capsys):
    """FSDP2 over 2 processes (gloo) writes sharded folders; its run folder exports the
    newest, whose tensors are the ones the sharded reader loads."""
    import subprocess

    from model.convert import export_released
    from model.release import read_release_weights
    from tests.helpers import REPO

    (tmp_path / "fit.yaml").write_text("name: export-fsdp\n")
    cmd = [sys.executable, "-m", "training.fit", "--config", str(tmp_path / "fit.yaml"),
           "data.kind=synthetic", "data.batch_size=2", "data.synthetic.resolution=32",
           "data.synthetic.tasks=[text2image]", "trainer.max_steps=2", "trainer.devices=2",
           "checkpoint.every_n_steps=2", f"run_dir={tmp_path / 'run'}", "mlflow.enabled=false",
           "encoders.text_max_length=24"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = tmp_path / "run" / "checkpoints" / "step00000002.ckpt"
    assert sharded.is_dir()
    rc, stdout, err = export(["--checkpoint", str(tmp_path / "run"), "--out",
                              str(tmp_path / "out"), "--dtype", "float32"], capsys)  # fmt: skip
    assert rc == 0 and str(sharded) in stdout, err
    expected = export_released(checkpoint_net(sharded))
    on_disk = read_release_weights(tmp_path / "out")
    assert on_disk.keys() == expected.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------- bad inputs


def _bad_ckpt(kind: str):
    def make(fitted: dict, tmp: Path) -> Path:
        if kind == "missing":
            return tmp / "nope.ckpt"
        if kind == "truncated":
            (tmp / "cut.ckpt").write_bytes(fitted["ckpt"].read_bytes()[:5000])
            return tmp / "cut.ckpt"
        if kind == "empty-run":
            (tmp / "run" / "checkpoints").mkdir(parents=True)
            return tmp / "run"
        if kind == "no-config":
            return rewrite_checkpoint(fitted["ckpt"], tmp / "plain.ckpt", config=None)
        if kind == "no-ema":
            return rewrite_checkpoint(fitted["ckpt"], tmp / "noema.ckpt", **{"ema.enabled": False})
        return fitted["ckpt"]

    return make


@pytest.mark.parametrize(
    ("ckpt", "extra", "code", "message"),
    [
        ("missing", [], 1, "checkpoint not found: "),
        ("truncated", [], 1, "cut.ckpt is unreadable"),
        ("empty-run", [], 1, "a run folder with no whole checkpoint"),
        ("no-config", [], 1, "has no One-Gen config"),
        ("no-ema", [], 2, "was trained without EMA (ema.enabled false); pass --no-ema"),
        ("ok", ["--merge-lora"], 2, "is a full fit's checkpoint, not LoRA"),
        ("ok", ["--max-shard-size", "5XB"], 2, "--max-shard-size '5XB' is not a size"),
        ("ok", ["--max-shard-size", "0"], 2, "--max-shard-size '0' must be more than 0 bytes"),
        ("ok", ["--dtype", "float16"], 2, "--dtype: invalid choice: 'float16'"),
    ],
)  # fmt: skip
def test_a_bad_checkpoint_or_option_is_one_line_and_writes_nothing(
    fitted, tmp_path, capsys, ckpt, extra, code, message
):
    path = _bad_ckpt(ckpt)(fitted, tmp_path)
    out = tmp_path / "out"
    rc, _, line = export(["--checkpoint", str(path), "--out", str(out), *extra], capsys)
    assert rc == code and line.startswith("onegen export: error: "), line
    assert message in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_out_that_is_a_file_or_holds_the_checkpoint_is_refused(fitted, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("mine")
    rc, _, line = export(["--checkpoint", str(fitted["ckpt"]), "--out", str(file), "--force"],
                         capsys)  # fmt: skip
    assert rc == 2 and line == f"{PREFIX}--out {file} exists and is not a folder", line
    assert file.read_text() == "mine"
    run = Path(shutil.copytree(fitted["run"], tmp_path / "runs" / "run"))
    rc, _, line = export(["--checkpoint", str(run), "--out", str(tmp_path / "runs"), "--force"],
                         capsys)  # fmt: skip
    assert rc == 2 and "--force would delete it" in line, line
    assert (run / "checkpoints" / "step00000002.ckpt").is_file()


def _remove(part: str):
    return lambda root: shutil.rmtree(root / part)


def _python_file(root: Path) -> None:
    (root / "vae" / "modeling_vae.py").write_text("print('hi')\n")


def _link_out(root: Path) -> None:
    secret = root.parent / "elsewhere.txt"
    secret.write_text("outside")
    (root / "tokenizer" / "extra.txt").symlink_to(secret)


def _narrow_t5(root: Path) -> None:
    shutil.rmtree(root / "text_encoder")
    t5_encoder(root / "text_encoder", 100, 32)


def _other_scheduler(root: Path) -> None:
    path = root / "scheduler" / "scheduler_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "_class_name": "DDIMScheduler"}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        *((_remove(p), f"has no {p}/ (needs vae/, text_encoder/, tokenizer/, scheduler/)")
          for p in COMPONENT_PARTS),
        (_python_file, "modeling_vae.py is Python code; not copied"),
        (_link_out, "extra.txt links out of"),
        (_narrow_t5, "its text encoder is 32 wide, the transformer's captions 64"),
        (_other_scheduler, "_class_name is 'DDIMScheduler'; the release's pipeline loads "
                           "FlowMatchEulerDiscreteScheduler"),
    ],
    ids=[*(f"no-{p}" for p in COMPONENT_PARTS), "python", "link-out", "narrow-t5", "scheduler"],
)  # fmt: skip
def test_components_that_are_not_the_release_are_one_line(
    fitted, components, tmp_path, capsys, change, message
):
    change(components)
    out = tmp_path / "out"
    rc, _, line = export(["--checkpoint", str(fitted["ckpt"]), "--out", str(out),
                          "--components", str(components)], capsys)  # fmt: skip
    assert rc == 2 and line.startswith(PREFIX + "--components") and message in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_max_shard_size_reads_as_diffusers_does():
    from training.export import ExportUsageError, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("10kb") == 10_000
    assert parse_size("100000") == 100_000 and parse_size(4096) == 4096
    for bad in ("", "GB", "5 GBs", "-1GB", "1e9"):
        with pytest.raises(ExportUsageError):
            parse_size(bad)


# --------------------------------------------------------------------------- the release's code


@pytest.fixture
def release_nextdit(monkeypatch):
    """The release's ``NextDiT`` class from the checkout ``ONEGEN_RELEASE_SRC`` names. Its
    module imports flash-attn, used only on its fp16/bf16 path: a stand-in whose every
    function fails the test proves the fp32 path (``F.scaled_dot_product_attention``)
    never touches it."""
    if not (RELEASE_SRC and (Path(RELEASE_SRC) / RELEASE_MODELING).is_file()):
        pytest.skip(
            f"ONEGEN_RELEASE_SRC: no checkout of lehduong/OneDiffusion ({RELEASE_MODELING})"
        )
    pytest.importorskip("einops", reason="the release's modeling code imports einops")
    import diffusers.models.modeling_utils  # noqa: F401  (probes flash_attn before the stand-in)

    def never(*args, **kwargs):
        raise AssertionError("flash-attn called on the fp32 path")

    flash = types.ModuleType("flash_attn")
    padding = types.ModuleType("flash_attn.bert_padding")
    flash.flash_attn_varlen_func = never
    flash.bert_padding = padding
    for name in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(padding, name, never)
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.syspath_prepend(RELEASE_SRC)
    module = importlib.import_module("onediffusion.models.denoiser.nextdit.modeling_nextdit")
    yield module.NextDiT
    for name in [n for n in sys.modules if n.split(".")[0] == "onediffusion"]:
        del sys.modules[name]


def release_forward(net, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The release's forward on our inputs: its timesteps are the scheduler's (t x 1000),
    given per view as the pipeline's img2img does (broadcast over the latents)."""
    x, t, text, mask = inputs
    steps = (t * 1000.0)[:, :, None, None, None].expand_as(x).contiguous()
    with torch.no_grad():
        return net(samples=x, timesteps=steps, encoder_hidden_states=text,
                   encoder_attention_mask=mask)  # fmt: skip


def test_the_releases_nextdit_loads_the_export_and_gives_our_forward(
    release_nextdit, fitted, tmp_path
):
    from training.export import export_checkpoint

    # rotary_max_length changes no weight; the release precomputes a (L, L, L, head_dim/2)
    # table of it at init, 5 GB at its 384, so the test writes 32 (room for 8 x 8 latents).
    result = export_checkpoint(fitted["noisy"], tmp_path / "out", dtype="float32",
                               release_keys={"rotary_max_length": 32})  # fmt: skip
    theirs = release_nextdit.from_pretrained(str(result.out / "transformer")).eval()
    assert theirs.dtype == torch.float32
    net = checkpoint_net(fitted["noisy"])
    ours, inputs = forward(net)
    diff = (release_forward(theirs, inputs) - ours).abs().max().item()
    # The release averages each patch's timesteps (x 1000) in fp32, which can move them by
    # an ulp (6e-5 at 1000) before its sinusoids: times on a 1/8 grid average exactly.
    grid, grid_inputs = forward(net, torch.tensor([[0.125, 0.875], [0.5, 1.0]]))
    grid_diff = (release_forward(theirs, grid_inputs) - grid).abs().max().item()
    print(
        f"release NextDiT vs ours, fp32: max abs diff {diff:.3g}, {grid_diff:.3g} at exact "
        f"times (outputs up to {ours.abs().max().item():.3g})"
    )
    assert diff <= 1e-4 and grid_diff <= 1e-5
    # The release's save_pretrained writes back the same config and names.
    theirs.save_pretrained(tmp_path / "resaved", safe_serialization=True)
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    written = json.loads((result.out / "transformer" / "config.json").read_text())
    bookkeeping = ("_diffusers_version", "_name_or_path")
    assert {k: v for k, v in resaved.items() if k not in bookkeeping} == {
        k: v for k, v in written.items() if k not in bookkeeping
    }
    with safe_open(tmp_path / "resaved" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(release_parameters(TINY_RELEASE_CONFIG))


def test_diffusers_builds_the_releases_pipeline_parts_from_model_index(
    release_nextdit, fitted, components, tmp_path
):
    """``DiffusionPipeline.from_pretrained`` with the release pipeline's signature (its
    ``__init__`` arguments; the class itself needs pytorch3d) builds every part from the
    exported ``model_index.json``, and saving it writes the same index back."""
    from diffusers import DiffusionPipeline

    from training.export import export_checkpoint

    class OneDiffusionPipeline(DiffusionPipeline):
        def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder,
                                  tokenizer=tokenizer, scheduler=scheduler)  # fmt: skip

    result = export_checkpoint(fitted["ckpt"], tmp_path / "out", components=components,
                               release_keys={"rotary_max_length": 32})  # fmt: skip
    pipe = OneDiffusionPipeline.from_pretrained(str(result.out))
    assert type(pipe.transformer) is release_nextdit
    pipe.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    for bookkeeping in ("_diffusers_version", "_name_or_path"):
        resaved.pop(bookkeeping, None)
    expected = dict(RELEASE_MODEL_INDEX)
    expected.pop("_diffusers_version")
    assert resaved == expected
