"""``model.init_from``: a fit that starts from the released model's folder or from an earlier
run's checkpoint (fresh optimizer, step 0, a new run), checked before anything starts.

The released folder is written here in the release's exact layout, from its own parameter
names and ``config.json`` keys as ``onediffusion/models/denoiser/nextdit/modeling_nextdit.py``
(lehduong/OneDiffusion) defines them, not from our exporter or ``model.convert``'s table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import REPO
from training.data.errors import ConfigError

PREFIX = "onegen train fit: error: "

# ``NextDiT.__init__``'s arguments in the release, as diffusers' save_pretrained writes them
# for a model of our ``tiny`` size (hidden 96, 2 blocks, 4 heads, 2 kv heads, T5 width 64).
TINY_RELEASE_CONFIG = {
    "_class_name": "NextDiT",
    "_diffusers_version": "0.30.3",
    "input_size": [1, 32, 32],
    "patch_size": [1, 2, 2],
    "in_channels": 16,
    "hidden_size": 96,
    "depth": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "pred_sigma": False,
    "caption_channels": 64,
    "qk_norm": True,
    "norm_type": "rms",
    "model_max_length": 120,
    "rotary_max_length": 384,
    "rotary_max_length_t": None,
}


def release_parameters(c: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the release's NextDiT and its shape, read off its modules:
    x_embedder, TimestepEmbedder (256 sinusoid features, width min(D, 1024)), y_embedder
    (LayerNorm, Linear), per block an Attention (bias-free wq/wk/wv/wo, wk_y/wv_y, a
    per-head gate, LayerNorm q/k/ky norms), LLamaFeedForward (w1/w2/w3), four RMSNorms, an
    adaLN Linear(min(D,1024), 4D) and attention_y_norm; FinalLayer (no-affine LayerNorm)."""
    d, heads = c["hidden_size"], c["num_heads"]
    kv, cap = c["num_kv_heads"] or heads, c["caption_channels"]
    hd, cd = d // heads, min(d, 1024)
    hidden = int(2 * (4 * d) / 3)
    ffn = c["multiple_of"] * ((hidden + c["multiple_of"] - 1) // c["multiple_of"])
    patch = math.prod(c["patch_size"]) * c["in_channels"]
    p: dict[str, tuple[int, ...]] = {
        "x_embedder.weight": (d, patch),
        "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (cd, 256),
        "t_embedder.mlp.0.bias": (cd,),
        "t_embedder.mlp.2.weight": (cd, cd),
        "t_embedder.mlp.2.bias": (cd,),
        "y_embedder.0.weight": (cap,),
        "y_embedder.0.bias": (cap,),
        "y_embedder.1.weight": (cd, cap),
        "y_embedder.1.bias": (cd,),
        "final_layer.linear.weight": (patch, d),
        "final_layer.linear.bias": (patch,),
        "final_layer.adaLN_modulation.1.weight": (d, cd),
        "final_layer.adaLN_modulation.1.bias": (d,),
    }
    for i in range(c["depth"]):
        a, b = f"layers.{i}.attention", f"layers.{i}"
        p.update(
            {
                f"{a}.wq.weight": (heads * hd, d),
                f"{a}.wk.weight": (kv * hd, d),
                f"{a}.wv.weight": (kv * hd, d),
                f"{a}.wk_y.weight": (kv * hd, cap),
                f"{a}.wv_y.weight": (kv * hd, cap),
                f"{a}.gate": (heads,),
                f"{a}.wo.weight": (d, heads * hd),
                f"{a}.q_norm.weight": (heads * hd,),
                f"{a}.q_norm.bias": (heads * hd,),
                f"{a}.k_norm.weight": (kv * hd,),
                f"{a}.k_norm.bias": (kv * hd,),
                f"{a}.ky_norm.weight": (kv * hd,),
                f"{a}.ky_norm.bias": (kv * hd,),
                f"{b}.feed_forward.w1.weight": (ffn, d),
                f"{b}.feed_forward.w2.weight": (d, ffn),
                f"{b}.feed_forward.w3.weight": (ffn, d),
                f"{b}.attention_norm1.weight": (d,),
                f"{b}.attention_norm2.weight": (d,),
                f"{b}.ffn_norm1.weight": (d,),
                f"{b}.ffn_norm2.weight": (d,),
                f"{b}.adaLN_modulation.1.weight": (4 * d, cd),
                f"{b}.adaLN_modulation.1.bias": (4 * d,),
                f"{b}.attention_y_norm.weight": (cap,),
            }
        )
    return p


def write_release_folder(root: Path, config: dict, seed: int = 7) -> dict[str, torch.Tensor]:
    """A pipeline root with ``transformer/`` as the release ships it; nonzero random
    weights everywhere (a zero-initialised gate or final layer would hide a wrong load);
    returns the tensors under the release's names."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=gen) * 0.2
        for name, shape in release_parameters(config).items()
    }
    folder = root / "transformer"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "OneDiffusionPipeline"}))
    return tensors


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return [
        "data.kind=synthetic", "data.batch_size=2", "data.synthetic.resolution=32",
        "data.synthetic.tasks=[text2image,canny2image]", "encoders.text_max_length=24",
        "trainer.max_steps=1", "checkpoint.every_n_steps=1", f"runs_dir={tmp}/runs",
        "samples.every_n_steps=0", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("release") / "OneDiffusion"
    return root, write_release_folder(root, TINY_RELEASE_CONFIG)


def _ours(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from model.convert import from_released_name

    return {from_released_name(k): v for k, v in released.items()}


def test_released_folder_starts_a_fit_whose_first_loss_is_a_forward_of_its_weights(
    release, tmp_path
):
    from training.config import load_config
    from training.fit import build_datamodule, fit
    from training.module import OneGenModule

    root, tensors = release
    report = tmp_path / "report"
    cfg = load_config(None, _overrides(tmp_path, f"model.init_from={root}",
                                       "model.config=from_init", "optim.lr=0.0",
                                       f"debug.report_dir={report}"))  # fmt: skip
    result = fit(cfg)
    assert result.global_step == 1 and result.resumed_from is None
    start = json.loads((report / "start.json").read_text())
    assert start["global_step"] == 0 and start["ema_equals_model"]
    ours = _ours(tensors)
    sums = start["ranks"][0]
    for name, t in ours.items():  # every tensor of the folder, in the model and its EMA
        for prefix in ("model", "ema"):
            assert sums[f"{prefix}.{name}"]["local_sum"] == pytest.approx(
                float(t.double().sum()), abs=1e-4
            ), name
    first = json.loads((report / "end.json").read_text())["losses"][0]

    # The same first batch through a model loaded directly with the folder's tensors.
    direct_cfg = load_config(None, _overrides(tmp_path, "model.config=from_init"))
    direct_cfg.model.overrides = cfg.model.overrides  # the architecture the fit resolved
    direct_cfg.run_dir = str(tmp_path / "direct")
    module = OneGenModule(direct_cfg)
    module.configure_model()
    module.model.load_state_dict(ours)
    dm = build_datamodule(direct_cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        assert float(module.training_step(batch, 0)) == pytest.approx(first, rel=1e-6)
    random_start = OneGenModule(direct_cfg)
    random_start.configure_model()
    with torch.no_grad():
        assert float(random_start.training_step(batch, 0)) != pytest.approx(first, rel=1e-3)

    # Recorded: the run's config names the architecture in full, MLflow what it started from.
    saved = (Path(result.run_dir) / "config.yaml").read_text()
    assert "from_init" in saved and "hidden_size: 96" in saved
    record = json.loads((Path(result.run_dir) / "init_from.json").read_text())
    assert record["kind"] == "release" and record["path"] == str((root / "transformer").resolve())
    import hashlib

    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["sha256"] == {"diffusion_pytorch_model.safetensors": sha}
    import mlflow

    run = mlflow.MlflowClient(str(cfg.mlflow.tracking_uri)).get_run(result.run_id)
    assert run.data.tags["onegen.init_from"] == record["path"]
    assert json.loads(run.data.tags["onegen.init_from.sha256"]) == record["sha256"]


def test_a_runs_checkpoint_starts_a_new_run_from_its_weights(tmp_path):
    from model import NextDiT, get_config
    from training.checkpoint_io import load_weights
    from training.config import load_config
    from training.fit import fit

    first = fit(load_config(None, _overrides(tmp_path, "trainer.max_steps=4",
                                             "checkpoint.every_n_steps=4", "run_name=first")))  # fmt: skip
    ckpt = Path(first.checkpoint_dir) / "step00000004.ckpt"
    report = tmp_path / "report"
    second = fit(load_config(None, _overrides(
        tmp_path, f"model.init_from={ckpt}", "model.init_weights=model", "optim.lr=0.0",
        "run_name=second", f"debug.report_dir={report}")))  # fmt: skip
    assert second.run_dir != first.run_dir and second.run_id != first.run_id
    assert second.global_step == 1  # step 0 again, a fresh optimizer: not a resume
    trained = NextDiT(get_config("tiny"))
    load_weights(ckpt, trained, "model")
    end = torch.load(report / "end_state.pt", weights_only=True)["model"]
    for name, t in trained.state_dict().items():  # lr 0: still exactly what it started from
        assert torch.equal(end[f"model.{name}"], t), name
    record = json.loads((Path(second.run_dir) / "init_from.json").read_text())
    assert record["kind"] == "checkpoint" and record["source_run_id"] == first.run_id

    # The run folder itself: its newest whole checkpoint, stepping over a newer broken one.
    from training.init_from import find_init

    broken = Path(first.checkpoint_dir) / "step00000006.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    source = find_init(load_config(None, [f"model.init_from={first.run_dir}"]))
    assert source.path == ckpt and source.source_run_id == first.run_id
    ckpt.unlink()
    empty = load_config(None, [f"model.init_from={first.run_dir}"])
    with pytest.raises(ConfigError, match="a run folder with no whole checkpoint .broken: step0"):
        find_init(empty)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from orchestration.cli import main

    code = main(["train", "fit", "--config", str(REPO / "training/configs/demo.yaml"), *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return code, lines[-1] if lines else ""


def _bad_release(tmp_path: Path, change) -> Path:
    root = tmp_path / "bad"
    write_release_folder(root, TINY_RELEASE_CONFIG)
    change(root / "transformer")
    return root


def _edit_config(**changes):
    def change(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None and k in raw:
                del raw[k]
            else:
                raw[k] = v
        (folder / "config.json").write_text(json.dumps(raw))

    return change


def _pickled_only(folder: Path) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.bin")


def _truncated(folder: Path) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _lying_header(folder: Path) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4  # a tensor longer than its bytes
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "neither config.json nor transformer/config.json"),
        (_edit_config(flash=True), "unknown keys ['flash']"),
        (_edit_config(rotary_max_length=None), "missing ['rotary_max_length']"),
        (_edit_config(_class_name="UNet2DModel"), "_class_name is 'UNet2DModel'"),
        (_edit_config(pred_sigma=True), "pred_sigma is true"),
        (_pickled_only, "pickled weights are not read"),
        (_truncated, "diffusion_pytorch_model.safetensors"),
        (_lying_header, "diffusion_pytorch_model.safetensors"),
    ],
    ids=[
        "no-config",
        "unknown-key",
        "missing-key",
        "other-class",
        "pred-sigma",
        "bin-only",
        "truncated",
        "lying-header",
    ],  # fmt: skip
)
def test_a_folder_that_is_not_the_release_is_one_line(tmp_path, capsys, change, message):
    root = _bad_release(tmp_path, change)
    code, line = _cli([f"model.init_from={root}", "model.config=from_init",
                       f"runs_dir={tmp_path}/runs"], capsys)  # fmt: skip
    assert code == 2 and line.startswith(PREFIX + "model.init_from: ") and message in line, line
    assert not (tmp_path / "runs").exists()  # nothing started


def test_another_architecture_than_the_named_config_lists_what_differs(release, tmp_path, capsys):
    root, _ = release
    code, line = _cli([f"model.init_from={root}", "model.config=tiny",
                       "model.overrides.depth=3", f"runs_dir={tmp_path}/runs"], capsys)  # fmt: skip
    assert code == 2 and "holds another architecture" in line and "depth: 3" in line, line
    code, line = _cli([f"model.init_from={root}", "model.config=small",
                       f"runs_dir={tmp_path}/runs"], capsys)  # fmt: skip
    assert code == 2 and "hidden_size: 1152" in line and "caption_dim" in line, line


def test_init_from_with_a_resume_or_nothing_to_start_from(release, tmp_path, capsys):
    root, _ = release
    code, line = _cli([f"model.init_from={root}", "model.config=from_init", "resume=last",
                       f"runs_dir={tmp_path}/runs"], capsys)  # fmt: skip
    assert code == 2 and "not both" in line, line
    code, line = _cli(["model.config=from_init", f"runs_dir={tmp_path}/runs"], capsys)
    assert code == 2 and "from_init needs model.init_from" in line, line
    code, line = _cli([f"model.init_from={tmp_path}/nothing", f"runs_dir={tmp_path}/runs"], capsys)
    assert code == 2 and line.endswith("nothing: not found"), line
    code, line = _cli([f"model.init_from={root}", "model.init_weights=best"], capsys)
    assert code == 2 and "model.init_weights: must be one of ema, model" in line, line


@pytest.mark.slow
def test_two_process_fsdp_fit_loads_the_folder_sharded_and_broadcast(release, tmp_path):
    """Meta init under FSDP2 (gloo, 2 processes): rank 0 reads the folder once and each
    rank gets its shards; the model's own init does not overwrite them."""
    root, tensors = release
    report = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    (tmp_path / "fit.yaml").write_text("name: init-fsdp\n")
    cmd = [sys.executable, "-m", "training.fit", "--config", str(tmp_path / "fit.yaml"),
           *_overrides(tmp_path, f"model.init_from={root}", "model.config=from_init",
                       "optim.lr=0.0", "trainer.devices=2", "model.meta_init=true",
                       "mlflow.enabled=false", f"debug.report_dir={report}")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    start = json.loads((report / "start.json").read_text())
    assert start["built_on_meta"] and start["world_size"] == 2
    end = torch.load(report / "end_state.pt", weights_only=True)["model"]
    for name, t in _ours(tensors).items():  # lr 0: the model as loaded; its EMA of it
        assert torch.equal(end[f"model.{name}"], t), name
        torch.testing.assert_close(end[f"ema.{name}"], t, rtol=1e-6, atol=1e-7)
