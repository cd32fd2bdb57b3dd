"""Released-checkpoint conversion: round trips, strict errors, files, release shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model import NextDiT, get_config
from model.convert import (
    NAME_MAP,
    CheckpointMismatchError,
    export_released,
    from_released_name,
    load_released,
    to_released_name,
)
from tests.helpers.threads import one_thread  # noqa: F401  (autouse fixture)


def trained_tiny(seed: int = 0) -> NextDiT:
    """A tiny model whose every parameter differs from a fresh init."""
    torch.manual_seed(seed)
    model = NextDiT(get_config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def run(model: NextDiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    with torch.no_grad():
        return model(
            torch.randn(2, 2, cfg.in_channels, 8, 8, generator=gen),
            torch.rand(2, 2, generator=gen),
            torch.randn(2, 4, cfg.caption_dim, generator=gen),
            torch.ones(2, 4, dtype=torch.bool),
        )


def test_round_trip_gives_identical_outputs() -> None:
    src = trained_tiny()
    released = export_released(src)
    assert {
        "x_embedder.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.0.weight",
        "layers.1.attention.wk_y.weight",
        "layers.0.attention.gate",
        "layers.0.adaLN_modulation.1.weight",
        "final_layer.linear.bias",
    } <= set(released)
    dst = NextDiT(get_config("tiny"))
    assert not torch.equal(run(dst), run(src))
    load_released(dst, released)
    assert torch.equal(run(dst), run(src))


def test_name_map_is_a_bijection_over_the_model() -> None:
    with torch.device("meta"):
        names = list(NextDiT(get_config("onediffusion-2.8b")).state_dict())
    released = [to_released_name(n) for n in names]
    assert len(set(released)) == len(names)
    assert [from_released_name(r) for r in released] == names
    used = {n.split(".", 2)[2] if n.startswith("layers.") else n for n in names}
    stems = {k.removeprefix("layers.*.") for k in NAME_MAP}
    assert all(any(u == s or u.startswith(s + ".") for u in used) for s in stems)  # no dead rows


def test_missing_and_unexpected_keys_are_named() -> None:
    released = export_released(trained_tiny())
    del released["layers.1.attention.wk_y.weight"]
    released["layers.0.attention.bogus.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_released(NextDiT(get_config("tiny")), released)
    msg = str(err.value)
    assert "missing (1): layers.1.attention.wk_y.weight" in msg
    assert "unexpected (1): layers.0.attention.bogus.weight" in msg


def test_shape_mismatch_is_named() -> None:
    released = export_released(trained_tiny())
    with pytest.raises(CheckpointMismatchError, match=r"x_embedder.weight: checkpoint \(96, 64\)"):
        load_released(NextDiT(get_config("tiny", in_channels=4)), released)


def test_load_from_safetensors_file_dir_and_torch_file(tmp_path) -> None:
    src = trained_tiny()
    ref = run(src)
    released = export_released(src)
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    file = pipeline / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file(released, str(file))
    for path in (file, pipeline / "transformer", pipeline):
        dst = NextDiT(get_config("tiny"))
        load_released(dst, path)
        assert torch.equal(run(dst), ref), path
    torch.save(released, tmp_path / "weights.bin")
    dst = NextDiT(get_config("tiny"))
    load_released(dst, str(tmp_path / "weights.bin"))
    assert torch.equal(run(dst), ref)
    with pytest.raises(FileNotFoundError):
        load_released(dst, tmp_path / "transformer_missing_dir_is_empty")


def test_meta_model_gets_checkpoint_assigned() -> None:
    src = trained_tiny()
    with torch.device("meta"):
        dst = NextDiT(get_config("tiny"))
    load_released(dst, export_released(src))
    assert not any(p.is_meta for p in dst.parameters())
    assert torch.equal(run(dst), run(src))


def test_release_shapes_of_onediffusion() -> None:
    """Shapes the released 2.8B checkpoint has (read off its NextDiT code)."""
    with torch.device("meta"):
        released = export_released(NextDiT(get_config("onediffusion-2.8b")))
    expected = {
        "x_embedder.weight": (3840, 64),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.2.weight": (1024, 1024),
        "y_embedder.0.weight": (2048,),
        "y_embedder.1.weight": (1024, 2048),
        "layers.0.attention.wq.weight": (3840, 3840),
        "layers.0.attention.wk.weight": (960, 3840),
        "layers.0.attention.wk_y.weight": (960, 2048),
        "layers.0.attention.gate": (32,),
        "layers.0.attention.q_norm.bias": (3840,),
        "layers.0.attention.ky_norm.weight": (960,),
        "layers.0.feed_forward.w1.weight": (10240, 3840),
        "layers.0.feed_forward.w2.weight": (3840, 10240),
        "layers.15.attention_y_norm.weight": (2048,),
        "layers.15.adaLN_modulation.1.weight": (15360, 1024),
        "final_layer.adaLN_modulation.1.weight": (3840, 1024),
        "final_layer.linear.weight": (64, 3840),
    }
    assert {k: tuple(released[k].shape) for k in expected} == expected
    # per block: 7 attention tensors, 6 qk-norm, 3 ffn, 5 norms, 2 adaLN; 14 outside blocks
    assert len(released) == 16 * 23 + 14
