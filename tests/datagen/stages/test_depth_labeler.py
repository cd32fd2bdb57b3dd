"""The depth labeler: exact 16-bit rendering, the stage on real photographs with the
tiny random model (mechanics only: its depth means nothing), the production loading
path from a save_pretrained folder, and batched == one-by-one."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from datagen import params as P
from datagen.images import encode_jpeg
from datagen.io import BadInput
from datagen.schema import make_meta, validate_sample
from datagen.stages.depth import DepthParams, DepthStage, render_depth
from datagen.stages.models.common import RANDOM_TINY
from datagen.stages.runner import run_stage


def _photos() -> dict[str, np.ndarray]:
    """Real photographs at small, different sizes (odd ones too)."""

    def resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)

    return {
        "astronaut": resize(skdata.astronaut(), 96, 96),
        "coffee": resize(skdata.coffee(), 150, 100),
        "chelsea": resize(skdata.chelsea(), 113, 75),
        "rocket": resize(skdata.rocket(), 121, 80),
    }


PHOTOS = _photos()
JPGS = {k: encode_jpeg(v) for k, v in PHOTOS.items()}


def _batch(names: list[str], extra: dict[str, bytes] | None = None) -> dict[str, list]:
    keys = [*names, *(extra or {})]
    jpgs = [JPGS[n] for n in names] + list((extra or {}).values())
    return {"key": keys, "jpg": jpgs}


def _decode16(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def _stage(weights: str, **kw) -> DepthStage:
    stage = DepthStage(DepthParams(weights=weights, device="cpu", **kw))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def tiny() -> DepthStage:
    return _stage(RANDOM_TINY)


# -- (a) rendering -----------------------------------------------------------------------


def test_render_ramp_exact_levels():
    disparity = np.array([[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]], np.float32)  # range 5
    image, lo, hi = render_depth(disparity)
    # (d - 2) / 5 * 65535, and 65535 / 5 = 13107 exactly
    expected = np.array([[0, 13107, 26214], [39321, 52428, 65535]], np.uint16)
    assert image.dtype == np.uint16 and image.shape == (2, 3)
    np.testing.assert_array_equal(image, expected)
    assert (lo, hi) == (2.0, 7.0)


def test_render_rounds_and_keeps_near_bright():
    disparity = np.array([[0.0, 1.0, 3.0]], np.float32)  # larger = nearer
    image, _, _ = render_depth(disparity)
    # 1/3 * 65535 = 21845 exactly; the nearest pixel is the brightest
    np.testing.assert_array_equal(image, [[0, 21845, 65535]])
    image, _, _ = render_depth(np.array([[0.0, 1.0, 2.0, 7.0]], np.float32))
    # 65535 / 7 = 9362.14 -> 9362; 2 * 9362.14 = 18724.29 -> 18724
    np.testing.assert_array_equal(image, [[0, 9362, 18724, 65535]])


@pytest.mark.parametrize("value", [0.0, 5.0, -1.0])
def test_render_flat_map_is_flat_depth(value):
    with pytest.raises(BadInput) as exc:
        render_depth(np.full((4, 5), value, np.float32))
    assert exc.value.error == "FlatDepth"
    # a range that is only noise relative to the values is flat too
    noisy = np.full((4, 5), 5.0, np.float32)
    noisy[0, 0] += 1e-4
    with pytest.raises(BadInput, match="FlatDepth"):
        render_depth(noisy)


def test_render_non_finite_is_an_error():
    disparity = np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)
    with pytest.raises(BadInput) as exc:
        render_depth(disparity)
    assert exc.value.error == "NonFiniteDepth"


def test_params_are_checked():
    with pytest.raises(P.ParamError, match="micro_batch"):
        DepthParams(micro_batch=0)
    with pytest.raises(P.ParamError, match="dtype"):
        P.build(DepthParams, {"dtype": "fp8"}, "stages.depth.params")


# -- (b) the stage on photographs, random-tiny ------------------------------------------------


def test_stage_labels_photos_at_their_size(tiny):
    names = list(PHOTOS)
    batch = _batch(names, {"garbage": b"\xff\xd8\xff not a jpeg at all"})
    out = run_stage(tiny, batch, name="depth", needs=())
    status = out["depth.status"]
    assert status == ["ok"] * len(names) + ["error"]
    assert out["depth.error"][-1] == "UndecodableJpg"
    assert out["depth_png"][-1] == b""
    for i, name in enumerate(names):
        image = PHOTOS[name]
        h, w = image.shape[:2]
        depth = _decode16(out["depth_png"][i])
        assert depth.dtype == np.uint16 and depth.shape == (h, w), name
        assert depth.min() == 0 and depth.max() == 65535, name
        meta = json.loads(out["depth.meta"][i])
        assert meta["depth_model"] == RANDOM_TINY
        assert meta["depth_min"] < meta["depth_max"]
        sample = {
            "__key__": name,
            "jpg": JPGS[name],
            "depth.png": out["depth_png"][i],
            "json": json.dumps(
                make_meta(
                    name,
                    "depth",
                    "test",
                    ["[[depth2image]]"],
                    caption="",
                    width=w,
                    height=h,
                    **meta,
                )
            ).encode(),
        }
        assert validate_sample("depth", sample)["depth_model"] == RANDOM_TINY


def test_stage_depth_follows_the_image(tiny):
    """Even random weights give a map shaped by the photo, not a constant pattern."""
    out = run_stage(tiny, _batch(["coffee", "chelsea"]), name="depth", needs=())
    a, b = (_decode16(p).astype(np.float64) for p in out["depth_png"])
    b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_LINEAR)
    assert np.abs(a - b).mean() > 1000


def test_stage_empty_and_missing_jpg(tiny):
    out = tiny({"key": ["a", "b"], "jpg": [b"", None]})
    assert [f.error for f in out["failure"]] == ["NoImage", "NoImage"]
    assert tiny({"key": [], "jpg": []}) == {"depth_png": [], "meta": [], "failure": []}


# -- (c) the production loading path --------------------------------------------------------


def test_loads_saved_folder_like_in_memory(tmp_path, tiny):
    from datagen.stages.models.tiny.depth import save_tiny

    folder = save_tiny(tmp_path / "depth-tiny")
    assert (folder / "model.safetensors").is_file()
    assert (folder / "preprocessor_config.json").is_file()
    loaded = _stage(str(folder))
    batch = _batch(["astronaut", "coffee"])
    got = run_stage(loaded, batch, name="depth", needs=())
    want = run_stage(tiny, batch, name="depth", needs=())
    assert got["depth.status"] == want["depth.status"] == ["ok", "ok"]
    for g, w in zip(got["depth_png"], want["depth_png"], strict=True):
        np.testing.assert_array_equal(_decode16(g), _decode16(w))
    for g, w in zip(got["depth.meta"], want["depth.meta"], strict=True):
        gm, wm = json.loads(g), json.loads(w)
        assert gm["depth_model"] == "depth-tiny"
        assert gm["depth_min"] == pytest.approx(wm["depth_min"], rel=1e-6)
        assert gm["depth_max"] == pytest.approx(wm["depth_max"], rel=1e-6)


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        _stage(str(missing))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _stage(str(empty))


# -- (d) batched == one by one --------------------------------------------------------------


def test_batched_equals_one_by_one(tiny):
    names = list(PHOTOS)
    sizes: list[int] = []
    hook = tiny.model.model.register_forward_hook(
        lambda _m, args, kwargs, _out: sizes.append(kwargs["pixel_values"].shape[0]),
        with_kwargs=True,
    )
    try:
        together = run_stage(tiny, _batch(names), name="depth", needs=())
    finally:
        hook.remove()
    assert max(sizes) >= 2, f"no forward pass held two images: {sizes}"
    together_maps = tiny.model.predict([PHOTOS[n] for n in names])
    for i, name in enumerate(names):
        alone = run_stage(tiny, _batch([name]), name="depth", needs=())
        alone_map = tiny.model.predict([PHOTOS[name]])[0]
        np.testing.assert_allclose(together_maps[i], alone_map, rtol=1e-5, atol=1e-6)
        a = _decode16(together["depth_png"][i]).astype(np.int64)
        b = _decode16(alone["depth_png"][0]).astype(np.int64)
        assert np.abs(a - b).max() <= 2, name
        ma, mb = json.loads(together["depth.meta"][i]), json.loads(alone["depth.meta"][0])
        assert ma["depth_min"] == pytest.approx(mb["depth_min"], rel=1e-5, abs=1e-7)
        assert ma["depth_max"] == pytest.approx(mb["depth_max"], rel=1e-5, abs=1e-7)
