"""``onegen datagen preview`` on tiny real depth / pose shards: 16-bit depth shown as
training sees it, pose renderings in their colours, and a red "random weights" banner on
the tiles a random-weight model made (``depth_model`` / ``pose_model`` = ``random-tiny``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datagen import preview
from tests.helpers import depth_pose_shards as S


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("preview") / "out")
    S.write(folder, "depth", [4])
    S.write(folder, "pose", [4])
    return folder


def _banner_pixels(img: Image.Image) -> int:
    arr = np.asarray(img.convert("RGB"))
    return int(np.all(arr == preview.BANNER_RGB, axis=-1).sum())


def _tiles(out: str, subset: str) -> dict[str, dict[str, Image.Image]]:
    return {
        key: dict(preview._tiles(files, 160)) for key, files in preview.load_samples(out, subset, 4)
    }


def test_depth_tiles_show_16bit_values_and_random_ones_carry_the_banner(out):
    tiles = _tiles(out, "depth")
    assert sorted(tiles) == [f"depth_{i:04d}" for i in range(4)]
    for key, by_field in tiles.items():
        i = int(key[-4:])
        assert list(by_field) == ["jpg", "depth.png"]  # the image first, then the map
        depth = np.asarray(by_field["depth.png"])
        assert depth.shape == (S.H, S.W, 3)  # small maps are not blown up
        assert _banner_pixels(by_field["jpg"]) == 0  # the photo is real in every sample
        expected = np.rint(S.depth_value(i) / 257.0).astype(np.uint8)  # 16 -> 8 bit, full range
        band = 12  # banner height on a 32-pixel tile
        if i % 2:  # depth_model = random-tiny
            assert _banner_pixels(by_field["depth.png"]) > 0.5 * band * S.W
            # white Hershey text on the red band, the map untouched below it
            assert (depth[:band, :, 1] > 100).sum() > 10
            assert np.array_equal(depth[band:, :, 0], expected[band:])
        else:
            assert _banner_pixels(by_field["depth.png"]) == 0
            assert np.array_equal(depth[:, :, 0], expected)
            assert depth[0, 0, 0] == 0 and depth[-1, -1, 0] == 255  # far black, near white
        gray = depth[band:]  # below any banner: a gray map, the same value in R, G and B
        assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_pose_tiles_keep_their_colours_and_random_ones_carry_the_banner(out):
    for key, by_field in _tiles(out, "pose").items():
        pose = np.asarray(by_field["pose.png"])
        x, y = S.POSE_JOINT
        assert tuple(pose[y, x]) == S.POSE_JOINT_RGB  # RGB as stored, not BGR-swapped
        assert tuple(pose[-1, 0]) == (0, 0, 0)  # black background
        random = int(key[-4:]) % 2 == 1
        assert (_banner_pixels(by_field["pose.png"]) > 0) is random, key
        assert _banner_pixels(by_field["jpg"]) == 0


def test_random_weight_fields_follows_the_model_keys():
    fields = ["jpg", "depth.png"]
    assert preview.random_weight_fields({"depth_model": "random-tiny"}, fields) == {"depth.png"}
    assert preview.random_weight_fields({"depth_model": "depth-anything"}, fields) == set()
    assert preview.random_weight_fields(
        {"pose_model": "yolo+random-tiny"}, ["jpg", "pose.png"]
    ) == {"pose.png"}
    # a model with no field of its own name (a captioner): the derived images, else the image
    assert preview.random_weight_fields({"caption_model": "random-tiny"}, fields) == {"depth.png"}
    assert preview.random_weight_fields({"caption_model": "random-tiny"}, ["jpg"]) == {"jpg"}
    assert preview.random_weight_fields({"caption": "random-tiny"}, fields) == set()


def test_contact_sheet_of_depth_and_pose_shards(out, tmp_path):
    sheet = preview.contact_sheet(out, tmp_path / "sheet.png", samples_per_subset=4, thumb=64)
    img = Image.open(sheet)
    rows = 8  # 4 depth + 4 pose samples
    assert img.size[1] > rows * 64
    # Four samples were made on random weights: four banners, each one map tile wide.
    banner = np.all(np.asarray(img.convert("RGB")) == preview.BANNER_RGB, axis=-1)
    assert banner.any()
    ys = np.flatnonzero(banner.any(axis=1))
    runs = 1 + int((np.diff(ys) > 1).sum())  # separate vertical stripes of banner rows
    assert runs == 4, ys
