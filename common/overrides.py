"""Dotted ``key=value`` overrides, the closest-name hint and flat MLflow params: one of each
for the DAG loader, the training config and both halves' tracking.

Light on purpose (omegaconf and yaml only): ``orchestration.tracking`` logs datagen runs
with :func:`flat_params` without importing Lightning or torch.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name ``name`` was most likely meant to be, or None."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``; did you mean 'x'?`` or nothing: the tail of a one-line error."""
    match = closest(name, valid)
    return f"; did you mean {match!r}?" if match else ""


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=[2, 3]`` -> ``("a.b", [2, 3])``: the value parses as YAML (``null``, ``true``,
    ``{t2i: /data}``). A malformed override is a ValueError naming it."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    if not all(key.split(".")):
        raise ValueError(f"override {item!r}: {key!r} is not a dotted key")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ValueError(
            f"override {item!r}: the value is not YAML ({exc})".splitlines()[0]
        ) from None
    return key, value


def apply_overrides(
    cfg: DictConfig,
    overrides: list[str],
    strict: bool = False,
    key_path: Callable[[str, list[str]], list[str]] | None = None,
) -> None:
    """Apply ``a.b=1``-style overrides in place. ``strict``: a key the (structured) config
    does not have is OmegaConf's error, not a new key. ``key_path(item, parts)`` may rewrite
    a key's parts first (the DAG's ``stages.<name>`` -> ``stages.<index>``)."""
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        if key_path is not None:
            parts = key_path(item, parts)
        key = ".".join(parts)
        old = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        merge = not changes_kind(old, value)
        try:
            OmegaConf.update(cfg, key, value, merge=merge, force_add=not strict)
        except Exception as exc:  # noqa: BLE001 - e.g. stages.9 of a 2-stage DAG: one line
            if strict:
                raise
            raise ValueError(f"override {item!r}: {exc}".splitlines()[0]) from None


def changes_kind(old: Any, new: Any) -> bool:
    """A list given where a mapping is (or the reverse), e.g. per-family ``data.buckets`` over
    the one-list default: the new value replaces the old (a merge of the two is OmegaConf's
    error); a typed node still refuses it, an ``Any`` node takes it."""
    is_list = (ListConfig, list, tuple)
    return (isinstance(old, DictConfig) and isinstance(new, is_list)) or (
        isinstance(old, ListConfig) and isinstance(new, dict | DictConfig)
    )


def merge_file(cfg: DictConfig, loaded: DictConfig) -> DictConfig:
    """``OmegaConf.merge(cfg, loaded)``, where a node of ``loaded`` that :func:`changes_kind`
    replaces the schema's instead of merging into it."""
    replaced: list[tuple[str, Any]] = []

    def take(node: DictConfig, base: Any, prefix: str) -> None:
        for k in list(node.keys()):
            key = f"{prefix}{k}"
            old = base.get(k) if isinstance(base, DictConfig) else None
            new = node._get_node(k)
            if changes_kind(old, new):
                replaced.append((key, OmegaConf.to_container(new)))
                del node[k]
            elif isinstance(new, DictConfig) and isinstance(old, DictConfig):
                take(new, old, f"{key}.")

    loaded = OmegaConf.create(OmegaConf.to_container(loaded))  # plain: nodes may go
    take(loaded, cfg, "")
    out = OmegaConf.merge(cfg, loaded)
    for key, value in replaced:
        OmegaConf.update(out, key, value, merge=False)
    return out


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


def parse_args_with_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """``parser``'s arguments with dotted overrides anywhere on the line, before or after
    options (argparse alone stops collecting a ``nargs="*"`` positional at the first
    option: ``a=1 --verbose b=2`` would refuse ``b=2``). Anything else unknown is argparse's
    usual error; overrides given to a command that takes none likewise."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"this command takes no overrides: {' '.join(extra)}")
    return args
