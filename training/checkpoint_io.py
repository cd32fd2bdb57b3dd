"""Opening checkpoints without running code from them, and telling whole ones from broken ones.

A sharded (torch distributed checkpoint) folder holds ``.metadata``, which torch's
``FileSystemReader`` reads with plain ``pickle.load``, and non-tensor items (optimizer
hyper-parameters) that ``DefaultLoadPlanner.load_bytes`` reads with
``torch.load(weights_only=False)``: either way a crafted folder is code. Here

* ``.metadata`` goes through the project's one restricted unpickler
  (:class:`common.safe_pt.RestrictedUnpickler`), here resolving only the classes a DCP
  ``Metadata`` is made of (the set found by unpickling folders this project's trainer writes
  under FSDP2 and ones ``dcp.save`` writes) and refuses anything else by name;
* non-tensor items load with ``torch.load(weights_only=True)`` (``SafeLoadPlanner``);
* Lightning's ``meta.pt`` and single-file checkpoints load with ``weights_only=True``.

``verify_checkpoint`` also checks that a checkpoint is whole (a file whose zip directory reads;
a folder with its ``.metadata``, ``meta.pt`` and every shard file at least as long as the
metadata says), so ``resume=last`` can step past a checkpoint cut short by a crash.
``SafeModelParallelStrategy`` is Lightning's FSDP2 strategy loading through all of the above.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import IO, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from common.safe_pt import RestrictedUnpickler, first_line, weights_only_load
from training.errors import CheckpointError, UnsafeCheckpointError

LIGHTNING_META = "meta.pt"  # lightning.fabric.strategies.model_parallel._METADATA_FILENAME
DCP_METADATA = ".metadata"

_DCP_META = "torch.distributed.checkpoint.metadata"
# Everything a DCP .metadata pickle needs (torch 2.14, checked on FSDP2 and dcp.save output),
# besides torch dtypes / layouts / memory formats (see ``_allowed``).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_META, "Metadata"),
        (_DCP_META, "StorageMeta"),
        (_DCP_META, "TensorProperties"),
        (_DCP_META, "TensorStorageMetadata"),
        (_DCP_META, "BytesStorageMetadata"),
        (_DCP_META, "ChunkStorageMetadata"),
        (_DCP_META, "MetadataIndex"),
        (_DCP_META, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # layout by name from a fixed table
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib", "Path"),
    }
)


def _allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED_GLOBALS:
        return True
    if module == "torch":
        value = getattr(torch, name, None)
        return isinstance(value, torch.dtype | torch.layout | torch.memory_format)
    return False


def load_dcp_metadata(stream: IO[bytes], source: str) -> Metadata:
    """A DCP ``Metadata`` from an open ``.metadata`` stream, through the restricted
    unpickler (:class:`common.safe_pt.RestrictedUnpickler`) admitting :func:`_allowed` only:
    any other global is an ``UnsafeCheckpointError`` naming it."""
    try:
        metadata = RestrictedUnpickler(stream, source, _allowed, UnsafeCheckpointError).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated / garbled pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"{source} is unreadable ({type(exc).__name__}: {exc}); truncated or corrupt"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source} holds a {type(metadata).__name__}, not DCP metadata")
    if not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{source} has no storage map; corrupt DCP metadata")
    for info in metadata.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or PurePath(rel).name != rel or rel in (".", ".."):
            raise UnsafeCheckpointError(
                f"{source} points at {rel!r}, outside its checkpoint folder; refusing to load it"
            )
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(v, int) and v >= 0 for v in (offset, length)):
            raise CheckpointError(
                f"{source} gives {rel} the byte range ({offset!r}, {length!r}); corrupt DCP metadata"
            )
    return metadata


def read_dcp_metadata(folder: str | Path) -> Metadata:
    path = Path(folder) / DCP_METADATA
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {DCP_METADATA}: an incomplete sharded checkpoint")
    with open(path, "rb") as f:
        return load_dcp_metadata(f, str(path))


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_dcp_metadata(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _weights_only_load(data: IO[bytes] | Path, source: str, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a pickle that asks for anything but tensors and
    plain data is an ``UnsafeCheckpointError`` naming ``source``."""
    try:
        return weights_only_load(data, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{source} holds objects a checkpoint may not contain ({first_line(exc)}); "
            "refusing to load it"
        ) from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        obj = _weights_only_load(value, f"checkpoint item {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state: dict[str, Any], folder: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` through ``SafeFileSystemReader`` and ``SafeLoadPlanner``; a refusal comes
    out as the ``CheckpointError`` itself, not wrapped in torch's ``CheckpointException``."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(folder)),
            planner=SafeLoadPlanner(),
            no_dist=no_dist,
        )
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise


def _load_meta_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            meta = _weights_only_load(f, str(path))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}: {first_line(exc)}); truncated or corrupt"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not a checkpoint dict")
    return meta


def verify_checkpoint(path: str | Path) -> dict:
    """Lightning's checkpoint metadata (``meta.pt`` of a folder, or the whole file with its
    tensors memory-mapped) after checking the checkpoint is whole and safe to read; a
    ``CheckpointError`` (``UnsafeCheckpointError`` for code) otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        try:
            with open(p, "rb") as f:
                ck = (
                    _weights_only_load(p, str(p), mmap=True)
                    if _is_zip(f)
                    else _weights_only_load(f, str(p))
                )
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{p} is unreadable ({type(exc).__name__}: {first_line(exc)}); truncated or corrupt"
            ) from None
        if not isinstance(ck, dict) or "state_dict" not in ck:
            raise CheckpointError(f"{p} is not a Lightning checkpoint (no state_dict)")
        return ck
    metadata = read_dcp_metadata(p)
    meta_file = p / LIGHTNING_META
    if not meta_file.is_file():
        raise CheckpointError(f"{p} has no {LIGHTNING_META}: an incomplete sharded checkpoint")
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = p / name
        if not shard.is_file():
            raise CheckpointError(f"{p} is missing its shard file {name}")
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{shard} is cut short ({size} bytes, the metadata needs {end}); truncated"
            )
    return _load_meta_file(meta_file)


def onegen_meta(checked: dict) -> dict:
    """The ``onegen`` entry (config YAML, MLflow run id, world size) of what
    ``verify_checkpoint`` returned."""
    return dict(checked.get("onegen") or {})


def checkpoint_meta(path: str | Path) -> dict:
    """The ``onegen`` entry of a checkpoint file or folder, after ``verify_checkpoint``
    (whole, nothing but weights and plain data)."""
    return onegen_meta(verify_checkpoint(path))


def _is_zip(f: IO[bytes]) -> bool:
    head = f.read(4)
    f.seek(0)
    return head == b"PK\x03\x04"


def _names_in_optimizer_order(module: torch.nn.Module, optimizer: Any) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rekey_optimizer_state(saved: dict, module: torch.nn.Module, optimizer: Any) -> dict:
    """A plain ``optimizer.state_dict()`` (parameters numbered in group order) keyed by
    parameter name instead, the form ``set_optimizer_state_dict`` takes for any sharding; the
    numbering is matched against ``optimizer`` built by the same ``configure_optimizers``."""
    order = _names_in_optimizer_order(module, optimizer)
    saved_groups = saved.get("param_groups") or []
    sizes = [len(g["params"]) for g in saved_groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(
            f"the checkpoint's optimizer has parameter groups of sizes {sizes}, this model's "
            f"{[len(g['params']) for g in optimizer.param_groups]}: not the same model"
        )
    index = {}
    for group in saved_groups:
        for pid in group["params"]:
            index[pid] = order[len(index)]
    return {
        "state": {index[pid]: value for pid, value in saved.get("state", {}).items()},
        "param_groups": [
            {**g, "params": [index[pid] for pid in g["params"]]} for g in saved_groups
        ],
    }


def read_checkpoint_tensors(path: str | Path, template: dict[str, Any]) -> dict[str, Any]:
    """The tensors ``template`` names (its tensors give shapes and dtypes) from a
    checkpoint's ``state_dict``, in one process: a file memory-mapped (weights only), a
    sharded folder through the restricted DCP reader (only those tensors are read). A key
    a file lacks is a CheckpointError naming it (a folder: DCP's CheckpointException)."""
    import warnings

    p = Path(path)
    if p.is_dir():
        state = {"state_dict": dict(template)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            safe_dcp_load(state, p, no_dist=True)
        return state["state_dict"]
    saved = torch.load(p, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    missing = [k for k in template if k not in saved]
    if missing:
        raise CheckpointError(f"{p}: has no {missing[0]} ({len(missing)} tensors missing)")
    return {k: saved[k] for k in template}


def checkpoint_keys(module: torch.nn.Module) -> set[str] | None:
    """The state-dict keys ``module``'s checkpoints hold: every key (None), or its own
    choice (a LoRA fit: adapters and their EMA, ``OneGenModule.checkpoint_keys``)."""
    keys = getattr(module, "checkpoint_keys", None)
    return keys() if callable(keys) else None


def check_saved_keys(path: Path, saved: Any, expected: set[str]) -> None:
    """A checkpoint holding another set of tensors than the module saves (a LoRA run's
    into a full fit, other targets or rank): one line naming a few of each."""
    saved = set(saved)
    missing, extra = sorted(expected - saved), sorted(saved - expected)
    if missing or extra:
        raise CheckpointError(
            f"{path}: not this fit's tensors ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}): another model, LoRA rank or targets?"
        )


def load_full_checkpoint(path: Path, module: torch.nn.Module, optimizers: list) -> dict:
    """A single-file (full) checkpoint into a sharded module and its optimizers: every rank
    reads the file memory-mapped and keeps its own shards. Returns the rest of the file."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ck = verify_checkpoint(path)
    keys = checkpoint_keys(module)
    state = ck.pop("state_dict")
    if keys is not None:
        check_saved_keys(path, state, keys)
    options = StateDictOptions(full_state_dict=True, strict=keys is None)
    set_model_state_dict(module, state, options=options)
    saved = ck.pop("optimizer_states", None) or []
    for optimizer, state in zip(optimizers, saved, strict=False):
        keyed = rekey_optimizer_state(state, module, optimizer)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=keyed, options=options)
    return ck


def load_sharded_checkpoint(
    path: Path, module: torch.nn.Module, optimizers: list, *, no_dist: bool
) -> dict:
    """A distributed (sharded) checkpoint into ``module`` and its optimizers, whatever the
    number of processes that wrote it: DCP reads each local shard's slice of the saved ones
    (``no_dist``: one process without a process group, the whole tensors). Returns
    Lightning's ``meta.pt`` (loops, schedulers, callbacks, ``onegen``)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    meta = verify_checkpoint(path)
    template = get_model_state_dict(module)
    keys = checkpoint_keys(module)
    if keys is not None:  # DCP fails on any of these the checkpoint lacks
        template = {k: v for k, v in template.items() if k in keys}
    module_state = {"state_dict": template}
    safe_dcp_load(module_state, path, no_dist=no_dist)
    set_model_state_dict(
        module, module_state["state_dict"], options=StateDictOptions(strict=keys is None)
    )
    for idx, optimizer in enumerate(optimizers):
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        safe_dcp_load(optim_state, path, no_dist=no_dist)
        set_optimizer_state_dict(
            module,
            optimizer,
            optim_state_dict=optim_state[key],
            options=StateDictOptions(cpu_offload=no_dist),
        )
    return meta


class SafeModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy, resuming through ``verify_checkpoint`` and
    ``safe_dcp_load`` (Lightning's own path uses torch's default reader and planner, which
    unpickle freely): a sharded checkpoint from any number of processes, or a single-device
    one (a file) resharded onto this mesh."""

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        module = self.model
        assert module is not None and self.lightning_module is not None
        if path.is_dir():
            return load_sharded_checkpoint(path, module, list(self.optimizers), no_dist=False)
        return load_full_checkpoint(path, module, list(self.optimizers))


class SafeSingleDeviceStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy that also resumes a sharded checkpoint (a folder
    written by N processes: read whole, in this one process); files load as Lightning loads
    them, after ``verify_checkpoint``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device=device)
        self._restored_here = False
        self._loading = Path("checkpoint")  # the file being restored, for messages

    @property
    def lightning_restore_optimizer(self) -> bool:
        return not self._restored_here

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # After the optimizers exist (as under FSDP): a sharded folder restores them here.
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        path = Path(checkpoint_path)
        self._loading = path
        if not path.is_dir():
            verify_checkpoint(path)
            return super().load_checkpoint(path, weights_only=True)
        module = self.lightning_module
        assert module is not None
        meta = load_sharded_checkpoint(path, module, list(self.optimizers), no_dist=True)
        self._restored_here = True
        return meta

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if self._restored_here:
            return
        module = self.lightning_module
        keys = checkpoint_keys(module) if module is not None else None
        if keys is None:
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        check_saved_keys(self._loading, checkpoint["state_dict"], keys)
        module.load_state_dict(checkpoint["state_dict"], strict=False)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if not self._restored_here:
            super().load_optimizer_state_dict(checkpoint)


def load_weights(ckpt: str | Path, net: torch.nn.Module, which: str = "ema") -> None:
    """Load ``ema.*`` (or ``model.*``) weights of a Lightning checkpoint into a plain NextDiT:
    a file (weights only, memory-mapped) or a sharded (DCP) folder read in one process,
    only the requested tensors, through :func:`read_checkpoint_tensors` (restricted)."""
    prefix = f"{which}."
    template = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    found = read_checkpoint_tensors(ckpt, template)
    net.load_state_dict({k[len(prefix) :]: v for k, v in found.items()})
