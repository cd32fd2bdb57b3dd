"""How the Next-DiT is laid out on the devices: activation checkpointing, per-block compile,
FSDP2 ``fully_shard`` per block then the root, and the model's own init on sharded weights.

Kept apart from the LightningModule (as torchtitan keeps ``parallelize.py``): the module asks
for a parallelised model; what that means for a mesh lives here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from model import NextDiT


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing of one block, keeping its parameter names unchanged.

    ``checkpoint_wrapper`` would insert ``_checkpoint_wrapped_module`` into every name (and
    into the optimizer-state keys); overriding the instance's ``forward`` does not. FSDP2's
    hooks sit on ``__call__``, outside the checkpointed region, so recomputation in backward
    runs while the block's parameters are gathered, as with the wrapper.
    """
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]


def shard(model: NextDiT, mesh: Any, param_dtype: torch.dtype | None) -> None:
    """``fully_shard`` every block, then the root. Inputs are cast by the caller (so the
    timesteps and RoPE tables stay float32): ``cast_forward_inputs=False`` everywhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(
    model: NextDiT,
    *,
    activation_checkpointing: bool,
    compile_blocks: bool,
    mesh: Any = None,
    param_dtype: torch.dtype | None = None,
) -> NextDiT:
    """Checkpointing, then compile, then sharding (when there is a mesh), per block."""
    if activation_checkpointing:
        for block in model.layers:
            checkpoint_block(block)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    if mesh is not None:
        shard(model, mesh, param_dtype if param_dtype != torch.float32 else None)
    return model


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _dtensor_rng_supported(mesh: Any) -> bool:
    try:
        from torch.distributed.tensor._random import is_rng_supported_mesh

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(is_rng_supported_mesh(mesh))
    except Exception:  # private API; fall back to the replica path
        return False


@torch.no_grad()
def init_sharded(model: NextDiT) -> None:
    """Apply ``NextDiT.init_weights`` to a (possibly sharded) model after materialisation.

    On CUDA meshes DTensor random ops draw each shard as the slice of one global random
    tensor, so ``init_weights`` runs in place. On CPU (gloo) DTensor has no RNG tracker: every
    rank would draw its shard from the same local stream and all shards would be copies of
    each other. There, a full replica is initialised on each rank (same seed) and each rank
    keeps its own ``torch.chunk`` slice, which is how FSDP2 shards dim 0.
    """
    params = list(model.parameters())
    dtensors = [p for p in params if hasattr(p, "device_mesh")]
    if not dtensors or _dtensor_rng_supported(dtensors[0].device_mesh):
        model.init_weights()
        return
    with torch.device("cpu"):
        full = NextDiT(model.config)  # the constructor runs init_weights
    for (name, p), (_, q) in zip(model.named_parameters(), full.named_parameters(), strict=True):
        copy_full_into(p, q, name)


@torch.no_grad()
def copy_full_into(p: Tensor, full: Tensor, name: str) -> None:
    """``full`` (the whole tensor, the same on every rank) into parameter ``p``: a plain
    tensor takes it whole, a DTensor sharded on dim 0 over a 1-D mesh keeps its own
    ``torch.chunk`` slice (how FSDP2 shards), so every rank derives its shard without a
    collective."""
    if not hasattr(p, "device_mesh"):
        p.copy_(full)
        return
    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise RuntimeError(f"{name}: unexpected placement {p.placements}")
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    local = local_tensor(p)
    part = chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    if part.shape != local.shape:
        raise RuntimeError(f"{name}: shard {tuple(local.shape)} != slice {tuple(part.shape)}")
    local.copy_(part)
