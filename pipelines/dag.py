"""The datagen DAG: a YAML file naming the source, the stages, the subsets.

Loaded with OmegaConf over :data:`DEFAULTS`, so every knob has a value a user
can see in the resolved config (logged to MLflow) and override with
``dotted.keys=value`` on the command line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from datagen.schema import SCHEMA_VERSION, SUBSETS

DEFAULTS: dict[str, Any] = {
    "name": "unnamed",
    "description": "",
    "source": {"kind": "demo"},
    "output": "data/out",
    "seed": 0,
    "max_error_rate": 0.05,
    "allow_empty": False,  # a source listing no inputs is an error unless true (not in the digest)
    "shards": {"max_samples": 256, "max_bytes": 256 * 1024 * 1024},
    "stages": [],
    "subsets": {},
    "ray": {"address": None, "num_cpus": None, "object_store_memory": None},
    "mlflow": {
        "tracking_uri": "sqlite:///mlflow.db",
        "experiment": "onegen-datagen",
        "enabled": True,
    },
    "preview": {"samples_per_subset": 4},
}

STAGE_DEFAULTS: dict[str, Any] = {
    "params": {},
    "resources": {"num_cpus": 1, "num_gpus": 0, "batch_size": None, "actors": None},
}


class DagError(ValueError):
    """A DAG that cannot run; the message names the offending entry."""


@dataclass(frozen=True)
class Stage:
    name: str
    op: str
    params: dict[str, Any]
    num_cpus: float
    num_gpus: float
    batch_size: int | None
    actors: tuple[int, int] | None  # actor pool (min, max) for stateful/model stages


@dataclass(frozen=True)
class SubsetSpec:
    name: str
    needs: tuple[str, ...]  # stages whose failure quarantines the key in this subset


def load(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Resolved DAG config: defaults <- YAML file <- dotted overrides."""
    path = Path(path)
    if not path.exists():
        raise DagError(f"DAG file {path} does not exist")
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.load(path))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """``a.b=1``, ``stages.1.params.x=2`` or ``stages.degrade.params.x=2``
    (a stage by name); values parse as YAML (``[2, 3]``, ``null``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise DagError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "stages" and not parts[1].isdigit():
            names = [st.get("name") or st.get("op") for st in cfg.stages]
            if parts[1] not in names:
                raise DagError(f"override {item!r}: no stage named {parts[1]!r} (stages: {names})")
            parts[1] = str(names.index(parts[1]))
        value = yaml.safe_load(text) if text else ""
        OmegaConf.update(cfg, ".".join(parts), value, merge=True, force_add=True)


def stages(cfg: DictConfig) -> list[Stage]:
    out = []
    for raw in cfg.stages:
        merged = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.create(STAGE_DEFAULTS), raw), resolve=True
        )
        res = merged["resources"]
        actors = res.get("actors")
        if actors is not None:
            actors = (
                (int(actors[0]), int(actors[1])) if isinstance(actors, list) else (1, int(actors))
            )
        out.append(
            Stage(
                name=merged.get("name") or merged["op"],
                op=merged["op"],
                params=merged.get("params") or {},
                num_cpus=float(res.get("num_cpus", 1)),
                num_gpus=float(res.get("num_gpus", 0) or 0),
                batch_size=res.get("batch_size"),
                actors=actors,
            )
        )
    return out


def subsets(cfg: DictConfig) -> list[SubsetSpec]:
    return [
        SubsetSpec(name, tuple(spec.get("needs", []) or [])) for name, spec in cfg.subsets.items()
    ]


def validate(cfg: DictConfig) -> None:
    from pipelines.ops import OPS

    if not cfg.stages:
        raise DagError("the DAG has no stages")
    names = []
    for i, raw in enumerate(cfg.stages):
        if "op" not in raw:
            raise DagError(f"stage {i} has no 'op'")
        if raw.op not in OPS:
            raise DagError(f"stage {i} uses unknown op {raw.op!r}; known ops: {sorted(OPS)}")
        names.append(raw.get("name") or raw.op)
    if len(set(names)) != len(names):
        raise DagError(f"stage names must be unique: {names}")
    if names[0] != "decode" and cfg.stages[0].op != "decode":
        raise DagError("the first stage must be a 'decode' op: every other stage reads its image")
    if not cfg.subsets:
        raise DagError("the DAG writes no subsets")
    for name, spec in cfg.subsets.items():
        if name not in SUBSETS:
            raise DagError(f"unknown subset {name!r}; the schema defines {sorted(SUBSETS)}")
        for need in spec.get("needs", []) or []:
            if need not in names:
                raise DagError(f"subset {name!r} needs stage {need!r}, which the DAG does not have")
    if not 0 <= float(cfg.max_error_rate) <= 1:
        raise DagError("max_error_rate must be within [0, 1]")
    if int(cfg.shards.max_samples) < 1 or int(cfg.shards.max_bytes) < 1:
        raise DagError("shards.max_samples and shards.max_bytes must be positive")


def config_digest(cfg: DictConfig) -> str:
    """Digest of what determines the samples' content (not where or how fast
    they are made), so resume can refuse to mix two different recipes. The code's
    part counts too: each op's ``version`` and the sources' key scheme (new keys for
    the same inputs would be written again beside the old ones)."""
    from datagen.sources import KEY_SCHEME_VERSION
    from pipelines.ops import OPS

    plain = OmegaConf.to_container(cfg, resolve=True)
    content = {
        "schema_version": SCHEMA_VERSION,
        "key_scheme": KEY_SCHEME_VERSION,
        "op_versions": {s["op"]: OPS[s["op"]].version for s in plain["stages"] if s["op"] in OPS},
        "source": plain["source"],
        "seed": plain["seed"],
        "stages": [
            {"name": s.get("name"), "op": s["op"], "params": s.get("params", {})}
            for s in plain["stages"]
        ],
        "subsets": plain["subsets"],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


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
