"""The datagen DAG: a YAML file naming the source, the stages, the subsets.

Loaded with OmegaConf over the defaults of :class:`DagSection`, overridden by
``dotted.keys=value`` on the command line, then validated once, whole, before Ray
starts or the output is touched: an unknown key anywhere (with the closest valid
name), a stage parameter its labeler does not take, a wrong type, a stage whose
needs are missing, a subset no stage can fill. The validated config is written back
complete (every stage's parameters with their defaults), so the resolved DAG logged
to MLflow and recorded beside the shards shows every knob.

:func:`load` (and :func:`validate`) return a :class:`Dag`: typed once, it is what the
job, the builder, the sink and tracking read (no one re-derives the plan or casts a
config value again).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from common import overrides as common_overrides
from common.overrides import did_you_mean
from datagen import params as P
from datagen import sources
from datagen.schema import COMMON_META_KEYS, SCHEMA_VERSION, SUBSETS
from datagen.sources import base as source_base
from datagen.sources.base import Source
from datagen.sources.groups import GROUP_COLUMNS
from datagen.stages import LABELERS, labeler
from datagen.stages.models.common import RANDOM_TINY, CheckpointError, ModelStage, weight_params
from datagen.stages.protocol import SOURCE_COLUMNS, Stage, column_for


class DagError(ValueError):
    """A DAG that cannot run; the message names the offending entry."""


@dataclass(frozen=True)
class ShardsSection:
    max_samples: int = 256
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class RaySection:
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class MlflowSection:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (resolved by :func:`load`)
    tracking_uri: str | None = None
    experiment: str = "onegen-datagen"
    enabled: bool = True


def tracking_uri(explicit: str | None) -> str:
    """The store a run logs to: an explicit value (YAML or ``mlflow.tracking_uri=...``),
    else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``. Empty counts as unset."""
    if explicit:
        return str(explicit)
    return os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI


@dataclass(frozen=True)
class PreviewSection:
    samples_per_subset: int = 4


@dataclass(frozen=True)
class ResourcesSection:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int | None = None
    actors: int | tuple[int, int] | None = None  # actor pool (min, max); an int n: (1, n)


@dataclass(frozen=True)
class StageSection:
    name: str
    params: dict = field(default_factory=dict)
    resources: ResourcesSection = ResourcesSection()
    # false: validated, but not part of the DAG (``stages.face.enabled=false`` drops an
    # optional check; a stage that needs it then fails validation, naming it)
    enabled: bool = True


@dataclass(frozen=True)
class DagSection:
    name: str = "unnamed"
    description: str = ""
    source: dict = field(default_factory=lambda: {"kind": "demo"})
    output: str = "data/out"
    seed: int = 0
    # random-tiny: every model stage on its tiny random model (mechanics only, labels meaningless)
    weights: Literal["random-tiny"] | None = None
    # 0: every stage on CPU, whatever its resources.num_gpus says (a machine without a GPU);
    # null: each stage's own resources.num_gpus
    num_gpus: Literal[0] | None = None
    max_error_rate: float = 0.05
    allow_empty: bool = False  # a source listing no inputs is an error unless true
    allow_recipe_change: bool = False  # resume an output made by another recipe
    shards: ShardsSection = ShardsSection()
    stages: list = field(default_factory=list)
    subsets: list[str] = field(default_factory=list)
    ray: RaySection = RaySection()
    mlflow: MlflowSection = MlflowSection()
    preview: PreviewSection = PreviewSection()


DEFAULTS: dict[str, Any] = dataclasses.asdict(DagSection())


@dataclass(frozen=True)
class StageSpec:
    """One validated stage: its labeler class and typed parameters, its resources."""

    name: str
    cls: type[Stage]
    params: Any
    needs: tuple[str, ...]
    num_cpus: float
    num_gpus: float
    batch_size: int | None
    actors: tuple[int, int] | None  # actor pool (min, max) for model / GPU stages

    def build(self, seed: int) -> Stage:
        return self.cls(self.params, seed=seed)


@dataclass(frozen=True)
class SubsetSpec:
    name: str
    needs: tuple[str, ...]  # the stages (in run order) whose outputs its samples hold


@dataclass(frozen=True)
class Dag:
    """A validated DAG, typed once: what a run does and the record of it.

    ``stages``: what runs, the stages some chosen subset needs, in run order
    (``subsets=[i2i]`` leaves a DAG's model stages out, their weights unloaded);
    ``subsets``: the chosen subsets with the stages each needs; ``subset_digests`` /
    ``config_digest``: the recipe (:func:`subset_digests`). ``config`` is the resolved
    DAG, complete and read-only: MLflow's params and ``dag.yaml``, the ``_dag.yaml``
    beside the shards, a submitted job's ``dag.yaml``. ``source`` is the source's typed
    ``Params`` (``source_cls`` its :class:`~datagen.sources.base.Source`),
    ``source_spec`` the ``source`` section as written (what the digests hash)."""

    config: DictConfig
    name: str
    description: str
    output: str
    seed: int
    weights: str | None
    max_error_rate: float
    allow_empty: bool
    allow_recipe_change: bool
    source: Any
    source_cls: type[Source]
    source_spec: dict[str, Any]
    shards: ShardsSection
    ray: RaySection
    mlflow: MlflowSection
    preview: PreviewSection
    stages: tuple[StageSpec, ...]
    subsets: tuple[SubsetSpec, ...]
    subset_digests: dict[str, str]
    config_digest: str

    @property
    def subset_names(self) -> list[str]:
        return [s.name for s in self.subsets]

    def to_yaml(self) -> str:
        """The resolved DAG as YAML text (``_dag.yaml``, MLflow's ``dag.yaml``)."""
        return OmegaConf.to_yaml(self.config, resolve=True)


def load(
    path: str | Path,
    overrides: list[str] | None = None,
    source: dict[str, Any] | None = None,
    local_weights: bool = True,
) -> Dag:
    """Resolved and validated DAG: defaults <- YAML file <- dotted overrides (<- ``source``,
    the CLI's ``--input``), ``mlflow.tracking_uri`` filled in by :func:`tracking_uri`.
    ``local_weights``: model weights load on this machine (false for a DAG submitted to a
    cluster, whose workers check their own paths)."""
    path = Path(path)
    if not path.is_file():
        raise DagError(f"DAG file {path} does not exist")
    try:
        text = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - any YAML problem is the user's, one line
        raise DagError(f"{path}: not a valid YAML DAG: {exc}".splitlines()[0]) from None
    if not isinstance(text, DictConfig):
        raise DagError(f"{path}: a DAG is a mapping of keys (name, source, stages, subsets, ...)")
    for key in ("stages", "subsets"):
        if key in text and not OmegaConf.is_list(text[key]):
            example = "[t2i, i2i]" if key == "subsets" else "[{name: decode}, ...]"
            raise DagError(f"{key}: a list, e.g. {example}; got {text[key]!r}")
    try:
        cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), text)
    except Exception as exc:  # noqa: BLE001 - a section of the wrong shape, one line
        raise DagError(f"{path}: {exc}".splitlines()[0]) from None
    apply_overrides(cfg, overrides or [])
    if source is not None:
        cfg.source = OmegaConf.create(source)
    return validate(cfg, local_weights)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """``a.b=1``, ``stages.1.params.x=2`` or ``stages.degrade.params.x=2``
    (a stage by name); values parse as YAML (``[2, 3]``, ``null``, ``true``).
    Unknown keys are added here and refused by :func:`validate`, naming them."""

    def stage_by_name(item: str, parts: list[str]) -> list[str]:
        if len(parts) > 1 and parts[0] == "stages" and not parts[1].isdigit():
            names = [st.get("name") for st in cfg.stages]
            if parts[1] not in names:
                raise DagError(
                    f"override {item!r}: no stage named {parts[1]!r}"
                    f"{did_you_mean(parts[1], [str(n) for n in names])} (stages: {names})"
                )
            parts[1] = str(names.index(parts[1]))
        return parts

    try:
        common_overrides.apply_overrides(cfg, overrides, key_path=stage_by_name)
    except ValueError as exc:
        raise DagError(str(exc)) from None


def _check(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except P.ParamError as exc:
        raise DagError(str(exc)) from None


def _labeler(name: str, where: str) -> type[Stage]:
    if name not in LABELERS:
        raise DagError(
            f"{where}.name: unknown labeler {name!r}{did_you_mean(name, LABELERS)}"
            f" (labelers: {', '.join(sorted(LABELERS))})"
        )
    return labeler(name)


def _actors(res: ResourcesSection, cls: type[Stage], where: str) -> tuple[int, int] | None:
    actors = res.actors
    if actors is None:
        return (1, 1) if cls.uses_model or res.num_gpus else None
    lo, hi = (1, actors) if isinstance(actors, int) else actors
    if not 1 <= lo <= hi:
        raise DagError(f"{where}.resources.actors: need 1 <= min <= max, got {list(actors)!r}")
    return (lo, hi)


def _stage_specs(cfg: DictConfig, plain: dict[str, Any]) -> list[StageSpec]:
    """Stages validated one by one, in YAML order (not yet sorted by needs)."""
    if not plain["stages"]:
        raise DagError("stages: the DAG has no stages")
    specs: list[StageSpec] = []
    disabled: set[str] = set()
    for i, raw in enumerate(plain["stages"]):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise DagError(f"{where}: a stage is a mapping (name, params, resources)")
        if isinstance(raw.get("name"), str):
            where = f"stages.{raw['name']}"
        section = _check(P.build, StageSection, raw, where)
        where = f"stages.{section.name}"
        cls = _labeler(section.name, where)
        raw_params = dict(section.params)
        if plain["weights"] == RANDOM_TINY:
            raw_params.update({k: RANDOM_TINY for k in weight_params(cls.Params)})
        params = _check(P.build, cls.Params, raw_params, f"{where}.params")
        res = section.resources
        if plain["num_gpus"] is not None:
            res = dataclasses.replace(res, num_gpus=float(plain["num_gpus"]))
        if res.num_cpus < 0 or res.num_gpus < 0:
            raise DagError(f"{where}.resources: num_cpus and num_gpus must be >= 0")
        if res.batch_size is not None and res.batch_size < 1:
            raise DagError(f"{where}.resources.batch_size: must be >= 1")
        actors = _actors(res, cls, where)
        if not section.enabled:
            disabled.add(section.name)
        else:
            specs.append(
                StageSpec(
                    name=section.name,
                    cls=cls,
                    params=params,
                    needs=tuple(cls.needs),
                    num_cpus=res.num_cpus,
                    num_gpus=res.num_gpus,
                    batch_size=res.batch_size,
                    actors=actors,
                )
            )
        # Written back complete: what runs is what the resolved DAG shows.
        cfg.stages[i] = OmegaConf.create(
            {
                "name": section.name,
                "params": P.as_dict(params),
                "resources": {
                    "num_cpus": res.num_cpus,
                    "num_gpus": res.num_gpus,
                    "batch_size": res.batch_size,
                    "actors": list(actors) if actors else None,
                },
                "enabled": section.enabled,
            }
        )
    if not specs:
        raise DagError("stages: every stage of the DAG is disabled")
    present = {s.name for s in specs}
    for s in specs:
        off = [n for n in s.needs if n in disabled]
        if off:
            raise DagError(f"stages.{s.name}: needs stage {off[0]!r}, which is disabled")
    return [
        dataclasses.replace(
            s, needs=s.needs + tuple(n for n in s.cls.optional_needs if n in present)
        )
        for s in specs
    ]


def _in_run_order(specs: list[StageSpec]) -> list[StageSpec]:
    """Stages ordered by ``needs`` (YAML order among independent ones)."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DagError(f"stages: each labeler appears once; {dupes} appear more than once")
    for s in specs:
        for need in s.needs:
            if need not in names:
                raise DagError(
                    f"stages.{s.name}: needs stage {need!r}, which the DAG does not have"
                )
    ordered: list[StageSpec] = []
    pending = list(specs)
    while pending:
        ready = [s for s in pending if all(n in [o.name for o in ordered] for n in s.needs)]
        if not ready:
            raise DagError(f"stages: the needs of {[s.name for s in pending]} form a cycle")
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def _check_reads(ordered: list[StageSpec]) -> None:
    """What a stage reads exists: source columns, fields and transient columns of the
    stages it needs (transitively), metadata keys of its direct needs."""
    by_name = {s.name: s for s in ordered}
    for s in ordered:
        available = set(SOURCE_COLUMNS) | set(GROUP_COLUMNS)
        for need in closure(by_name, s.needs):
            available |= {column_for(f) for f in by_name[need].cls.fields()}
            available |= set(by_name[need].cls.transient)
        for need in s.needs:
            available |= set(by_name[need].cls.meta_keys())
        for need in s.cls.optional_needs:  # absent from this DAG: its keys read as None
            if need not in by_name and need in LABELERS:
                available |= set(labeler(need).meta_keys())
        missing = [c for c in s.cls.reads if c not in available]
        if missing:
            raise DagError(f"stages.{s.name}: reads {missing}, which none of its needs produce")


def closure(by_name: dict[str, StageSpec], names: tuple[str, ...] | list[str]) -> list[str]:
    """``names`` and every stage they need, transitively."""
    out: list[str] = []
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.append(n)
            todo.extend(by_name[n].needs)
    return out


def _subset_needs(ordered: list[StageSpec], subset: str) -> tuple[str, ...]:
    """The stages a subset's samples need, derived from what stages produce: for each of
    its fields and metadata keys the last stage (in run order) producing it, then their
    needs."""
    spec = SUBSETS[subset]
    wanted = [f.name for f in spec.fields if f.name != "json"]
    wanted += [k for k in spec.meta_keys if k not in COMMON_META_KEYS]
    chosen: list[str] = []
    for item in wanted:
        producers = [s.name for s in ordered if item in s.cls.produces]
        if not producers:
            makers = [n for n in LABELERS if item in labeler(n).produces]
            hint = (
                f" (add stage {' or '.join(repr(m) for m in makers)})"
                if makers
                else " (no labeler makes it yet)"
            )
            raise DagError(
                f"subsets: {subset!r} needs {item!r}, which no stage of this DAG produces{hint}"
            )
        chosen.append(producers[-1])
    by_name = {s.name: s for s in ordered}
    needed = set(closure(by_name, chosen))
    return tuple(s.name for s in ordered if s.name in needed)


def _check_weights(ray: RaySection, specs: list[StageSpec]) -> None:
    """A local run loads weights from this machine: each path is read now as its stage's
    wrapper will load it (layout, config, safetensors headers, pickle scans; no tensor
    loaded), so a missing or broken checkpoint is one line naming the key before Ray
    starts or the output is touched (on a cluster the workers' paths are checked where
    they load)."""
    if ray.address:
        return
    for s in specs:
        for key in weight_params(type(s.params)):
            value = getattr(s.params, key)
            if value != RANDOM_TINY and not os.path.exists(value):
                raise DagError(
                    f"stages.{s.name}.params.{key}: {value!r} does not exist (weights load "
                    f"offline from a local path); weights={RANDOM_TINY} runs tiny random models"
                )
        if issubclass(s.cls, ModelStage):
            try:
                s.cls.check_weights(s.params)
            except CheckpointError as exc:
                raise DagError(f"stages.{s.name}.params.{exc}") from None


def gpu_less_error(dag: Dag) -> str | None:
    """The one line for running ``dag`` on a Ray cluster without GPUs (Ray would queue a
    GPU stage's actors forever, without a word), naming the stage and the override that
    puts every stage on CPU; None when no stage asks for a GPU."""
    for s in dag.stages:
        if s.num_gpus:
            return (
                f"stages.{s.name}.resources.num_gpus is {s.num_gpus:g} but the Ray cluster has "
                f"no GPU; pass num_gpus=0 to run every stage on CPU (or "
                f"stages.{s.name}.resources.num_gpus=0 for this one)"
            )
    return None


def _check_source_fits(kind: str, subset: str) -> None:
    """Group subsets come from group sources (a scene's views, an identity's photos), item
    subsets from item sources: anything else could only fail every row."""
    group_subset = sources.source(kind).subset
    if group_subset is not None and subset != group_subset:
        raise DagError(
            f"subsets: source.kind {kind} gives {group_subset} samples (groups of views), "
            f"not {subset!r}"
        )
    if group_subset is None and SUBSETS[subset].min_views > 1:
        kinds = sorted(k for k in sources.SOURCES if sources.source(k).subset == subset)
        raise DagError(
            f"subsets: {subset!r} samples are groups of views: source.kind must be one of "
            f"{kinds}, not {kind}"
        )


def validate(cfg: DictConfig, local_weights: bool = True) -> Dag:
    """Everything checked at once, before anything runs (see the module docstring); ``cfg``
    is completed in place (every stage's parameters, ``mlflow.tracking_uri``) and the
    :class:`Dag` built from it."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(plain.get("subsets"), list):
        raise DagError(
            f"subsets: a list of subset names, e.g. [t2i, i2i]; got {plain.get('subsets')!r}"
        )
    top = _check(P.build, DagSection, plain, "")
    spec = top.source
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in sources.SOURCES:
        raise DagError(
            f"source.kind: {kind!r} is not a source{did_you_mean(str(kind), sources.SOURCES)}"
            f" (sources: {', '.join(sources.SOURCES)})"
        )
    source_cls = sources.source(kind)
    # Keys another source kind takes (``n`` of the demo after ``source.kind=folder``) are
    # left behind by an override of the kind, not typos: dropped. Any other key is refused.
    own = {f.name for f in dataclasses.fields(source_cls.Params)}
    other = {
        f.name for k in sources.SOURCES for f in dataclasses.fields(sources.source(k).Params)
    } - own
    for key in [k for k in spec if k in other]:
        del cfg.source[key]
        del spec[key]
    source_params = _check(source_cls.params, spec, "source")
    specs = _stage_specs(cfg, plain)
    ordered = _in_run_order(specs)
    _check_reads(ordered)
    if not top.subsets:
        raise DagError("subsets: the DAG writes no subsets")
    for name in top.subsets:
        if name not in SUBSETS:
            raise DagError(
                f"subsets: unknown subset {name!r}{did_you_mean(name, SUBSETS)}"
                f" (the schema defines {', '.join(SUBSETS)})"
            )
        _check_source_fits(kind, name)
        _subset_needs(ordered, name)
    if len(set(top.subsets)) != len(top.subsets):
        raise DagError(f"subsets: listed twice in {top.subsets}")
    if not 0 <= top.max_error_rate <= 1:
        raise DagError("max_error_rate: must be within [0, 1]")
    if top.shards.max_samples < 1 or top.shards.max_bytes < 1:
        raise DagError("shards.max_samples and shards.max_bytes: must be positive")
    chosen = tuple(SubsetSpec(name, _subset_needs(ordered, name)) for name in top.subsets)
    needed = {n for s in chosen for n in s.needs}
    by_name = {s.name: s for s in ordered}
    for s in ordered:
        if s.name not in needed:
            continue
        try:
            s.cls.check_needs(s.params, {n: by_name[n].params for n in s.needs})
        except P.ParamError as exc:
            raise DagError(f"stages.{s.name}: {exc}") from None
    if local_weights:
        _check_weights(top.ray, [s for s in specs if s.name in needed])
    # Resolved here, where the user runs or submits the DAG: the resolved DAG names its
    # store (``submit`` anchors a relative sqlite path there). Not part of any digest.
    cfg.mlflow.tracking_uri = tracking_uri(cfg.mlflow.tracking_uri)
    stages = tuple(s for s in ordered if s.name in needed)
    source_spec = OmegaConf.to_container(cfg.source, resolve=True)
    digests = subset_digests(source_spec, top.seed, stages, chosen)
    config = copy.deepcopy(cfg)
    OmegaConf.set_readonly(config, True)
    return Dag(
        config=config,
        name=top.name,
        description=top.description,
        output=top.output,
        seed=top.seed,
        weights=top.weights,
        max_error_rate=top.max_error_rate,
        allow_empty=top.allow_empty,
        allow_recipe_change=top.allow_recipe_change,
        source=source_params,
        source_cls=source_cls,
        source_spec=source_spec,
        shards=top.shards,
        ray=top.ray,
        mlflow=dataclasses.replace(top.mlflow, tracking_uri=str(cfg.mlflow.tracking_uri)),
        preview=top.preview,
        stages=stages,
        subsets=chosen,
        subset_digests=digests,
        config_digest=_digest(digests),
    )


def _digest(content: Any) -> str:
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def subset_digests(
    source_spec: dict[str, Any],
    seed: int,
    stages: tuple[StageSpec, ...],
    subsets: tuple[SubsetSpec, ...],
) -> dict[str, str]:
    """Per subset, the digest of what determines its samples' content (not where or how
    fast they are made): schema and key scheme, source, seed, and the stages it needs
    with their code ``version`` and complete parameters. Resume refuses to mix two
    recipes in one subset; adding a subset to an output does not touch the others.
    The config digest (:attr:`Dag.config_digest`) is the digest of these: one for the
    whole recipe."""
    by_name = {s.name: s for s in stages}
    return {
        spec.name: _digest(
            {
                "schema_version": SCHEMA_VERSION,
                "key_scheme": source_base.KEY_SCHEME_VERSION,
                "subset": spec.name,
                "source": source_spec,
                "seed": seed,
                "stages": [
                    {
                        "name": n,
                        "version": by_name[n].cls.version,
                        "params": P.as_dict(by_name[n].params),
                    }
                    for n in spec.needs
                ],
            }
        )
        for spec in subsets
    }
