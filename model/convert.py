"""Released OneDiffusion transformer checkpoints <-> NextDiT state dicts.

The release (lehduong/OneDiffusion, a diffusers ``ModelMixin``) stores the transformer as
``transformer/diffusion_pytorch_model*.safetensors`` with its own parameter names.
:data:`NAME_MAP` is the single table between our names and those; ``*`` stands for the
block index. Everything else (shapes, layouts) already matches, so conversion is renaming.

Loading is strict: one error lists every missing key, unexpected key and shape mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# ours -> released, by parameter-name stem (the trailing ".weight"/".bias" carries over).
NAME_MAP: dict[str, str] = {
    "patch_embed": "x_embedder",
    "time_embed.fc1": "t_embedder.mlp.0",
    "time_embed.fc2": "t_embedder.mlp.2",
    "caption_embed.norm": "y_embedder.0",
    "caption_embed.proj": "y_embedder.1",
    "layers.*.attn.to_q": "layers.*.attention.wq",
    "layers.*.attn.to_k": "layers.*.attention.wk",
    "layers.*.attn.to_v": "layers.*.attention.wv",
    "layers.*.attn.to_out": "layers.*.attention.wo",
    "layers.*.attn.to_k_text": "layers.*.attention.wk_y",
    "layers.*.attn.to_v_text": "layers.*.attention.wv_y",
    "layers.*.attn.text_gate": "layers.*.attention.gate",
    "layers.*.attn.norm_q": "layers.*.attention.q_norm",
    "layers.*.attn.norm_k": "layers.*.attention.k_norm",
    "layers.*.attn.norm_k_text": "layers.*.attention.ky_norm",
    "layers.*.ffn.w_gate": "layers.*.feed_forward.w1",
    "layers.*.ffn.w_down": "layers.*.feed_forward.w2",
    "layers.*.ffn.w_up": "layers.*.feed_forward.w3",
    "layers.*.attn_norm_in": "layers.*.attention_norm1",
    "layers.*.attn_norm_out": "layers.*.attention_norm2",
    "layers.*.ffn_norm_in": "layers.*.ffn_norm1",
    "layers.*.ffn_norm_out": "layers.*.ffn_norm2",
    "layers.*.text_norm": "layers.*.attention_y_norm",
    "layers.*.modulation": "layers.*.adaLN_modulation.1",
    "final.modulation": "final_layer.adaLN_modulation.1",
    "final.linear": "final_layer.linear",
}
_REVERSE = {released: ours for ours, released in NAME_MAP.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.")
_SUFFIXES = ("weight", "bias")


def _translate(name: str, table: Mapping[str, str]) -> str | None:
    """Rename one parameter through ``table``; None when the name is not in it."""
    index = None
    match = _LAYER.match(name)
    if match:
        index = match.group(1)
        name = "layers.*." + name[match.end() :]
    stem, _, suffix = name.rpartition(".")
    if stem in table and suffix in _SUFFIXES:
        out = f"{table[stem]}.{suffix}"
    elif name in table:  # bare parameters such as the text gate
        out = table[name]
    else:
        return None
    return out.replace("*", index) if index is not None else out


def to_released_name(name: str) -> str:
    out = _translate(name, NAME_MAP)
    if out is None:
        raise KeyError(f"no released name for {name!r}: add it to model.convert.NAME_MAP")
    return out


def from_released_name(name: str) -> str | None:
    """Our name for a released parameter, or None if the release name is unknown."""
    return _translate(name, _REVERSE)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a safetensors/torch file, or every weight file of a folder.

    A pipeline folder is accepted too: its ``transformer/`` subfolder is used. ``.bin``/``.pt``
    files are read with ``weights_only=True`` (no pickle code execution).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        files = sorted(path.glob("*.safetensors")) or sorted(
            [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")]
        )
        if not files:
            raise FileNotFoundError(f"no .safetensors/.bin/.pt weights in {path}")
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(read_state_dict(file))
        return state
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_released(model: nn.Module) -> dict[str, Tensor]:
    """Our model's weights under the release's names (save with safetensors ``save_file``)."""
    return {to_released_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}


def released_to_ours(
    released: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Released tensors under our names, checked against ``expected`` (a model's state dict,
    meta tensors are fine): one error lists every missing key, unexpected key and shape
    mismatch."""
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in released.items():
        ours = from_released_name(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
        else:
            mapped[ours] = tensor
    missing = [f"{to_released_name(k)} (ours: {k})" for k in expected if k not in mapped]
    shapes = [
        f"{to_released_name(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = ["released checkpoint does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)))
        raise CheckpointMismatchError("\n".join(lines))
    return mapped


def load_released(model: nn.Module, state_dict_or_path: Mapping[str, Tensor] | str | Path) -> None:
    """Load released weights into ``model`` in place; strict about names and shapes.

    A model on the meta device gets the checkpoint's tensors assigned (dtype included), so a
    2.8B model never needs a random init first.
    """
    if isinstance(state_dict_or_path, (str, Path)):
        released = read_state_dict(state_dict_or_path)
    else:
        released = dict(state_dict_or_path)
    mapped = released_to_ours(released, model.state_dict())
    assign = any(p.is_meta for p in model.parameters())
    model.load_state_dict(mapped, strict=True, assign=assign)
