"""The cameras' world is recorded per subset, and outputs in another world are refused:
a fit never trains on two sign conventions for the same rays, a resume never appends one
to the other (not even with ``allow_recipe_change``)."""

from __future__ import annotations

import json

import pytest

from datagen.cameras import CAMERA_FRAME
from datagen.shards.layout import MANIFEST, ShardFileError
from pipelines import dag
from tests.helpers import REPO
from tests.helpers import depth_pose_shards as S


def _made_before_the_frame(out: str, subset: str) -> None:
    path = f"{out}/{subset}/{MANIFEST}"
    with open(path) as f:
        manifest = json.load(f)
    manifest.pop("camera_frame")
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_manifests_of_multiview_subsets_name_the_frame(tmp_path):
    out = str(tmp_path / "out")
    S.write(out, "multiview", [2])
    S.write(out, "t2i", [2])
    assert json.loads((tmp_path / "out/multiview" / MANIFEST).read_text())["camera_frame"] == (
        CAMERA_FRAME
    )
    assert "camera_frame" not in json.loads((tmp_path / "out/t2i" / MANIFEST).read_text())


def test_a_fit_refuses_cameras_in_the_old_frame(tmp_path):
    from training.data.index import build_subset_index

    out = str(tmp_path / "out")
    S.write(out, "multiview", [2])
    assert build_subset_index([out], "multiview").keys  # today's frame: indexed
    _made_before_the_frame(out, "multiview")
    with pytest.raises(ShardFileError, match="OpenCV camera-0 frame .* rebuild the subset"):
        build_subset_index([out], "multiview")


def test_a_resume_refuses_an_output_in_the_old_frame_even_knowingly(tmp_path):
    from orchestration.datagen_job import check_recipe
    from orchestration.errors import DatagenError

    out = str(tmp_path / "out")
    S.write(out, "multiview", [2])
    cfg = dag.load(
        REPO / "pipelines" / "multiview.yaml",
        [f"output={out}", "stages.caption.enabled=false", "allow_recipe_change=true"],
    )
    check_recipe(cfg, out)  # today's frame resumes
    _made_before_the_frame(out, "multiview")
    with pytest.raises(DatagenError, match="multiview cannot be resumed: its cameras are in"):
        check_recipe(cfg, out)
