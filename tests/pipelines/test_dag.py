"""DAG loading: defaults, dotted overrides, strict validation before anything runs,
subsets derived from what stages produce, per-subset recipe digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import dag
from tests.helpers import REPO

DEMO = REPO / "pipelines" / "demo.yaml"
CAPTIONED = REPO / "pipelines" / "captioned.yaml"
TINY = ["weights=random-tiny"]


def test_demo_dag_resolves_with_overrides():
    cfg = dag.load(
        DEMO,
        [
            *TINY,
            "shards.max_samples=3",
            "stages.1.params.canny_low=50",
            "stages.degrade.params.canny_high=90",
        ],
    )
    assert cfg.shards.max_samples == 3
    stages = {s.name: s for s in cfg.stages}
    assert list(stages) == ["decode", "degrade", "caption", "segment", "depth", "pose"]
    assert stages["degrade"].params.canny_low == 50 and stages["degrade"].params.canny_high == 90
    assert stages["depth"].actors == (1, 1) and stages["decode"].actors is None
    # Derived from what stages produce: the caption stage makes every subset's caption.
    assert {s.name: s.needs for s in cfg.subsets} == {
        "t2i": ("decode", "caption"),
        "i2i": ("decode", "degrade", "caption"),
        "semantic": ("decode", "caption", "segment"),
        "depth": ("decode", "caption", "depth"),
        "pose": ("decode", "caption", "pose"),
    }
    # The resolved DAG shows every parameter, defaults included, and the switch's effect.
    assert cfg.config.stages[1].params.jpeg_quality == 95
    assert stages["caption"].params.weights == "random-tiny"
    assert stages["segment"].params.detector_weights == "random-tiny"
    assert stages["segment"].params.weights == "random-tiny"
    assert stages["pose"].params.detector_weights == "random-tiny"
    assert cfg.mlflow.tracking_uri == "sqlite:///mlflow.db" and cfg.max_error_rate == 0.05


def test_choosing_subsets_runs_only_the_stages_they_need():
    cfg = dag.load(DEMO, [*TINY, "subsets=[i2i]"])
    assert [s.name for s in cfg.stages] == ["decode", "degrade", "caption"]
    assert [s.name for s in cfg.subsets] == ["i2i"]
    cfg = dag.load(CAPTIONED, ["subsets=[i2i]"])  # no weights needed: no model stage
    assert [s.name for s in cfg.stages] == ["decode", "degrade"]


def test_segment_refuses_a_caption_stage_that_lists_no_entities():
    with pytest.raises(
        dag.DagError, match="stages.segment: .*stages.caption.params.entity_prompt is null"
    ):
        dag.load(DEMO, [*TINY, "stages.caption.params.entity_prompt=null"])
    # without the semantic subset the segment stage does not run: nothing to refuse
    cfg = dag.load(DEMO, [*TINY, "stages.caption.params.entity_prompt=null", "subsets=[t2i]"])
    assert [s.name for s in cfg.stages] == ["decode", "caption"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dag.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [{name: nope}]\nsubsets: [t2i]", "stages.nope.name: unknown labeler 'nope'"),
        ("stages: [{name: decod}]\nsubsets: [t2i]", "did you mean 'decode'"),
        ("stages: [{op: decode}]\nsubsets: [t2i]", "unknown key 'op'"),
        ("stages: [{name: decode}]\nsubsets: [x2y]", "unknown subset 'x2y'"),
        ("stages: [{name: decode}]\nsubsets: {t2i: {}}", "subsets: a list, e.g. \\[t2i, i2i\\]"),
        (
            "stages: [{name: decode}]\nsubsets: [i2i]",
            "'i2i' needs 'canny.png'.*add stage 'degrade'",
        ),
        ("stages: [{name: degrade}]\nsubsets: [t2i]", "stages.degrade: needs stage 'decode'"),
        ("stages: [{name: decode}, {name: decode}]\nsubsets: [t2i]", "more than once"),
        ("stages: [{name: decode}]\nsubsets: []", "writes no subsets"),
        ("stages: []\nsubsets: [t2i]", "the DAG has no stages"),
        ("stages: [{name: decode}]\nsubsets: [t2i, t2i]", "listed twice"),
        ("stages: [{name: decode}]\nsubsets: [t2i]\nmax_error_rate: 2", "max_error_rate"),
        ("stages: [{name: decode}]\nsubsets: [t2i]\nseeed: 1", "seeed: unknown key.*'seed'"),
        ("stages: [{name: decode}]\nsubsets: [t2i]\nshards: {max_sample: 1}", "shards.max_sample"),
        ("stages: [{name: decode}]\nsubsets: [t2i]\nseed: one", "seed: expected int, got 'one'"),
        ("stages: [{name: decode, params: {min_sid: 3}}]\nsubsets: [t2i]", "'min_side'"),
        (
            "stages: [{name: decode, params: {max_side: big}}]\nsubsets: [t2i]",
            "stages.decode.params.max_side: expected int | null, got 'big'",
        ),
        (
            "stages: [{name: decode, resources: {num_cpu: 1}}]\nsubsets: [t2i]",
            "stages.decode.resources.num_cpu: unknown key.*'num_cpus'",
        ),
        (
            "stages: [{name: decode, resources: {actors: [3, 2]}}]\nsubsets: [t2i]",
            "actors: need 1 <= min <= max",
        ),
        (
            "source: {kind: folde}\nstages: [{name: decode}]\nsubsets: [t2i]",
            "did you mean 'folder'",
        ),
        (
            "source: {kind: folder}\nstages: [{name: decode}]\nsubsets: [t2i]",
            "source.path: required",
        ),
        (
            "source: {kind: demo, n: 3, pth: x}\nstages: [{name: decode}]\nsubsets: [t2i]",
            "source.pth",
        ),
        (
            "stages: [{name: decode}]\nsubsets: [t2i]\nweights: tiny",
            "weights: expected 'random-tiny'",
        ),
        (
            "stages: [{name: decode}, {name: depth, params: {weights: /no/such/dir}}]\nsubsets: [depth]",
            "stages.depth.params.weights: '/no/such/dir' does not exist",
        ),
        ("- just\n- a list", "a DAG is a mapping"),
    ],
)
def test_bad_dags_fail_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(dag.DagError, match=message):
        dag.load(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sed=1", "unknown key 'sed'; did you mean 'seed'"),
        ("stages.degrad.params.canny_low=1", "no stage named 'degrad'; did you mean 'degrade'"),
        ("stages.degrade.params.canny_lo=1", "stages.degrade.params.canny_lo: unknown key"),
        ("stages.degrade.params.downscale_factors=[a]", "downscale_factors\\[0\\]: expected int"),
        ("ray.num_cpu=4", "ray.num_cpu: unknown key.*'num_cpus'"),
        ("subsets=[t2j]", "did you mean 't2i'"),
        ("noequals", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(dag.DagError, match=message):
        dag.load(DEMO, [*TINY, override])


def test_missing_weights_are_named_and_the_switch_runs_tiny_models():
    with pytest.raises(dag.DagError, match="stages.caption.params.weights: .* does not exist"):
        dag.load(DEMO)
    cfg = dag.load(DEMO, ["ray.address=auto"])  # on a cluster the workers check their paths
    assert {s.name: s for s in cfg.stages}["depth"].params.weights == (
        "models/depth-anything-v2-small"
    )


def test_recipe_digest_tracks_content_not_placement():
    base = dag.load(DEMO, TINY).subset_digests
    assert (
        dag.load(
            DEMO,
            [
                *TINY,
                "output=/elsewhere",
                "stages.0.resources.num_cpus=0.5",
                "stages.depth.resources.actors=[1,3]",
                "ray.num_cpus=8",
                "shards.max_samples=7",
            ],
        ).subset_digests
        == base
    )
    assert dag.load(DEMO, [*TINY, "seed=1"]).subset_digests != base
    changed = dag.load(DEMO, [*TINY, "stages.1.params.canny_high=150"]).subset_digests
    assert changed["i2i"] != base["i2i"]
    assert {s: changed[s] for s in ("t2i", "depth", "pose")} == {
        s: base[s] for s in ("t2i", "depth", "pose")
    }
    # Choosing subsets does not change the recipe of those chosen.
    assert dag.load(DEMO, [*TINY, "subsets=[i2i]"]).subset_digests == {"i2i": base["i2i"]}


def test_recipe_digest_tracks_code_versions(monkeypatch):
    from datagen.sources import base as source_base
    from datagen.stages.degrade import DegradeStage

    base = dag.load(DEMO, TINY).subset_digests
    monkeypatch.setattr(DegradeStage, "version", "999")
    bumped = dag.load(DEMO, TINY).subset_digests
    assert bumped["i2i"] != base["i2i"] and bumped["t2i"] == base["t2i"]
    monkeypatch.undo()
    monkeypatch.setattr(source_base, "KEY_SCHEME_VERSION", "999")
    assert dag.load(DEMO, TINY).subset_digests["t2i"] != base["t2i"]


def test_resume_refuses_a_subset_made_by_older_code(tmp_path, monkeypatch):
    """The digests an output was made with are read back, not recomputed with today's
    code: after a stage's version changes, a rerun of the subsets it feeds is refused;
    a new subset is simply added."""
    from datagen.stages.degrade import DegradeStage
    from orchestration.datagen_job import RECIPE, check_recipe
    from orchestration.errors import DatagenError

    out = tmp_path / "out"
    out.mkdir()
    t2i_only = dag.load(CAPTIONED, [f"output={out}", "subsets=[t2i]"])
    first = check_recipe(t2i_only, str(out))
    both = dag.load(CAPTIONED, [f"output={out}", "subsets=[t2i,i2i]"])
    digests = check_recipe(both, str(out))  # i2i is new: added
    assert digests["t2i"] == first["t2i"]
    assert f"# subset_digest i2i: {digests['i2i']}" in (out / RECIPE).read_text()
    assert check_recipe(t2i_only, str(out)) == first  # t2i alone still resumes
    monkeypatch.setattr(DegradeStage, "version", "999")  # the recipes as loaded from now on
    t2i_only = dag.load(CAPTIONED, [f"output={out}", "subsets=[t2i]"])
    assert check_recipe(t2i_only, str(out))  # t2i does not need degrade
    with pytest.raises(DatagenError, match=f"for i2i \\(digest {digests['i2i']}, now"):
        check_recipe(dag.load(CAPTIONED, [f"output={out}", "subsets=[t2i,i2i]"]), str(out))
    # An output from before per-subset digests: one digest for all its subsets.
    (out / RECIPE).write_text("# config_digest: 0123abcd\nname: old\n")
    (out / "t2i").mkdir()
    with pytest.raises(DatagenError, match="t2i \\(digest 0123abcd, now"):
        check_recipe(t2i_only, str(out))


def test_cli_takes_overrides_anywhere(tmp_path, monkeypatch):
    from orchestration import cli

    seen = {}
    monkeypatch.setattr(cli, "_datagen_run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["datagen", "run", str(DEMO), "seed=3", "--output", "x", "a.b=1"]) == 0
    assert seen["overrides"] == ["seed=3", "a.b=1"] and seen["output"] == "x"
    with pytest.raises(SystemExit):
        cli.main(["datagen", "run", str(DEMO), "--bogus"])


MULTIVIEW = REPO / "pipelines" / "multiview.yaml"
FACEID = REPO / "pipelines" / "faceid.yaml"


def test_optional_needs_follow_the_stages_the_dag_has():
    """identity runs after face and caption when the DAG has them; switched off
    (``stages.<name>.enabled=false``) they leave the DAG, the run order and the recipe."""
    full = dag.load(FACEID, TINY)
    assert {s.name: s.needs for s in full.subsets} == {
        "faceid": ("decode", "face", "caption", "identity")
    }
    assert dict((s.name, s.needs) for s in full.stages)["identity"] == (
        "decode",
        "face",
        "caption",
    )
    bare = dag.load(FACEID, [*TINY, "stages.face.enabled=false", "stages.caption.enabled=false"])
    assert [s.name for s in bare.stages] == ["decode", "identity"]
    assert bare.subset_digests != full.subset_digests
    assert bare.config.stages[1].enabled is False  # the resolved DAG still shows it, switched off
    with pytest.raises(dag.DagError, match="stages.face: needs stage 'decode', which is disabled"):
        dag.load(FACEID, [*TINY, "stages.decode.enabled=false"])


def test_group_sources_and_group_subsets_go_together():
    with pytest.raises(dag.DagError, match="gives multiview samples .* not 't2i'"):
        dag.load(MULTIVIEW, [*TINY, "subsets=[t2i]"])
    with pytest.raises(dag.DagError, match="'faceid' samples are groups of views"):
        dag.load(CAPTIONED, ["subsets=[faceid]"])
    mv = dag.load(MULTIVIEW, TINY)
    assert [s.name for s in mv.subsets] == ["multiview"]


def test_the_dag_is_typed_once():
    """``load`` returns one frozen, typed object: sections as dataclasses, the source as its
    Params, the plan and the digests computed; the resolved YAML beside it is read-only."""
    import dataclasses

    from omegaconf.errors import ReadonlyConfigError

    from datagen.sources.demo import DemoParams, DemoSource

    d = dag.load(DEMO, [*TINY, "shards.max_samples=3", "seed=2"])
    assert d.shards == dag.ShardsSection(max_samples=3, max_bytes=d.shards.max_bytes)
    assert d.seed == 2 and d.mlflow.tracking_uri == d.config.mlflow.tracking_uri
    assert d.source_cls is DemoSource and d.source == DemoParams("demo", 48, 512, None)
    assert d.source_spec == {"kind": "demo", "n": 48, "max_side": 512}
    assert d.subset_names == ["t2i", "i2i", "semantic", "depth", "pose"]
    assert set(d.subset_digests) == set(d.subset_names) and len(d.config_digest) == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.seed = 3  # type: ignore[misc]
    with pytest.raises(ReadonlyConfigError):
        d.config.seed = 3


ONEGEN = REPO / "pipelines" / "onegen.yaml"
DEPTH = REPO / "pipelines" / "depth.yaml"


@pytest.fixture(scope="module")
def tiny_depth_folder(tmp_path_factory) -> Path:
    from datagen.stages.models.tiny.depth import save_tiny

    return save_tiny(tmp_path_factory.mktemp("weights") / "depth")


def test_weights_are_read_before_anything_runs(tiny_depth_folder, tmp_path):
    """A lying safetensors header fails validation in one line naming the stage, the key,
    the file and what is wrong; a submitted DAG (``local_weights=False``) or one run on a
    cluster (``ray.address``) leaves the paths to the workers."""
    import shutil
    import struct

    good = [f"stages.depth.params.weights={tiny_depth_folder}"]
    assert dag.load(DEPTH, good).stages[-1].params.weights == str(tiny_depth_folder)
    bad = Path(shutil.copytree(tiny_depth_folder, tmp_path / "depth"))
    st = bad / "model.safetensors"
    size = st.stat().st_size
    st.write_bytes(struct.pack("<Q", size) + st.read_bytes()[8:])
    overrides = [f"stages.depth.params.weights={bad}"]
    with pytest.raises(dag.DagError) as err:
        dag.load(DEPTH, overrides)
    assert str(err.value) == (
        f"stages.depth.params.weights: {st}: safetensors header length {size} runs past the "
        f"end of the file ({size} bytes)"
    )
    dag.load(DEPTH, overrides, local_weights=False)
    dag.load(DEPTH, [*overrides, "ray.address=auto"])


def test_num_gpus_0_puts_every_stage_on_cpu():
    cfg = dag.load(ONEGEN, ["num_gpus=0", *TINY])
    assert len(cfg.stages) == 6 and {s.num_gpus for s in cfg.stages} == {0.0}
    assert {st.resources.num_gpus for st in cfg.config.stages} == {0.0}  # the resolved DAG
    assert cfg.config.num_gpus == 0
    default = dag.load(ONEGEN, TINY)
    assert {s.name: s.num_gpus for s in default.stages}["caption"] == 1.0
    assert default.config.num_gpus is None
    assert dag.gpu_less_error(cfg) is None
    semantic = dag.load(REPO / "pipelines" / "semantic.yaml", ["num_gpus=0", *TINY])
    assert {s.num_gpus for s in semantic.stages} == {0.0}


def test_the_gpu_less_error_names_the_override():
    line = dag.gpu_less_error(dag.load(ONEGEN, TINY))
    assert line == (
        "stages.caption.resources.num_gpus is 1 but the Ray cluster has no GPU; pass "
        "num_gpus=0 to run every stage on CPU (or stages.caption.resources.num_gpus=0 for "
        "this one)"
    )


@pytest.mark.parametrize("value", ["1", "0.5", "abc", "true", "[0]"])
def test_num_gpus_takes_only_0_or_null(value):
    with pytest.raises(dag.DagError, match=r"^num_gpus: expected 0 \| null, got "):
        dag.load(ONEGEN, [f"num_gpus={value}", *TINY])
