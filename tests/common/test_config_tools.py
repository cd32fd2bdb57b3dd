"""Training's own config helpers (``common.overrides``): dotted overrides for fit
configs and flat MLflow params, shared with datagen tracking, with no ``pipelines`` import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from common.overrides import apply_overrides, flat_params
from tests.helpers import REPO


def test_overrides_parse_values_as_yaml_and_add_keys():
    cfg = OmegaConf.create({"data": {"batch_size": 8, "paths": None}, "seed": 0})
    apply_overrides(
        cfg,
        ["seed=3", "data.paths={t2i: /data/out}", "data.buckets=[[32, 32]]", "name=", "x.y=null"],
    )
    assert cfg.seed == 3 and cfg.data.paths == {"t2i": "/data/out"}
    assert cfg.data.buckets == [[32, 32]] and cfg.name == "" and cfg.x.y is None
    assert cfg.data.batch_size == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [("seed", "is not key=value"), ("a..b=1", "not a dotted key"), ("a=[1, 2", "not YAML")],
)
def test_bad_overrides_are_value_errors_naming_them(override, message):
    with pytest.raises(ValueError, match=message) as caught:
        apply_overrides(OmegaConf.create({}), [override])
    assert override in str(caught.value)


def test_fit_configs_report_bad_overrides_as_config_errors():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["trainer.max_steps"])
    assert load_config(None, ["trainer.max_steps=7"]).trainer.max_steps == 7


def test_flat_params_names_stages_and_cuts_values():
    cfg = {
        "a": {"b": 1, "c": [1, 2]},
        "stages": [{"name": "decode", "p": 2}, {"q": 3}],
        "s": "x" * 9,
    }
    assert flat_params(cfg, max_len=4) == {
        "a.b": "1",
        "a.c": "[1, ",
        "stages.decode.name": "deco",
        "stages.decode.p": "2",
        "stages.1.q": "3",
        "s": "xxxx",
    }
    assert flat_params(OmegaConf.create(cfg)) == flat_params(cfg)


def test_datagen_tracking_gets_flat_params_without_lightning():
    """orchestration.tracking (every datagen run) imports flat_params from training: that
    must not import Lightning or torch (seconds per run), and training's config helpers
    import nothing from pipelines."""
    code = (
        "import sys, common.overrides as c;"
        "assert not [m for m in ('lightning', 'torch', 'pipelines') if m in sys.modules];"
        "import orchestration.tracking as t;"
        "assert t.flat_params is c.flat_params;"
        "print(sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
