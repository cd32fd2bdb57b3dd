"""Frozen VAE and T5 wrappers: shapes, latent scaling, masks, offline round trips."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from model.encoders import FrozenTextEncoder, FrozenVAE
from training.encoders import TINY_TOKENS


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or DNS look-up fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # restored afterwards; the loader must set them


@pytest.fixture(scope="module")
def vae() -> FrozenVAE:
    return FrozenVAE.tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


@pytest.fixture(scope="module")
def text_encoder(text_dir) -> FrozenTextEncoder:
    return FrozenTextEncoder.tiny(text_dir, extra_tokens=TINY_TOKENS)


# --- VAE ----------------------------------------------------------------------------


def test_vae_encode_shape_and_scaling(vae, images):
    lat = vae.encode(images)
    assert lat.shape == (2, 16, 4, 6) and lat.dtype == torch.float32
    assert vae.latent_channels == 16 and vae.downsample == 8
    with torch.no_grad():
        raw = vae.vae.encode(images).latent_dist.mode()
    cfg = vae.vae.config
    assert cfg.shift_factor == pytest.approx(0.0609) and cfg.scaling_factor == pytest.approx(1.5305)
    torch.testing.assert_close(lat, (raw - cfg.shift_factor) * cfg.scaling_factor)
    # the release's convention: scaling only
    no_shift = FrozenVAE(vae.vae, apply_shift=False)
    torch.testing.assert_close(no_shift.encode(images), raw * cfg.scaling_factor)


def test_vae_shift_none_means_zero(vae, images):
    vae.vae.register_to_config(shift_factor=None)
    try:
        with torch.no_grad():
            raw = vae.vae.encode(images).latent_dist.mode()
        assert vae.shift_factor == 0.0
        torch.testing.assert_close(vae.encode(images), raw * vae.scaling_factor)
    finally:
        vae.vae.register_to_config(shift_factor=0.0609)


def test_vae_views_and_sampling(vae, images):
    views = torch.stack([images, images.flip(-1)], dim=1)  # [B=2, V=2, 3, H, W]
    lat = vae.encode(views)
    assert lat.shape == (2, 2, 16, 4, 6)
    torch.testing.assert_close(lat[:, 0], vae.encode(images))
    s1 = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, vae.encode(images))


def test_vae_decode_inverts_the_scaling(vae, images):
    lat = vae.encode(images)
    out = vae.decode(lat)
    assert out.shape == images.shape and out.dtype == torch.float32
    with torch.no_grad():
        raw = vae.vae.encode(images).latent_dist.mode()
        ref = vae.vae.decode(raw).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert vae.decode(lat[None]).shape == (1, *images.shape)


def test_vae_frozen(vae, images):
    owner = nn.ModuleDict({"vae": vae, "head": nn.Linear(2, 2)})
    owner.train()
    assert owner["head"].training and not vae.training and not vae.vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.enable_grad():
        assert not vae.encode(images.requires_grad_(True)).requires_grad
    images.requires_grad_(False)


def test_vae_save_and_load_offline(vae, images, tmp_path, no_network):
    vae.save_pretrained(tmp_path / "vae")
    flat = FrozenVAE.from_pretrained(tmp_path / "vae")
    root = FrozenVAE.from_pretrained(tmp_path)  # pipeline root with vae/
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    lat = vae.encode(images)
    for loaded in (flat, root):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.encode(images), lat)
        assert torch.equal(loaded.decode(lat), vae.decode(lat))
    half = FrozenVAE.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.encode(images).dtype == torch.float32


def test_vae_missing_path_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="local folders only"):
        FrozenVAE.from_pretrained(tmp_path / "nope")


# --- text encoder ---------------------------------------------------------------------


def test_text_mask_matches_token_counts_and_pads(text_encoder):
    prompts = ["a photo of cat", "", "[[text2image]] red moon in the sky [[img0]]"]
    feats, mask = text_encoder(prompts)
    assert feats.shape == (3, 300, 32) and feats.dtype == torch.float32
    assert mask.shape == (3, 300) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4 + 1, 0 + 1, 7 + 1]  # words + </s>
    assert torch.all(mask[:, :1]) and not torch.any(mask[:, 8:])
    assert torch.equal(mask, torch.sort(mask.int(), dim=1, descending=True).values.bool())
    ids, _ = text_encoder.tokenize(prompts)
    tok = text_encoder.tokenizer
    assert ids[2, 0] == tok.convert_tokens_to_ids("[[text2image]]")  # one whole token
    assert ids[2, 6] == tok.convert_tokens_to_ids("[[img0]]")
    assert ids[0, 4] == tok.eos_token_id and torch.all(ids[:, 8:] == tok.pad_token_id)
    unk = text_encoder.tokenize(["zebra"])[0]
    assert unk[0, 0] == tok.unk_token_id


def test_text_truncation_keeps_eos(text_dir):
    enc = FrozenTextEncoder.tiny(text_dir, max_length=8)
    long = " ".join(["cat"] * 20)
    feats, mask = enc([long, "dog"])
    assert feats.shape == (2, 8, 32)
    assert mask[0].all() and mask[1].sum() == 2
    ids, _ = enc.tokenize([long])
    assert ids[0, -1] == enc.tokenizer.eos_token_id


def test_text_padding_is_masked_out(text_encoder, text_dir):
    """Valid tokens' features do not depend on how much padding follows:
    proves the mask reaches the encoder's attention."""
    short = FrozenTextEncoder(text_encoder.model, text_encoder.tokenizer, max_length=12)
    prompts = ["a photo of cat", "the red house"]
    f300, m300 = text_encoder(prompts)
    f12, m12 = short(prompts)
    assert torch.equal(m300[:, :12], m12)
    torch.testing.assert_close(f300[:, :12][m12], f12[m12], atol=1e-5, rtol=1e-5)


def test_text_encoder_frozen_and_deterministic(text_encoder):
    owner = nn.ModuleDict({"te": text_encoder})
    owner.train()  # T5 has dropout 0.1: it must stay off
    assert not text_encoder.training and not text_encoder.model.training
    assert not any(p.requires_grad for p in text_encoder.parameters())
    a, _ = text_encoder(["a photo of cat"])
    b, _ = text_encoder(["a photo of cat"])
    assert torch.equal(a, b) and not a.requires_grad
    with pytest.raises(TypeError):
        text_encoder("a photo of cat")


def test_text_save_and_load_offline(text_encoder, tmp_path, no_network):
    prompts = ["[[depth2image]] a photo of cat", "", " ".join(["dog"] * 400)]
    feats, mask = text_encoder(prompts)
    text_encoder.save_pretrained(tmp_path / "flat")
    text_encoder.model.save_pretrained(tmp_path / "root" / "text_encoder")
    text_encoder.tokenizer.save_pretrained(tmp_path / "root" / "tokenizer")
    for folder in (tmp_path / "flat", tmp_path / "root"):
        loaded = FrozenTextEncoder.from_pretrained(folder)
        assert not loaded.training and loaded.max_length == 300 and loaded.dim == 32
        f2, m2 = loaded(prompts)
        assert torch.equal(m2, mask) and torch.equal(f2, feats)
        assert torch.equal(loaded.tokenize(prompts)[0], text_encoder.tokenize(prompts)[0])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    bf16 = FrozenTextEncoder.from_pretrained(tmp_path / "flat", dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16 and bf16(prompts)[0].dtype == torch.float32


def test_text_missing_path_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        FrozenTextEncoder.from_pretrained(tmp_path / "nope")
    (tmp_path / "only_model").mkdir()
    (tmp_path / "only_model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        FrozenTextEncoder.from_pretrained(tmp_path / "only_model")


# --- the pretrained folders, checked before a fit builds anything ----------------------


def _pretrained(tmp_path, vae, text_encoder) -> list[str]:
    """Overrides of a fit on the tiny VAE and T5 saved as real folders: a pipeline root
    (``vae/``) and a flat text encoder folder."""
    vae.save_pretrained(tmp_path / "root" / "vae")
    text_encoder.save_pretrained(tmp_path / "t5")
    return [
        "encoders.kind=pretrained",
        f"encoders.vae_path={tmp_path / 'root'}",
        f"encoders.text_path={tmp_path / 't5'}",
    ]


def _fit_args(overrides: list[str]):
    import argparse

    return argparse.Namespace(config=None, overrides=overrides, print_config=False)


def test_pretrained_encoder_folders_are_checked_when_a_fit_starts(
    vae, text_encoder, tmp_path, capsys
):
    import json
    import struct

    from training.config import ConfigError, check_encoder_weights, config_from_args, load_config

    overrides = _pretrained(tmp_path, vae, text_encoder)
    check_encoder_weights(load_config(None, overrides))  # genuine folders pass

    st = tmp_path / "root" / "vae" / "diffusion_pytorch_model.safetensors"
    size = st.stat().st_size
    st.write_bytes(struct.pack("<Q", size) + st.read_bytes()[8:])
    capsys.readouterr()  # the saves' progress bars
    assert config_from_args(_fit_args(overrides), "onegen train fit") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"onegen train fit: error: encoders.vae_path: {st}: safetensors header length {size} "
        f"runs past the end of the file ({size} bytes)"
    ]
    printed = _fit_args(overrides)
    printed.print_config = True  # printing a config reads no weights
    assert config_from_args(printed, "onegen train fit") == 0
    capsys.readouterr()

    vae.save_pretrained(tmp_path / "root" / "vae")
    config = tmp_path / "t5" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bert"}))
    with pytest.raises(ConfigError) as err:
        check_encoder_weights(load_config(None, overrides))
    assert str(err.value).startswith(f"encoders.text_path: {config}: model_type is 'bert'")
    assert "T5EncoderModel, which needs model_type 't5'" in str(err.value)
    config.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^encoders\.text_path: .*config\.json: not JSON"):
        check_encoder_weights(load_config(None, overrides))
    with pytest.raises(ConfigError, match=r"^encoders\.vae_path: .*needs a local folder"):
        check_encoder_weights(load_config(None, ["encoders.kind=pretrained"]))
