"""DAG loading: defaults, dotted overrides, clear errors, the recipe digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import dag

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.yaml"


def test_demo_dag_resolves_with_overrides():
    cfg = dag.load(
        DEMO,
        [
            "shards.max_samples=3",
            "stages.1.params.canny_low=50",
            "stages.degrade.params.canny_high=90",
        ],
    )
    assert cfg.shards.max_samples == 3
    stages = dag.stages(cfg)
    assert [s.name for s in stages] == ["decode", "degrade"]
    assert stages[1].params["canny_low"] == 50 and stages[1].params["canny_high"] == 90
    assert {s.name: s.needs for s in dag.subsets(cfg)} == {
        "t2i": ("decode",),
        "i2i": ("decode", "degrade"),
    }
    assert cfg.mlflow.tracking_uri == "sqlite:///mlflow.db" and cfg.max_error_rate == 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [{op: nope}]\nsubsets: {t2i: {}}", "unknown op 'nope'"),
        ("stages: [{op: decode}]\nsubsets: {x2y: {}}", "unknown subset 'x2y'"),
        ("stages: [{op: decode}]\nsubsets: {t2i: {needs: [degrade]}}", "needs stage 'degrade'"),
        ("stages: [{op: degrade}]\nsubsets: {t2i: {}}", "first stage must be a 'decode'"),
        ("stages: [{op: decode}, {op: decode}]\nsubsets: {t2i: {}}", "unique"),
        ("stages: [{op: decode}]\nsubsets: {}", "writes no subsets"),
        ("stages: [{op: decode}]\nsubsets: {t2i: {}}\nmax_error_rate: 2", "max_error_rate"),
    ],
)
def test_bad_dags_fail_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "dag.yaml"
    path.write_text(text)
    with pytest.raises(dag.DagError, match=message):
        dag.load(path)


def test_recipe_digest_tracks_content_not_placement():
    base = dag.config_digest(dag.load(DEMO))
    assert (
        dag.config_digest(
            dag.load(
                DEMO,
                [
                    "output=/elsewhere",
                    "stages.0.resources.num_cpus=0.5",
                    "ray.num_cpus=8",
                    "shards.max_samples=7",
                ],
            )
        )
        == base
    )
    assert dag.config_digest(dag.load(DEMO, ["seed=1"])) != base
    assert dag.config_digest(dag.load(DEMO, ["stages.1.params.canny_high=150"])) != base


def test_recipe_digest_tracks_code_versions(monkeypatch):
    from datagen import sources
    from pipelines.ops import OPS

    cfg = dag.load(DEMO)
    base = dag.config_digest(cfg)
    monkeypatch.setattr(OPS["decode"], "version", "999")
    assert dag.config_digest(cfg) != base
    monkeypatch.undo()
    monkeypatch.setattr(sources, "KEY_SCHEME_VERSION", "999")
    assert dag.config_digest(cfg) != base


def test_resume_refuses_an_output_made_by_older_code(tmp_path, monkeypatch):
    """The digest an output was made with is read back, not recomputed with today's
    code: after an op's version changes, a rerun on that output is refused."""
    from orchestration.datagen_job import RECIPE, check_recipe
    from orchestration.errors import DatagenError
    from pipelines.ops import OPS

    out = tmp_path / "out"
    out.mkdir()
    cfg = dag.load(DEMO, [f"output={out}"])
    first = check_recipe(cfg, str(out))
    assert (out / RECIPE).read_text().startswith(f"# config_digest: {first}")
    assert check_recipe(cfg, str(out)) == first  # same code, same recipe: resumes
    monkeypatch.setattr(OPS["decode"], "version", "999")
    with pytest.raises(DatagenError, match=f"digest {first}, now"):
        check_recipe(cfg, str(out))
    # An output from before the header: its manifest's digest is the one it was made with.
    (out / RECIPE).write_text((out / RECIPE).read_text().split("\n", 1)[1])
    (out / "t2i").mkdir()
    (out / "t2i" / "manifest.json").write_text('{"shards": [], "config_digest": "0123abcd"}')
    with pytest.raises(DatagenError, match="digest 0123abcd, now"):
        check_recipe(cfg, str(out))


def test_cli_takes_overrides_anywhere(tmp_path, monkeypatch):
    from orchestration import cli

    seen = {}
    monkeypatch.setattr(cli, "_datagen_run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["datagen", "run", str(DEMO), "seed=3", "--output", "x", "a.b=1"]) == 0
    assert seen["overrides"] == ["seed=3", "a.b=1"] and seen["output"] == "x"
    with pytest.raises(SystemExit):
        cli.main(["datagen", "run", str(DEMO), "--bogus"])
