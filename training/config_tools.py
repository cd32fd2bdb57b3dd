"""Config helpers with no heavy imports: dotted ``key=value`` overrides and flat MLflow params.

Light on purpose (omegaconf and yaml only): ``orchestration.tracking`` logs datagen runs with
:func:`flat_params` from here without importing Lightning or torch, and training needs nothing
from ``pipelines`` (imports flow ``orchestration -> training -> model``).
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf


def apply_overrides(cfg: DictConfig, overrides: list[str], strict: bool = False) -> None:
    """Apply ``a.b=1``-style overrides in place; values parse as YAML (``[2, 3]``, ``null``,
    ``true``, ``{t2i: /data}``). A malformed override is a ValueError naming it. ``strict``:
    a key the (structured) config does not have is OmegaConf's error, not a new key."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if not all(key.split(".")):
            raise ValueError(f"override {item!r}: {key!r} is not a dotted key")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not YAML ({exc})") from None
        OmegaConf.update(cfg, key, value, merge=True, force_add=not strict)


def flat_params(cfg: DictConfig | dict, max_len: int = 500) -> dict[str, str]:
    """``a.b.c -> value`` for MLflow params (datagen and training runs alike); list entries
    that are dicts go under their ``name`` (stages), values are cut to ``max_len``."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            for i, v in enumerate(node):
                walk(f"{prefix}.{v.get('name', i)}", v)
        else:
            out[prefix] = str(node)[:max_len]

    walk("", cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True))
    return out
