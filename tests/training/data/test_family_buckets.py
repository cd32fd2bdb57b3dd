"""Per-family buckets (``data.buckets`` by task family, subset and view-count range, as the
paper's stage 2 trains): the batches of each family come at its resolution, faceid batches of
2 photos at another than those of 3, the choice is a pure function of (seed, rank, batch),
and every malformed table is one line naming the key before any shard is read."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from tests.helpers import REPO, depth_pose_shards as S
from training.data.buckets import nearest_bucket
from training.data.config import ConfigError, DataConfig

SUBSETS = ("t2i", "depth", "multiview", "faceid")
TABLE = {
    "default": [[32, 32]],
    "text2image": [[64, 64], [48, 80]],
    "faceid": {"2": [[48, 48]], "3-": [[32, 32]]},
}


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("family_buckets") / "out")
    for subset in SUBSETS:
        S.write(out, subset, [4])
    return out


def _stream(out: str, rank: int = 0, **kw):
    from training.data.datamodule import OneGenDataModule

    cfg = {
        "paths": {s: out for s in SUBSETS},
        "batch_size": 2,
        "num_workers": 0,
        "seed": 3,
        "buckets": TABLE,
        "caption_dropout": 0.0,
        "faceid_min_views": 2,
        "faceid_max_views": S.FACE_VIEWS,
        "multiview_max_views": S.MV_VIEWS,
        **kw,
    }
    dm = OneGenDataModule(cfg)
    dm.setup()
    return dm.stream(start_batch=0, rank=rank)


def test_each_family_and_view_count_trains_at_its_own_buckets(shards_dir):
    stream = _stream(shards_dir)
    seen: Counter = Counter()
    for k in range(40):
        batch = stream.make_batch(k)
        subset, (b, v, _, h, w) = batch["subsets"][0], batch["pixels"].shape
        if subset == "t2i":  # the text-to-image bucket nearest the sample's aspect
            assert (h, w) in {(64, 64), (48, 80)}, k
        elif subset == "faceid":
            assert (h, w) == ((48, 48) if v == 2 else (32, 32)), (k, v)
        else:  # depth and multiview: default
            assert (h, w) == (32, 32), (k, subset)
        if subset == "multiview":
            assert batch["rays"].shape[-2:] == (h // 8, w // 8)
        seen[(subset, v, h)] += 1
    # both faceid view counts were drawn (min_views=2 .. max_views=3)
    assert seen[("faceid", 2, 48)] and seen[("faceid", 3, 32)], seen
    assert {s for s, _, _ in seen} == set(SUBSETS)


def test_the_batch_is_a_pure_function_of_seed_rank_and_index(shards_dir):
    a, b = _stream(shards_dir), _stream(shards_dir)
    for k in (0, 5, 11, 17):
        x, y = a.make_batch(k), b.make_batch(k)
        assert x["keys"] == y["keys"] and x["pixels"].shape == y["pixels"].shape
        assert x["pixels"].equal(y["pixels"])
    shapes = {
        r: [tuple(_stream(shards_dir, rank=r).make_batch(k)["pixels"].shape) for k in range(12)]
        for r in (0, 1)
    }
    assert shapes[0] != shapes[1]  # ranks draw their own view counts and subsets


def test_without_min_views_a_batch_has_its_first_samples_views(shards_dir):
    stream = _stream(shards_dir, paths={"faceid": shards_dir}, faceid_min_views=None)
    views = {stream.make_batch(k)["pixels"].shape[1] for k in range(6)}
    assert views == {S.FACE_VIEWS}


def test_random_mode_draws_from_the_familys_list(shards_dir):
    stream = _stream(shards_dir, paths={"t2i": shards_dir}, bucket_mode="random")
    sizes = {tuple(stream.make_batch(k)["pixels"].shape[-2:]) for k in range(24)}
    assert sizes == {(64, 64), (48, 80)}


def test_one_flat_list_still_weights_its_buckets():
    cfg = DataConfig.from_any(
        {
            "paths": "x",
            "buckets": [[32, 32], [64, 64]],
            "bucket_mode": "random",
            "bucket_weights": [1.0, 3.0],
        }
    )
    table = cfg.bucket_table()
    picks = Counter(table.pick("t2i", 1, (1, 1), u / 100) for u in range(100))
    assert picks == {(32, 32): 25, (64, 64): 75}
    aspect = DataConfig.from_any({"paths": "x", "buckets": [[32, 32], [64, 64]]}).bucket_table()
    assert aspect.pick("t2i", 1, (300, 200), 0.9) == nearest_bucket(
        [[32, 32], [64, 64]], 300, 200
    )


@pytest.mark.parametrize(
    "buckets, extra, message",
    [
        ({"txt2image": [[32, 32]]}, {}, "data.buckets.txt2image: unknown key; did you mean"),
        ({"text2image": [[32, 32]]}, {}, "data.buckets: none for i2i (family image2image)"),
        ({"default": [[32, 30]]}, {}, "data.buckets.default: [32, 30] must be [H, W], multiples"),
        ({"default": [[32, 32]], "t2i": {"2-": [[32, 32]]}}, {}, "data.buckets.t2i: view-count"),
        (
            {"default": [[32, 32]], "faceid": {"2": [[32, 32]], "4-": [[32, 32]]}},
            {},
            "data.buckets.faceid: no range holds 3 views",
        ),
        (
            {"default": [[32, 32]], "multiview_id": {"2-3": [[32, 32]], "3-": [[16, 16]]}},
            {},
            "data.buckets.multiview_id: view-count ranges overlap at 3 views",
        ),
        (
            {"default": [[32, 32]], "faceid": {"two": [[32, 32]]}},
            {},
            "data.buckets.faceid.two: view-count range 'two' must read like",
        ),
        ({"default": [[32, 32]]}, {"bucket_weights": [1.0]}, "data.bucket_weights: only with one"),
        ([[32, 32]], {"bucket_weights": [1.0, 2.0]}, "data.bucket_weights: needs one weight"),
        ([[32, 32]], {"faceid_min_views": 5}, "data.faceid_min_views: must be in [2, "),
    ],
)
def test_a_malformed_table_is_one_line_naming_the_key(buckets, extra, message):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_any({"paths": "x", "buckets": buckets, **extra})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_cli_refuses_a_bad_table_before_any_work():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.cli",
            "train",
            "fit",
            "--config",
            "training/configs/demo.yaml",
            "data.buckets={default: [[64, 64]], faceid: {'3-': [[64, 64]]}}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("onegen train fit: error: data.buckets.faceid: no range holds 2 views")
