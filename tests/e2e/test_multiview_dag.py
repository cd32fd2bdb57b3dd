"""pipelines/multiview.yaml end to end on a real local Ray: procedural scenes (known
cameras) -> decode -> VLM caption of view 0 (tiny random model in an actor) -> scene ->
shards that pass ``verify`` and the schema, every key accounted for once, and stored
cameras, intrinsics and pixels that agree with the generator's geometry."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from datagen import shards, sources
from datagen.cameras import CAMERA0
from datagen.images import decode_rgb
from datagen.schema import validate_sample
from datagen.shards.reader import ShardReader
from datagen.sources.scenes.procedural import render_scene, visible_points
from orchestration.cli import main as cli
from pipelines import dag
from tests.helpers import REPO

pytestmark = pytest.mark.slow
DAG = REPO / "pipelines" / "multiview.yaml"
FRAMES, RENDER, STORED = 6, 128, 64  # frames per scene, rendered side, stored side


def small(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides: 2 scenes x 2 samples of 2-3 views, tiny random VLM on CPU in one actor."""
    return [
        "weights=random-tiny",
        "source.n=2",
        f"source.frames={FRAMES}",
        f"source.size={RENDER}",
        "source.views=[2,3]",
        "source.samples_per_scene=2",
        f"source.cache_dir={tmp_path / 'scenes'}",
        f"stages.scene.params.size={STORED}",
        "shards.max_samples=3",
        "stages.caption.params.max_new_tokens=24",
        "stages.caption.resources.num_gpus=0",
        "stages.caption.resources.actors=[1,1]",
        "stages.caption.resources.batch_size=2",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


def run_dag(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """Runs the DAG through the CLI; the input keys its source lists."""
    overrides = small(tmp_path, *extra)
    assert cli(["datagen", "run", str(DAG), "--output", str(out), *overrides]) == 0
    cfg = dag.load(DAG, [f"output={out}", *overrides])
    manifest = sources.resolve(cfg.source_spec, work_dir=str(out / "_inputs"), seed=cfg.seed)
    return manifest.column("key").to_pylist()


def check_accounting(out: Path, keys: list[str]) -> tuple[set[str], list[dict]]:
    """Every input key written, quarantined or filtered exactly once; (written, quarantine)."""
    written_list = shards.read_indexes(str(out), "multiview").column("key").to_pylist()
    quarantine = shards.read_quarantine(str(out), "multiview").to_pylist()
    q_keys = [r["key"] for r in quarantine]
    assert len(written_list) == len(set(written_list)), "a key was written twice"
    assert len(q_keys) == len(set(q_keys)), "a key was quarantined twice"
    written = set(written_list)
    assert written.isdisjoint(q_keys)
    assert written | set(q_keys) == set(keys) and len(keys) == len(set(keys))
    return written, quarantine


def read_samples(out: Path) -> list[tuple[str, dict[str, bytes], dict]]:
    """Every multiview sample read back through the ShardReader, validated."""
    reader = ShardReader(str(out))
    got = []
    for shard in reader.shards("multiview"):
        for key, files in reader.samples("multiview", shard):
            meta = validate_sample("multiview", {"__key__": key, **files})
            got.append((key, files, meta))
    return got


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def scene_seed(scene: str) -> int:
    """Procedural scene i is rendered from seed i; its id ends with i."""
    match = re.search(r"(\d+)$", scene)
    assert match, f"scene id {scene!r} does not end with its index"
    return int(match.group(1))


def project(c2w: np.ndarray, k: np.ndarray, points: np.ndarray) -> np.ndarray:
    cam = (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T)[:3]
    uvw = k @ cam
    return (uvw[:2] / uvw[2]).T


def check_geometry(files: dict[str, bytes], meta: dict) -> None:
    """The stored rig against the generator's: intrinsics = the rendered K after the
    (here: whole-image) crop and the resize; cameras = the rendered ones in camera 0's frame
    turned to CAMERA0 and scaled by camera_scale; and a surface point seen at a pixel of the rendered frame
    projects, through the stored camera, onto the same place and colour of the stored view
    (colours catch a wrong, swapped or flipped view; sub-pixel accuracy of the stored K on
    real pixels is tests/datagen/stages/test_scene_stage.py's)."""
    views = meta["num_views"]
    c2w, k = load_npy(files["cameras.npy"]), load_npy(files["intrinsics.npy"])
    assert c2w.shape == (views, 4, 4) and k.shape == (views, 3, 3)
    assert c2w.dtype == k.dtype == np.float32
    np.testing.assert_allclose(c2w[0], CAMERA0, atol=1e-6)
    render = render_scene(scene_seed(meta["scene"]), FRAMES, RENDER)
    frames = meta["frames"]
    assert len(frames) == views and len(set(frames)) == views
    s = STORED / RENDER
    to_stored = CAMERA0 @ np.linalg.inv(render.c2w[frames[0]])
    scale = meta["camera_scale"]
    for v, f in enumerate(frames):
        expected_k = render.K[f].copy()
        expected_k[:2] *= s
        np.testing.assert_allclose(k[v], expected_k, rtol=1e-5)
        rel = to_stored @ render.c2w[f]
        np.testing.assert_allclose(c2w[v][:3, :3], rel[:3, :3], atol=1e-5)
        np.testing.assert_allclose(c2w[v][:3, 3], scale * rel[:3, 3], atol=1e-5)

        seen = visible_points(render, f, n=400, seed=v)
        stored_points = scale * (to_stored[:3, :3] @ seen.points.T + to_stored[:3, 3:4]).T
        uv = project(c2w[v].astype(np.float64), k[v].astype(np.float64), stored_points)
        rows, cols = seen.pixels[:, 0], seen.pixels[:, 1]
        np.testing.assert_allclose(uv, np.c_[cols + 0.5, rows + 0.5] * s, atol=1e-3)
        # Colours: only where the rendered 4x4 block around the pixel is flat (one stored
        # pixel), so the comparison does not hinge on edges.
        image, stored = render.images[f].astype(int), decode_rgb(files[f"img{v}.jpg"]).astype(int)
        diffs = []
        for (u, w), r, c in zip(uv, rows, cols, strict=True):
            r0, c0 = 2 * int(w), 2 * int(u)  # the 2x2 block the stored pixel averages
            block = image[max(r0 - 1, 0) : r0 + 3, max(c0 - 1, 0) : c0 + 3]
            if np.ptp(block, axis=(0, 1)).max() > 6:
                continue
            diffs.append(np.abs(stored[int(w), int(u)] - image[r, c]).max())
        assert len(diffs) >= 20, f"view {v}: too few flat points to compare colours"
        assert np.median(diffs) <= 6 and np.percentile(diffs, 90) <= 14, (v, sorted(diffs)[-10:])


def test_multiview_dag_with_vlm_caption(ray_local, tmp_path):
    out = tmp_path / "out"
    keys = run_dag(tmp_path, out)
    assert cli(["datagen", "verify", str(out)]) == 0
    written, quarantine = check_accounting(out, keys)
    assert len(keys) == 4 and written == set(keys), quarantine
    samples = read_samples(out)
    assert sorted(k for k, _, _ in samples) == sorted(keys)
    for _key, files, meta in samples:
        views = meta["num_views"]
        assert 2 <= views <= 3
        assert {n for n in files if n.startswith("img")} == {f"img{v}.jpg" for v in range(views)}
        assert all(
            decode_rgb(files[f"img{v}.jpg"]).shape == (STORED, STORED, 3) for v in range(views)
        )
        assert meta["width"] == meta["height"] == STORED
        assert meta["caption_model"] == "random-tiny" and meta["caption"].strip()
        assert meta["source_caption"] and meta["source_caption"] != meta["caption"]
        assert meta["captions"] == [""] * views
        check_geometry(files, meta)


def test_multiview_dag_without_a_vlm_uses_the_scene_caption(ray_local, tmp_path):
    out = tmp_path / "out"
    keys = run_dag(
        tmp_path, out, f"stages=[{{name: decode}}, {{name: scene, params: {{size: {STORED}}}}}]"
    )
    assert cli(["datagen", "verify", str(out)]) == 0
    written, _ = check_accounting(out, keys)
    assert written == set(keys)
    samples = read_samples(out)
    assert len(samples) == 4
    for _key, files, meta in samples:
        render = render_scene(scene_seed(meta["scene"]), FRAMES, RENDER)
        assert meta["caption"] == render.caption
        assert "caption_model" not in meta and "source_caption" not in meta
        check_geometry(files, meta)
