"""LoRA fine-tuning (``lora.rank > 0``): peft adapters on the Next-DiT's linear layers.

The base comes from ``model.init_from`` (the released model, or a run's checkpoint) and stays
frozen; only the adapters train, have optimizer state, an EMA (:class:`AdapterEMA`) and go
into checkpoints, which name the base by its path and sha256s instead of holding it. Targets
are our module names matched as suffixes (``attn.to_q`` matches every block's), so a config
says which layers adapt without knowing peft's naming.

Adapters are injected before the model is parallelised, so FSDP2 shards frozen and trainable
parameters of a block together, and initialised by name from the run's seed
(:func:`init_adapters`), so a model built on the meta device gets the same adapters on any
number of processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.config import LORA_TARGETS
from training.data.config import ConfigError
from training.data.seeding import mix_seed

ADAPTER = "default"  # peft's adapter name: the only one a run trains
ADAPTER_MARK = "lora_"  # in every adapter parameter's name, in no base parameter's
BASE_LAYER = ".base_layer"  # peft's wrapper inserts it into an adapted layer's names
# Attention q/k/v/out, the text k/v, the FFN: every linear of a block but the adaLN.
DEFAULT_TARGETS = LORA_TARGETS
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors


def enabled(cfg: Any) -> bool:
    """A LoRA fit: ``lora.rank > 0``."""
    lora = cfg.get("lora") if hasattr(cfg, "get") else getattr(cfg, "lora", None)
    return lora is not None and int(lora.rank) > 0


def alpha(section: Any) -> float:
    """``lora.alpha``, or the rank when unset (scale 1)."""
    return float(section.alpha if section.alpha is not None else section.rank)


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


def base_name(name: str) -> str:
    """A parameter's name in the model without adapters (``to_q.base_layer.weight`` ->
    ``to_q.weight``)."""
    return name.replace(BASE_LAYER, "")


def target_names(net: nn.Module, targets: Sequence[str]) -> list[str]:
    """The linear layers ``targets`` name (each matched as a module-name suffix), or a
    one-line ConfigError naming a target that matches nothing."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    found: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith(f".{target}")]
        if not hits:
            stems = sorted({n.split(".", 2)[-1] if n.startswith("layers.") else n for n in linears})
            raise ConfigError(
                f"lora.targets: {target!r} matches no linear layer of the model; "
                f"its linear layers: {', '.join(stems)}"
            )
        found.extend(h for h in hits if h not in found)
    return found


def check_targets(cfg: Any) -> None:
    """``lora.targets`` against the model the config resolves to, built on the meta device
    (no memory, no weights): run where the fit starts, before any folder is made."""
    if not enabled(cfg):
        return
    from model import NextDiT
    from training.config import model_config

    with torch.device("meta"):
        target_names(NextDiT(model_config(cfg)), list(cfg.lora.targets))


def peft_config(section: Any, modules: Sequence[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=int(section.rank),
        lora_alpha=alpha(section),
        lora_dropout=float(section.dropout),
        target_modules=list(modules),
        bias="none",
    )


def add_adapters(net: nn.Module, section: Any) -> list[str]:
    """peft LoRA layers on ``section.targets`` of ``net`` (in place; on the meta device
    too), everything else frozen. Returns the adapted module names."""
    from peft import inject_adapter_in_model

    modules = target_names(net, list(section.targets))
    inject_adapter_in_model(peft_config(section, modules), net, adapter_name=ADAPTER)
    for name, p in net.named_parameters():
        p.requires_grad_(is_adapter(name))
    return modules


def summary(net: nn.Module, section: Any) -> str:
    """``LoRA rank 64 on 144 linears: 75.0M trainable of 2.88B parameters (2.61%)``."""
    total = sum(p.numel() for p in net.parameters())
    trained = sum(p.numel() for _, p in adapter_parameters(net))
    layers = sum(1 for n, _ in adapter_parameters(net) if ".lora_A." in n)
    return (
        f"LoRA rank {int(section.rank)} on {layers} linears: {trained / 1e6:.2f}M trainable "
        f"of {total / 1e6:.2f}M parameters ({trained / max(total, 1):.2%}); the base frozen"
    )


def adapter_parameters(net: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in net.named_parameters() if is_adapter(n)]


def base_key_map(net: nn.Module) -> dict[str, str]:
    """``{name without adapters: name in the adapted model}`` for every base tensor."""
    return {base_name(k): k for k in net.state_dict() if not is_adapter(k)}


@torch.no_grad()
def init_adapters(net: nn.Module, seed: int) -> None:
    """peft's init (A: Kaiming-uniform, B: zero, so the adapted model starts as the base),
    each A drawn from a generator seeded by (seed, its name): the same on every rank and
    for any sharding (each rank copies its slice, ``training.parallelize.copy_full_into``)."""
    from training.parallelize import copy_full_into

    for name, p in adapter_parameters(net):
        full = torch.zeros(p.shape, dtype=torch.float32)
        if ".lora_A." in name:
            gen = torch.Generator().manual_seed(mix_seed(seed, *name.encode()))
            bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)), as peft
            full.uniform_(-bound, bound, generator=gen)
        copy_full_into(p, full.to(dtype=p.dtype, device=p.device), name)


@torch.no_grad()
def merge_adapters(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (``W + scale * B @ A``) and put the plain
    linear back: ``net`` (unsharded) becomes the model without adapters, its state dict
    under the base's names."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, module.get_base_layer())
    return net


class AdapterEMA(nn.Module):
    """The EMA of the adapters only: one frozen copy of each adapter parameter (sharded as
    the live one, DTensors included), keyed by its name with ``/`` for ``.`` (a parameter
    name cannot hold dots). A submodule, so it is checkpointed with the model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.shadow = _Shadow(
            {
                key(n): nn.Parameter(p.detach().clone(), requires_grad=False)
                for n, p in adapter_parameters(net)
            }
        )

    def pairs(self, net: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """``(live adapter, its average)`` in ``net``'s parameter order."""
        return [(p, self.shadow[key(n)]) for n, p in adapter_parameters(net)]


class _Shadow(nn.ParameterDict):
    def reset_parameters(self) -> None:
        """Nothing: materialised on the meta device, the averages are copied from the live
        adapters once those are initialised (``OneGenModule.on_fit_start``)."""


def key(name: str) -> str:
    return name.replace(".", "/")


@contextmanager
def swapped(pairs: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """The averages in the live adapters for the block (sampling with the EMA without a
    second base), the live values back after. Local shards, no collective."""
    from training.parallelize import local_tensor

    with torch.no_grad():
        saved = [local_tensor(live).clone() for live, _ in pairs]
        for live, avg in pairs:
            local_tensor(live).copy_(local_tensor(avg))
    try:
        yield
    finally:
        with torch.no_grad():
            for (live, _), value in zip(pairs, saved, strict=True):
                local_tensor(live).copy_(value)


def released_module_name(module: str) -> str:
    """Our module name under the release's (``layers.0.attn.to_q`` ->
    ``layers.0.attention.wq``), for adapters the release's code can load with peft."""
    from model.convert import to_released_name

    return to_released_name(f"{module}.weight").removesuffix(".weight")


def save_peft_adapters(
    net: nn.Module, section: Any, out: str | Path, dtype: torch.dtype, base: str = ""
) -> list[Path]:
    """The adapters alone in peft's layout (``adapter_config.json`` and
    ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``), under
    the release's module names, so ``peft`` loads them onto the release's ``NextDiT``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    modules: list[str] = []
    for name, p in adapter_parameters(net):
        module = name.split(".lora_")[0]
        which = "lora_A" if ".lora_A." in name else "lora_B"
        released = released_module_name(module)
        if released not in modules:
            modules.append(released)
        value = p.detach().to(dtype=dtype, device="cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{released}.{which}.weight"] = value
    config = peft_config(section, modules).to_dict()
    config["base_model_name_or_path"] = base
    config["target_modules"] = sorted(modules)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return [out / PEFT_CONFIG, out / PEFT_WEIGHTS]


def checkpoint_adapter_key(name: str, weights: str) -> str:
    """Where a checkpoint holds adapter ``name``: the live one (``model.``) or its average."""
    return f"model.{name}" if weights == "model" else f"ema.shadow.{key(name)}"
