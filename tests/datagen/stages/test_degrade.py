"""datagen.stages.degrade_ops: determinism, edge maps, masks, downscale and blur."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from common.edges import canny
from datagen.stages.degrade import DegradeStage
from datagen.stages.degrade_ops import (
    FILL_VALUES,
    box_mask,
    brush_mask,
    degrade_all,
    downscale,
    gaussian_blur,
    inpainting_pair,
    motion_blur,
    random_blur,
    rng_for,
    soft_edges,
)
from datagen.stages.protocol import column_for

H, W = 96, 128


def _scene(seed: int = 0) -> np.ndarray:
    """A gradient, a bright square and mild noise: edges, texture and flat parts."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 255 / W, y * 255 / H, np.full((H, W), 90.0)], axis=-1)
    base[30:70, 40:90] = (240, 230, 20)
    base += rng.normal(0, 4, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _square(side: int = 128, lo: int = 32, hi: int = 96) -> np.ndarray:
    img = np.zeros((side, side, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def _hf_energy(image: np.ndarray) -> float:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float(np.mean(cv2.Laplacian(gray, cv2.CV_64F) ** 2))


# --- determinism -------------------------------------------------------------------------


def test_rng_for_depends_on_key_seed_and_purpose():
    draw = lambda *a: rng_for(*a).integers(0, 2**62, 4).tolist()  # noqa: E731
    assert draw("k", 0, "blur") == draw("k", 0, "blur")
    assert draw("k", 0, "blur") != draw("k2", 0, "blur")
    assert draw("k", 0, "blur") != draw("k", 1, "blur")
    assert draw("k", 0, "blur") != draw("k", 0, "inpaint")


def test_degrade_all_is_byte_identical_for_the_same_key_and_seed():
    image = _scene()
    before = image.copy()
    maps1, params1 = degrade_all(image, "sample_001", seed=7)
    maps2, params2 = degrade_all(image.copy(), "sample_001", seed=7)
    assert np.array_equal(image, before), "degrade_all must not modify its input"
    assert set(maps1) == {"canny", "hed", "blur", "lowres", "masked", "mask"}
    assert set(maps1) == set(maps2)
    for name in maps1:
        assert maps1[name].dtype == np.uint8
        assert maps1[name].shape == maps2[name].shape
        assert maps1[name].tobytes() == maps2[name].tobytes(), name
    assert params1 == params2
    assert params1["seed"] == 7


def test_degrade_op_output_bytes_are_identical_across_instances():
    row = {"key": "sample_001", "image": _scene()}
    out1 = DegradeStage(seed=3).label(dict(row))
    out2 = DegradeStage(seed=3).label(dict(row))
    assert set(out1) == {column_for(f) for f in DegradeStage.fields()} | {"meta"}
    for column in sorted(column_for(f) for f in DegradeStage.fields()):
        assert isinstance(out1[column], bytes) and out1[column]
        assert out1[column] == out2[column], column
    assert out1["meta"] == out2["meta"]


def test_different_keys_and_seeds_give_different_masks():
    image = _scene()
    masks = {
        (key, seed): degrade_all(image, key, seed)[0]["mask"]
        for key, seed in (("a", 0), ("b", 0), ("c", 0), ("a", 1))
    }
    items = list(masks.items())
    for i, (id_i, m_i) in enumerate(items):
        for id_j, m_j in items[i + 1 :]:
            assert not np.array_equal(m_i, m_j), (id_i, id_j)


# --- edge maps ---------------------------------------------------------------------------


def test_canny_finds_the_edges_of_a_square():
    edges = canny(_square())
    assert edges.shape == (128, 128) and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    ys, xs = np.nonzero(edges)
    # every edge pixel lies on the square's outline (boundary between 31/32 and 95/96)
    near_row = (np.abs(ys - 31.5) <= 2) | (np.abs(ys - 95.5) <= 2)
    near_col = (np.abs(xs - 31.5) <= 2) | (np.abs(xs - 95.5) <= 2)
    inside_span = lambda v: (v >= 29) & (v <= 98)  # noqa: E731
    assert np.all((near_row & inside_span(xs)) | (near_col & inside_span(ys)))
    # and all four sides are found along their whole length
    for cols in (edges[:, 30:34], edges[:, 94:98]):
        assert np.all(cols[34:94].max(axis=1) == 255)
    for rows in (edges[30:34, :], edges[94:98, :]):
        assert np.all(rows[:, 34:94].max(axis=0) == 255)
    assert edges[40:88, 40:88].max() == 0
    assert edges[:24].max() == 0 and edges[104:].max() == 0


def test_canny_flat_image_has_no_edges():
    for value in (0, 77, 255):
        assert canny(np.full((80, 80, 3), value, np.uint8)).max() == 0


def test_canny_thresholds_matter():
    # a weak step (30 levels) passes low thresholds but not the default ones
    img = np.full((80, 80, 3), 100, np.uint8)
    img[:, 40:] = 130
    assert canny(img).max() == 0
    assert canny(img, 10, 20).max() == 255


def test_soft_edges_brighter_on_boundary_than_in_flat_regions():
    img = _square()
    soft = soft_edges(img)
    assert soft.shape == (128, 128) and soft.dtype == np.uint8
    boundary = np.concatenate([soft[40:88, 31], soft[40:88, 32], soft[31, 40:88], soft[95, 40:88]])
    flat_inside = soft[50:78, 50:78]
    flat_outside = soft[:8, :8]
    assert boundary.min() > 200
    assert flat_inside.max() < 10
    assert flat_outside.max() < 10
    assert boundary.mean() > 20 * (flat_inside.mean() + 1)


def test_soft_edges_flat_image_is_black():
    assert soft_edges(np.full((64, 64, 3), 120, np.uint8)).max() == 0


def test_soft_edges_small_object_on_large_flat_background():
    # Edges on well under 0.5% of the pixels must still show (a logo, a product shot).
    img = np.full((1024, 1024, 3), 40, np.uint8)
    img[512:528, 512:528] = 220
    soft = soft_edges(img)
    assert soft[520, 512] > 200 and soft[512, 520] > 200
    assert soft[:400, :400].max() == 0
    assert canny(img)[505:535, 505:535].max() == 255


# --- inpainting --------------------------------------------------------------------------


def test_inpainting_fill_matches_the_mask():
    image = _scene()
    seen_kinds, seen_fills = set(), set()
    for i in range(24):
        masked, mask, params = inpainting_pair(image, rng_for(f"k{i}", 0, "inpaint"))
        assert mask.shape == (H, W) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        hole = mask > 0
        assert hole.any() and not hole.all()
        fill = FILL_VALUES[params["fill"]]
        assert fill in (0, 128)
        assert np.all(masked[hole] == fill)
        assert np.array_equal(masked[~hole], image[~hole])
        assert params["coverage"] == round(float(hole.mean()), 4)
        seen_kinds.add(params["kind"])
        seen_fills.add(params["fill"])
    assert seen_kinds == {"boxes", "brush"}
    assert seen_fills == {"black", "gray"}


def test_degrade_all_masked_image_matches_its_mask():
    image = _scene()
    maps, params = degrade_all(image, "k", 0)
    hole = maps["mask"] > 0
    fill = FILL_VALUES[params["inpaint"]["fill"]]
    assert np.all(maps["masked"][hole] == fill)
    assert np.array_equal(maps["masked"][~hole], image[~hole])
    assert params["inpaint"]["coverage"] == round(float(hole.mean()), 4)


@pytest.mark.parametrize("make", [box_mask, brush_mask])
def test_masks_are_binary_and_nonempty(make):
    for i in range(10):
        mask = make(H, W, np.random.default_rng(i))
        assert mask.shape == (H, W)
        assert set(np.unique(mask).tolist()) == {0, 255}


# --- downscale ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "shape"), [(1, (150, 200)), (2, (75, 100)), (3, (50, 67)), (4, (38, 50))]
)
def test_downscale_sizes(factor, shape):
    image = np.zeros((150, 200, 3), np.uint8)
    small = downscale(image, factor)
    assert small.shape == (*shape, 3)
    assert small.dtype == np.uint8


def test_downscale_averages_area():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 1::2] = 200  # columns alternate 0/200
    small = downscale(image, 2)
    assert small.shape == (32, 32, 3)
    assert np.all(small == 100)


def test_degrade_all_lowres_uses_the_recorded_factor():
    image = _scene()
    factors = set()
    for key in ("a", "b", "c", "d", "e", "f", "g", "h"):
        maps, params = degrade_all(image, key, 0, downscale_factors=(2, 4))
        factor = params["downscale"]["factor"]
        factors.add(factor)
        assert factor in (2, 4)
        assert maps["lowres"].shape == (round(H / factor), round(W / factor), 3)
    assert factors == {2, 4}


# --- blur --------------------------------------------------------------------------------


def test_gaussian_blur_reduces_high_frequency_energy():
    image = _noise()
    before = _hf_energy(image)
    soft = _hf_energy(gaussian_blur(image, 1.5))
    softer = _hf_energy(gaussian_blur(image, 4.0))
    assert soft < 0.2 * before
    assert softer < soft


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0, 133.0])
def test_motion_blur_reduces_high_frequency_energy(angle):
    image = _noise()
    blurred = motion_blur(image, 15, angle)
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert _hf_energy(blurred) < 0.2 * _hf_energy(image)
    # the scene's square keeps its edges across the streak, yet loses energy
    scene = _scene()
    assert _hf_energy(motion_blur(scene, 15, angle)) < 0.5 * _hf_energy(scene)


@pytest.mark.parametrize(("length", "angle"), [(7, 0.0), (15, 33.0), (21, 90.0), (9, 137.5)])
def test_motion_blur_is_opencvs_blur_computed_without_its_cpu_dependent_paths(length, angle):
    """The numpy blur is the one OpenCV's warpAffine + filter2D gave before (filter2D switches
    to a DFT for large kernels, whose float results change with the CPU's SIMD level)."""
    import cv2

    from datagen.stages.degrade_ops import motion_kernel

    line = np.zeros((length, length), np.float32)
    line[length // 2, :] = 1.0
    centre = ((length - 1) / 2.0, (length - 1) / 2.0)
    turned = cv2.warpAffine(line, cv2.getRotationMatrix2D(centre, angle, 1.0), (length, length))
    kernel = turned / turned.sum()
    assert np.abs(motion_kernel(length, angle) - kernel).max() < 1e-6
    image = _noise()
    opencv = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)
    assert np.abs(motion_blur(image, length, angle).astype(int) - opencv.astype(int)).max() <= 1


def test_motion_blur_is_directional_and_keeps_brightness():
    stripes = np.zeros((64, 96, 3), np.uint8)
    stripes[:, ::2] = 255  # varies along x only
    along_x = motion_blur(stripes, 9, 0.0)
    along_y = motion_blur(stripes, 9, 90.0)
    assert along_x.std() < 0.2 * stripes.std()  # a horizontal streak averages the stripes away
    assert np.array_equal(along_y, stripes)  # a vertical streak leaves them untouched
    flat = np.full((64, 64, 3), 173, np.uint8)
    for angle in (0.0, 30.0, 90.0):
        assert np.abs(motion_blur(flat, 11, angle).astype(int) - 173).max() <= 1


def test_random_blur_params_describe_the_blur():
    image = _noise(1)
    kinds = set()
    for i in range(16):
        blurred, params = random_blur(image, rng_for(f"k{i}", 0, "blur"))
        kinds.add(params["kind"])
        if params["kind"] == "gaussian":
            assert 1.5 <= params["sigma"] <= 4.0
            again = gaussian_blur(image, params["sigma"])
        else:
            assert params["length"] % 2 == 1 and 7 <= params["length"] <= 21
            assert 0.0 <= params["angle"] <= 180.0
            again = motion_blur(image, params["length"], params["angle"])
        # the recorded (rounded) parameters reproduce the blur to within a level
        assert np.abs(again.astype(int) - blurred.astype(int)).max() <= 1
        assert _hf_energy(blurred) < 0.2 * _hf_energy(image)
    assert kinds == {"gaussian", "motion"}
