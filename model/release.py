"""The released OneDiffusion transformer folder: its ``config.json`` <-> :class:`NextDiTConfig`,
and reading / writing the folder (diffusers layout, safetensors only).

The release (lehduong/OneDiffusion) saves its ``NextDiT`` with diffusers' ``save_pretrained``:
``transformer/config.json`` holds every argument of ``NextDiT.__init__`` (listed in
:data:`RELEASE_KEYS` with the release's defaults) plus ``_class_name: "NextDiT"``, and the
weights are ``diffusion_pytorch_model.safetensors`` or shards with a
``diffusion_pytorch_model.safetensors.index.json``. Parameter names are mapped by
``model.convert``.

Reading is strict: a key the release's ``__init__`` does not take, a missing one, or a
value our model cannot reproduce (``pred_sigma``, a non-RMS norm) is one line naming the key
and the file. Nothing from a folder is executed: safetensors and JSON only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import NextDiTConfig

RELEASE_CLASS = "NextDiT"
TRANSFORMER = "transformer"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1000**3  # diffusers' default max_shard_size ("5GB")
DIFFUSERS_VERSION = "0.30.3"  # what the release's requirements pin

# ``NextDiT.__init__``'s arguments and defaults in the release's modeling_nextdit.py.
RELEASE_KEYS: dict[str, Any] = {
    "input_size": [1, 32, 32],
    "patch_size": [1, 2, 2],
    "in_channels": 16,
    "hidden_size": 4096,
    "depth": 32,
    "num_heads": 32,
    "num_kv_heads": None,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "pred_sigma": False,
    "caption_channels": 4096,
    "qk_norm": False,
    "norm_type": "rms",
    "model_max_length": 120,
    "rotary_max_length": 384,
    "rotary_max_length_t": None,
}
# Widths the release hard-codes (not in its config): a config of ours that differs cannot be
# written in its layout.
RELEASE_FIXED: dict[str, Any] = {
    "timestep_freq_dim": 256,
    "timestep_scale": 1000.0,
    "max_cond_dim": 1024,
    "rope_theta": 10_000.0,
}
# The fields that decide the architecture (``name`` and the runtime-only softcap do not).
STRUCTURAL = (
    "hidden_size",
    "depth",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "patch_size",
    "in_channels",
    "caption_dim",
    "qk_norm",
    "norm_eps",
    *RELEASE_FIXED,
)


class ReleaseFormatError(ValueError):
    """A folder or config that is not the release's layout; the message is one line."""


def release_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width of the release's ``LLamaFeedForward`` (given ``hidden_dim=4*dim``)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _typed(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``raw[key]`` if it is a ``kind`` (a JSON ``true`` is not a number)."""
    value = raw[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ReleaseFormatError(f"{where}: {key} is {value!r} ({type(value).__name__})")
    return value


def config_from_release(raw: Mapping[str, Any], where: str = CONFIG_NAME) -> NextDiTConfig:
    """Our config of the transformer a release ``config.json`` describes (``name``
    ``from_init``). Keys starting with ``_`` are diffusers' bookkeeping; ``_class_name``
    must be ``NextDiT``."""
    if raw.get("_class_name") != RELEASE_CLASS:
        raise ReleaseFormatError(
            f"{where}: _class_name is {raw.get('_class_name')!r}, not {RELEASE_CLASS!r} "
            "(the OneDiffusion transformer)"
        )
    keys = {k for k in raw if not k.startswith("_")}
    unknown = sorted(keys - set(RELEASE_KEYS))
    missing = sorted(set(RELEASE_KEYS) - keys)
    if unknown or missing:
        parts = [
            f"unknown keys {unknown}" if unknown else "",
            f"missing {missing}" if missing else "",
        ]
        raise ReleaseFormatError(
            f"{where}: not the release's NextDiT config: {'; '.join(p for p in parts if p)}"
        )
    if raw["pred_sigma"]:
        raise ReleaseFormatError(f"{where}: pred_sigma is true; One-Gen predicts velocity only")
    if raw["norm_type"] != "rms":
        raise ReleaseFormatError(f"{where}: norm_type is {raw['norm_type']!r}, not 'rms'")
    ints = ("in_channels", "hidden_size", "depth", "num_heads", "multiple_of", "caption_channels")
    for key in ints:
        if _typed(raw, key, int, where) <= 0:
            raise ReleaseFormatError(f"{where}: {key} is {raw[key]!r}, not a positive size")
    patch = raw["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) for p in patch)):
        raise ReleaseFormatError(f"{where}: patch_size is {patch!r}, not [views, rows, cols]")
    kv = raw["num_kv_heads"]
    if kv is not None:
        _typed(raw, "num_kv_heads", int, where)
    mult = raw["ffn_dim_multiplier"]
    if mult is not None:
        _typed(raw, "ffn_dim_multiplier", (int, float), where)
    _typed(raw, "norm_eps", (int, float), where)
    _typed(raw, "qk_norm", bool, where)
    hidden = int(raw["hidden_size"])
    try:
        return NextDiTConfig(
            name="from_init",
            hidden_size=hidden,
            depth=int(raw["depth"]),
            num_heads=int(raw["num_heads"]),
            num_kv_heads=int(kv or raw["num_heads"]),
            ffn_hidden_size=release_ffn_hidden(hidden, int(raw["multiple_of"]), mult),
            patch_size=(patch[0], patch[1], patch[2]),
            in_channels=int(raw["in_channels"]),
            caption_dim=int(raw["caption_channels"]),
            qk_norm=bool(raw["qk_norm"]),
            norm_eps=float(raw["norm_eps"]),
        )
    except ValueError as exc:
        raise ReleaseFormatError(f"{where}: {exc}") from None


def _ffn_keys(cfg: NextDiTConfig) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` that give ``cfg.ffn_hidden_size`` in the
    release's formula: 256 and none where that already does (every shipped config)."""
    if release_ffn_hidden(cfg.hidden_size, 256, None) == cfg.ffn_hidden_size:
        return 256, None
    base = int(2 * 4 * cfg.hidden_size / 3)
    # Rounding up to a multiple of the width itself gives the width from anything in (0, w].
    if base <= cfg.ffn_hidden_size:
        return cfg.ffn_hidden_size, None
    return cfg.ffn_hidden_size, cfg.ffn_hidden_size / base


def config_to_release(cfg: NextDiTConfig, **extra: Any) -> dict[str, Any]:
    """The release's ``config.json`` for ``cfg``; ``extra`` sets the keys that do not
    change the weights (``input_size``, ``model_max_length``, ``rotary_max_length*``),
    e.g. as read from the folder a fit started from."""
    fixed = [k for k, v in RELEASE_FIXED.items() if getattr(cfg, k) != v]
    if fixed:
        raise ReleaseFormatError(
            f"model config {cfg.name!r}: {fixed[0]}={getattr(cfg, fixed[0])!r} differs from "
            f"the release's fixed {RELEASE_FIXED[fixed[0]]!r}; its layout cannot hold it"
        )
    multiple_of, mult = _ffn_keys(cfg)
    out: dict[str, Any] = {"_class_name": RELEASE_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    out.update(RELEASE_KEYS)
    out.update(
        {
            "patch_size": list(cfg.patch_size),
            "in_channels": cfg.in_channels,
            "hidden_size": cfg.hidden_size,
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": mult,
            "norm_eps": cfg.norm_eps,
            "caption_channels": cfg.caption_dim,
            "qk_norm": cfg.qk_norm,
        }
    )
    unknown = sorted(set(extra) - set(RELEASE_KEYS))
    if unknown:
        raise ReleaseFormatError(f"not keys of the release's config: {unknown}")
    out.update(extra)
    assert config_from_release(out).ffn_hidden_size == cfg.ffn_hidden_size
    return out


def config_differences(named: NextDiTConfig, found: NextDiTConfig) -> list[str]:
    """``field: named vs found`` for every architecture field that differs."""
    return [
        f"{f}: {getattr(named, f)!r} in {named.name!r}, {getattr(found, f)!r} in the folder"
        for f in STRUCTURAL
        if getattr(named, f) != getattr(found, f)
    ]


# --------------------------------------------------------------------------- folders


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path`` itself, or its
    ``transformer/`` (a pipeline root)."""
    p = Path(path)
    if not p.is_dir():
        raise ReleaseFormatError(f"{p}: not a folder (a released OneDiffusion folder)")
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / TRANSFORMER / CONFIG_NAME).is_file():
        return p / TRANSFORMER
    raise ReleaseFormatError(
        f"{p}: neither {CONFIG_NAME} nor {TRANSFORMER}/{CONFIG_NAME} (the release's layout)"
    )


def read_release_config(folder: str | Path) -> dict[str, Any]:
    path = transformer_folder(folder) / CONFIG_NAME
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ReleaseFormatError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ReleaseFormatError(f"{path}: not a JSON object")
    return raw


def release_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a transformer folder (the index's shards, or the one file).
    ``.bin`` / ``.pt`` weights are refused by name: pickle runs code."""
    t = transformer_folder(folder)
    if (t / INDEX_NAME).is_file():
        try:
            index = json.loads((t / INDEX_NAME).read_bytes())
            files = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReleaseFormatError(f"{t / INDEX_NAME}: not a shard index ({exc})") from None
        return [t / f for f in files]
    if (t / WEIGHTS_NAME).is_file():
        return [t / WEIGHTS_NAME]
    pickled = sorted(p.name for p in t.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise ReleaseFormatError(
            f"{t}: only {pickled}; pickled weights are not read (convert them to safetensors)"
        )
    raise ReleaseFormatError(f"{t}: no {WEIGHTS_NAME} and no {INDEX_NAME}")


def read_release_weights(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of the folder, under the release's names, on CPU."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in release_weight_files(folder):
        state.update(load_file(str(file), device="cpu"))
    return state


def save_release_folder(
    released: Mapping[str, Tensor],
    config: Mapping[str, Any],
    out: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``out/transformer/`` (config + safetensors, sharded with an index when past
    ``max_shard_bytes``) from tensors under the release's names; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(out) / TRANSFORMER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("diffusion_pytorch_model*.safetensors"), folder / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in released.items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=meta)
    else:
        n = len(shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            file = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(folder / file), metadata=meta)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return folder


def tensor_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(math.prod(t.shape) * t.element_size() for t in state.values())


def cast_floats(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
