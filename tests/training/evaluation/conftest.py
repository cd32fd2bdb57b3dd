"""What the ``onegen eval`` tests share: one tiny fit on every subset (a real checkpoint, 40%
of the keys held out) (``tests.helpers.eval_cli`` runs the command in-process)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from tests.helpers import depth_pose_shards as S

SUBSETS = ("t2i", "i2i", "semantic", "depth", "pose", "multiview", "faceid")


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> dict:
    """A tiny fit on every subset with 40% of the keys held out."""
    from training.config import load_config
    from training.fit import fit

    tmp = tmp_path_factory.mktemp("eval_run")
    shards = S.write_all(str(tmp / "shards"))
    paths = "{" + ",".join(f"{s}: {shards}" for s in SUBSETS) + "}"
    result = fit(load_config(REPO / "training/configs/demo.yaml", [
        f"data.paths={paths}", "data.holdout=0.4", "trainer.max_steps=2",
        "checkpoint.every_n_steps=2", "samples.every_n_steps=0", "eval.every_n_steps=0",
        "data.num_workers=0", "data.batch_size=2", f"data.faceid_max_views={S.FACE_VIEWS}",
        "data.buckets=[[32,32]]", f"runs_dir={tmp}/runs", "mlflow.enabled=false",
    ]))  # fmt: skip
    return {"run": result.run_dir, "shards": shards}
