"""Reading an ultralytics ``.pt`` without running code from it: the pose and face
detectors' checkpoint allowlist, on the project's one restricted reader
(:mod:`common.safe_pt`).

Ultralytics reads a ``.pt`` with full pickle (code runs on load), so
:func:`safe_torch_load` reads it instead: the pickle's globals are scanned first
(:func:`common.safe_pt.scan_pickle`) and only model classes (``ultralytics.nn`` modules,
``torch.nn`` modules) and a few plain data types are admitted, model classes only as
objects to fill (``NEWOBJ``), never as constructors to call (``REDUCE``); then
``torch.load(weights_only=True)`` runs with exactly that allowlist
(:func:`common.safe_pt.weights_only_load`), and the model it returns is handed to
ultralytics, which never opens the file.
"""

from __future__ import annotations

import importlib
import pathlib
import pickle
from typing import Any

import numpy as np
from torch import nn

from common.safe_pt import (
    UnsafePickle,
    first_line,
    scan_pickle,
    torch_save_pickle,
    weights_only_load,
)

MAX_PICKLE_BYTES = 256 << 20  # a checkpoint's object graph; yolo11x's is well under 1 MiB


class UnsafeCheckpoint(UnsafePickle):
    """A checkpoint whose pickle could run code or build something other than a model."""


def _checkpoint_getattr(obj: Any, name: str) -> Any:
    """``builtins.getattr`` as checkpoints may use it: fused ultralytics layers pickle
    ``layer.forward = layer.forward_fuse`` as ``getattr(layer, "forward_fuse")``.
    Only those two methods of model layers (bound or not); nothing else."""
    if name in ("forward", "forward_fuse"):
        if isinstance(obj, nn.Module):
            return getattr(type(obj), name).__get__(obj)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return getattr(obj, name)
    raise UnsafeCheckpoint(
        f"checkpoint calls getattr({type(obj).__name__}, {name!r}): only the forward / "
        "forward_fuse methods of model layers are allowed"
    )


_MODEL_MODULE_PREFIXES = ("ultralytics.nn.modules.", "torch.nn.modules.")
_MODEL_MODULES = {"ultralytics.nn.tasks", "ultralytics.nn.modules"}
# Classes only filled from state (NEWOBJ + BUILD) in trainer-written checkpoints that
# kept the loss: admitted when defined in these modules, never called.
_LOSS_MODULES = {"ultralytics.utils.loss", "ultralytics.utils.tal"}


def _plain_data_globals() -> dict[str, tuple[Any, bool]]:
    """Non-model globals real ultralytics checkpoints hold, -> (object, may be called):
    numpy scalars and dtypes (metrics), the args namespace, pickled paths (as pure paths:
    no I/O), getattr (restricted) and two renamed legacy classes."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]
    table: dict[str, tuple[Any, bool]] = {
        "builtins.getattr": (_checkpoint_getattr, True),
        "numpy.core.multiarray.scalar": (scalar, True),
        "numpy._core.multiarray.scalar": (scalar, True),
        "numpy.dtype": (np.dtype, True),
        "ultralytics.utils.IterableSimpleNamespace": (IterableSimpleNamespace, True),
        "ultralytics.yolo.utils.IterableSimpleNamespace": (IterableSimpleNamespace, True),
        "ultralytics.nn.modules.block.Silence": (nn.Identity, False),
        "ultralytics.nn.tasks.YOLOv10DetectionModel": (DetectionModel, False),
    }
    for module in ("pathlib", "pathlib._local"):
        table[f"{module}.PosixPath"] = (pathlib.PurePosixPath, True)
        table[f"{module}.WindowsPath"] = (pathlib.PureWindowsPath, True)
    return table


def _model_class(full: str) -> type | None:
    """The class ``full`` names when it is a model layer (or a loss class) of an admitted
    module, defined there; else None."""
    module, _, attr = full.rpartition(".")
    is_model = module in _MODEL_MODULES or module.startswith(_MODEL_MODULE_PREFIXES)
    if not (is_model or module in _LOSS_MODULES) or not attr.isidentifier():
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except (ImportError, ValueError):
        return None
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    if is_model and not issubclass(obj, nn.Module):
        return None
    return obj


def checkpoint_allowlist(path: str) -> list[tuple[Any, str]]:
    """``(object, name)`` for every global the checkpoint at ``path`` needs beyond
    torch's own weights-only set, or :class:`UnsafeCheckpoint` naming the first global
    that is not admitted (or a model class the pickle would call)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    data = torch_save_pickle(path, MAX_PICKLE_BYTES, UnsafeCheckpoint)
    found = scan_pickle(data, path, UnsafeCheckpoint)
    torch_default = _get_allowed_globals()
    plain = _plain_data_globals()
    allow: list[tuple[Any, str]] = []
    for full in sorted(found.names):
        if full in torch_default:
            continue
        if full in plain:
            obj, callable_ok = plain[full]
        else:
            obj, callable_ok = _model_class(full), False
            if obj is None:
                raise UnsafeCheckpoint(
                    f"{path}: refusing to load: its pickle references {full!r}, which is not "
                    "an allowed checkpoint global (only ultralytics / torch.nn model classes "
                    "and plain data are; loading it could run code)"
                )
        if full in found.called and not callable_ok:
            raise UnsafeCheckpoint(
                f"{path}: refusing to load: its pickle calls {full!r} (a constructor run at "
                "load time; model classes are only filled from state)"
            )
        allow.append((obj, full))
    if "numpy.dtype" in found.names:  # BUILD on a dtype needs its class (not a pickle global)
        classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}
        allow += [(c, f"numpy.dtypes.{c.__name__}") for c in sorted(classes, key=str)]
    return allow


def safe_torch_load(path: str) -> Any:
    """``torch.load`` of a ``.pt`` with no code execution: scanned, then weights-only
    with the minimal allowlist. Raises :class:`UnsafeCheckpoint` with one line naming
    what was refused."""
    allow = checkpoint_allowlist(path)
    try:
        return weights_only_load(path, allow=allow)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(f"{path}: weights-only load refused: {first_line(exc)}") from exc
