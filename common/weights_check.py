"""Reading a weights folder or file as its loader will, without loading a tensor: the check
the driver runs before Ray starts (``pipelines.dag``) and a fit runs on its encoders
(``training.config``), so a missing file, a config of another model or a header that lies
is one line naming the file, not four tracebacks from inside an actor.

One function per format, each as strict as the loader it stands in for:

- a ``save_pretrained`` folder (:class:`PretrainedFolder`): the layout
  (:func:`check_pretrained_folder`), ``config.json`` parses and names the model the
  loader builds, and every weights file reads (sharded: the index names files that exist
  and hold the tensors it maps to them);
- a ``.safetensors`` file (:func:`check_safetensors`): the 8-byte header length fits the
  file, the header is JSON, every tensor's ``data_offsets`` lie in the data section, match
  its dtype and shape and tile the section exactly (what the safetensors reader checks);
- a ``torch.save`` state dict (:func:`check_state_dict_pickle`: SAM's ``.pth``, a
  ``pytorch_model.bin``): its pickle scanned opcode by opcode (nothing runs) and every
  global it names one torch's weights-only reader admits;
- an ultralytics ``.pt``: the detectors' own allowlist scan
  (``datagen.stages.models.common.check_ultralytics_pt``), kept with their loader.

Standard library only at import: validating a DAG or a fit config imports no torch. The
pickle checks import torch when a ``.pth`` / ``.bin`` / ``.pt`` is
actually checked, to use the loaders' exact allowlists rather than a copy that could drift.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.safe_pt import scan_pickle, torch_save_pickle


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded safely or does not fit the model."""


# What a check raises for a bad checkpoint (the callers word it as their one line): its own
# errors, a missing or unreadable file, a pickle the restricted scan refuses, a broken zip.
READ_ERRORS = (CheckpointError, OSError, pickle.UnpicklingError, zipfile.BadZipFile)

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub / transformers 5
MAX_HEADER_BYTES = 100_000_000  # the safetensors reader's own limit
MAX_STATE_DICT_PICKLE = 256 << 20  # a state dict's pickle (tensors live outside it)
# Bits per element of each safetensors dtype (F4 / F6: packed sub-byte floats).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}


# -- safetensors --------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed header of the safetensors file at ``path`` and its data section's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header length {n} runs past the end of the file "
                f"({size} bytes)"
            )
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes (limit 100 MB)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, size - 8 - n


def _tensor_span(path: Path, name: str, info: Any, data_bytes: int) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, checked against its dtype, shape and the data
    section."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_bytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the data "
            f"section ({data_bytes} bytes)"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes, but {dtype} {shape} "
            f"needs {bits / 8:g}"
        )
    return begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(path: str | Path) -> set[str]:
    """The tensor names of the safetensors file at ``path``, read from its header only;
    :class:`CheckpointError` naming the file and the first thing its reader would refuse."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    header, data_bytes = _read_header(path)
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ is not a mapping of strings")
    spans = sorted((_tensor_span(path, n, i, data_bytes), n) for n, i in header.items())
    at = 0
    for (begin, end), name in spans:
        if begin != at:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data section, "
                f"not {at} (tensors overlap or leave a gap)"
            )
        at = end
    if at != data_bytes:
        raise CheckpointError(
            f"{path}: the tensors end at byte {at} of a {data_bytes}-byte data section"
        )
    return set(header)


def check_sharded(index: str | Path, check_shard: Callable[[Path], set[str] | None]) -> None:
    """A ``*.index.json`` of sharded weights: its ``weight_map`` names files beside it that
    exist, each passes ``check_shard``, and holds the tensors mapped to it (when
    ``check_shard`` lists them)."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a shard index with a weight_map ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is not a mapping of tensors to files")
    shards: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index}: maps {tensor!r} to {file!r}, not a file beside it")
        shards.setdefault(file, []).append(tensor)
    for file, tensors in sorted(shards.items()):
        shard = index.parent / file
        if not shard.is_file():
            raise CheckpointError(f"{index}: names shard {file!r}, which does not exist")
        held = check_shard(shard)
        absent = [t for t in tensors if held is not None and t not in held]
        if absent:
            raise CheckpointError(f"{index}: maps {absent[0]!r} to {file}, which does not hold it")


# -- pickles ------------------------------------------------------------------------------


def check_state_dict_pickle(path: str | Path) -> None:
    """A ``torch.save`` zip that ``torch.load(weights_only=True)`` (SAM's ``.pth``,
    transformers' ``.bin``) reads: its pickle scanned (nothing runs), every global it names
    in torch's own weights-only allowlist."""
    from torch._weights_only_unpickler import _get_allowed_globals

    path = str(path)
    data = torch_save_pickle(path, MAX_STATE_DICT_PICKLE, CheckpointError)
    found = scan_pickle(data, path, CheckpointError)
    refused = sorted(found.names - set(_get_allowed_globals()))
    if refused:
        raise CheckpointError(
            f"{path}: its pickle references {refused[0]!r}, which torch's weights-only "
            "reader refuses (a state dict holds tensors only; nothing from it was run)"
        )


def check_state_dict_file(path: str | Path) -> None:
    """A state dict file (SAM): ``.safetensors``, else a ``torch.save`` zip."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: not a file (a .pth or .safetensors state dict)")
    if str(path).endswith(".safetensors"):
        check_safetensors(path)
    else:
        check_state_dict_pickle(path)


# -- save_pretrained folders --------------------------------------------------------------


def check_pretrained_folder(
    path: Path, what: str, *any_of: Sequence[str], stem: str = "model", pickled_ok: bool = False
) -> Path:
    """A ``save_pretrained`` folder this project loads: ``config.json``, the weights (file
    or shard index, ``stem`` as transformers' ``model`` / diffusers'
    ``diffusion_pytorch_model``) and, for each of ``any_of``, one of its files (processor,
    tokenizer); returns the weights file the loader reads. ``.bin`` weights are refused by
    name (pickle runs code) unless ``pickled_ok`` (a loader that reads them weights-only)."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} weights {str(path)!r}: not a folder (save_pretrained format)"
        )
    names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    if pickled_ok:
        names += [f"{stem}.bin", f"{stem}.bin.index.json"]
    weights = next((path / f for f in names if (path / f).is_file()), None)
    if weights is None and not pickled_ok:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise CheckpointError(
                f"{what} weights {str(path)!r} have only {pickled}: .bin is pickle, not loaded; "
                "convert the weights to safetensors"
            )
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    if weights is None:
        missing.append(names[0])
    missing += [group[0] for group in any_of if not any((path / f).is_file() for f in group)]
    if missing:
        raise FileNotFoundError(
            f"{what} weights {str(path)!r} lack {missing}: a save_pretrained folder with "
            "safetensors weights and its processor files is needed"
        )
    assert weights is not None
    return weights


def check_weights_file(weights: Path) -> None:
    """The weights file :func:`check_pretrained_folder` found: safetensors or a weights-only
    pickle, one file or a shard index."""
    name = weights.name
    if name.endswith(".index.json"):
        check_sharded(weights, check_safetensors if ".safetensors" in name else _unlisted)
    elif name.endswith(".safetensors"):
        check_safetensors(weights)
    else:
        check_state_dict_pickle(weights)


def _unlisted(shard: Path) -> None:
    """A pickled shard: scanned; which tensors it holds is not read (that would load it)."""
    check_state_dict_pickle(shard)


@dataclass(frozen=True)
class PretrainedFolder:
    """A ``save_pretrained`` folder as one loader reads it. ``loads``: the class that
    builds the model (named in errors); ``expects``: the values of ``config.json``'s
    ``config_key`` it builds (``model_type``; diffusers: ``_class_name``), () for an Auto
    class that takes many (the key must still be there); ``any_of``, ``stem``,
    ``pickled_ok``: as :func:`check_pretrained_folder` takes them."""

    what: str
    loads: str
    expects: tuple[str, ...] = ()
    config_key: str = "model_type"
    any_of: tuple[tuple[str, ...], ...] = ()
    stem: str = "model"
    pickled_ok: bool = False

    def __call__(self, path: str | Path) -> None:
        folder = Path(path)
        weights = check_pretrained_folder(
            folder, self.what, *self.any_of, stem=self.stem, pickled_ok=self.pickled_ok
        )
        self.check_config(folder / "config.json")
        check_weights_file(weights)

    def check_config(self, path: Path) -> None:
        """``config.json`` is a JSON object naming a model this loader builds."""
        try:
            config = json.loads(path.read_bytes())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object (a model config)")
        found = config.get(self.config_key)
        if self.expects and found in self.expects:
            return
        if not self.expects and isinstance(found, str) and found:
            return
        archs = config.get("architectures")
        named = f" (architectures {archs})" if archs else ""
        wanted = " or ".join(repr(e) for e in self.expects) or "a model type"
        raise CheckpointError(
            f"{path}: {self.config_key} is {found!r}{named}, but {self.what} loads it with "
            f"{self.loads}, which needs {self.config_key} {wanted}"
        )
