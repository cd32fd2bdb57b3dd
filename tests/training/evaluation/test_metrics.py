"""The evaluation metrics against values worked out by hand on small arrays, and against
public implementations where one exists (torchmetrics' PSNR, SSIM and FID distance,
scikit-image's SSIM): the depth alignment must recover a known scale and shift exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluation import metrics as M


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- depth


def test_alignment_recovers_a_known_scale_and_shift_exactly():
    pred = _rng().uniform(0.1, 1.0, (6, 7))
    mask = _rng(1).uniform(size=pred.shape) > 0.3
    target = np.where(mask, 2.5 * pred - 0.3, 99.0)  # outside the mask: ignored
    s, t = M.align_scale_shift(pred, target, mask)
    assert s == pytest.approx(2.5, abs=1e-12) and t == pytest.approx(-0.3, abs=1e-12)
    assert M.align_scale_shift(
        np.full((2, 2), 3.0), np.arange(4.0).reshape(2, 2), np.ones((2, 2))
    ) == (
        0.0,
        1.5,
    )
    with pytest.raises(ValueError, match="no valid pixel"):
        M.align_scale_shift(pred, target, np.zeros_like(mask))


def test_a_disparity_prediction_affine_in_inverse_depth_scores_perfectly():
    gt = _rng(2).uniform(0.5, 9.0, (480, 640))
    pred = 0.37 / gt + 0.05  # what a perfect relative inverse-depth model outputs, any affine
    valid = M.depth_valid_mask(gt, 1e-3, 10.0, M.eigen_crop_mask())
    depth = M.depth_from_disparity(pred, gt, valid, 1e-3, 10.0)
    np.testing.assert_allclose(depth[valid], gt[valid], rtol=1e-10)
    assert M.abs_rel(depth, gt, valid) < 1e-10 and M.delta1(depth, gt, valid) == 1.0
    # depth-space (Marigold) models align in depth instead
    aligned = M.depth_from_affine_depth(3.0 * gt - 1.0, gt, valid, 1e-3, 10.0)
    np.testing.assert_allclose(aligned[valid], gt[valid], rtol=1e-10)


def test_the_disparity_is_clamped_to_the_benchmark_range_before_inverting():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    pred = 1.0 / gt
    pred[1, 1] = -5.0  # an outlier the fit cannot follow: its disparity would go negative
    valid = np.array([[True, True], [True, False]])
    depth = M.depth_from_disparity(pred, gt, valid, 0.5, 10.0)
    np.testing.assert_allclose(depth[valid], gt[valid], rtol=1e-12)
    assert depth[1, 1] == pytest.approx(10.0)  # clamped at 1 / max_depth, then inverted


def test_abs_rel_and_delta1_by_hand():
    p, g = np.array([1.0, 2.0, 4.0, 9.0]), np.array([1.0, 1.0, 2.0, 1.0])
    valid = np.array([True, True, True, False])
    assert M.abs_rel(p, g, valid) == pytest.approx((0 + 1 + 1) / 3)
    assert M.delta1(p, g, valid) == pytest.approx(1 / 3)  # ratios 1, 2, 2
    p2 = np.array([1.2, 0.81, 1.0, 1.0])  # ratios 1.2, 1.2346, 1: all under 1.25
    assert M.delta1(p2, np.ones(4), np.ones(4, bool)) == 1.0
    assert M.depth_metrics(p, g, valid) == {
        "abs_rel": pytest.approx(2 / 3),
        "delta1": pytest.approx(1 / 3),
    }


def test_eigen_crop_and_valid_range():
    mask = M.eigen_crop_mask()
    assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41]
    assert not mask[470, 601] and mask[470, 600]
    with pytest.raises(ValueError, match="480 x 640"):
        M.eigen_crop_mask(240, 320)
    gt = np.array([0.0, 1e-3, 0.5, 10.0, np.nan, 3.0])
    assert M.depth_valid_mask(gt, 1e-3, 10.0).tolist() == [False, False, True, False, False, True]


# --------------------------------------------------------------------------- images


def test_psnr_by_hand_and_against_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a = np.zeros((8, 8, 3))
    assert M.psnr(a + 0.1, a) == pytest.approx(20.0)  # MSE 0.01
    x, y = _rng(3).uniform(size=(4, 16, 16, 3)), _rng(4).uniform(size=(4, 16, 16, 3))
    ref = peak_signal_noise_ratio(
        torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(y).permute(0, 3, 1, 2), data_range=1.0,
        reduction="elementwise_mean", dim=(1, 2, 3),
    )  # fmt: skip
    assert M.psnr(x, y) == pytest.approx(float(ref), rel=1e-6)  # torchmetrics sums in float32
    assert M.psnr(x * 255, y * 255, data_range=255.0) == pytest.approx(M.psnr(x, y), rel=1e-12)


def test_ssim_against_torchmetrics_and_scikit_image():
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = _rng(5).uniform(size=(2, 32, 40, 3))
    y = np.clip(x + _rng(6).normal(0, 0.1, x.shape), 0, 1)
    ours = M.ssim(x, y)
    # torchmetrics averages its map over reflection-padded borders too: its map cropped to
    # the windows inside the image is scikit-image's (and our) SSIM
    _, full = structural_similarity_index_measure(
        torch.tensor(y).permute(0, 3, 1, 2), torch.tensor(x).permute(0, 3, 1, 2), data_range=1.0,
        return_full_image=True,
    )  # fmt: skip
    assert ours == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)
    sk = np.mean([
        structural_similarity(y[i], x[i], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for i in range(2)
    ])  # fmt: skip
    assert ours == pytest.approx(sk, abs=1e-9)
    assert M.ssim(x, x) == pytest.approx(1.0) and 0 < ours < 1


# --------------------------------------------------------------------------- maps


def test_palette_labels_take_the_nearest_colour():
    pal = M.palette_rgb_array()
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (255, 0, 0) and len(pal) == 21
    img = np.array([[[250, 10, 5], [3, 2, 1]], [[10, 240, 20], [20, 20, 250]]], np.uint8)
    assert M.palette_labels(img).tolist() == [[1, 0], [2, 3]]  # red, black, lime, blue


def test_mean_iou_by_hand():
    p = np.array([[0, 1], [1, 1]])
    g = np.array([[0, 1], [0, 1]])
    assert M.mean_iou(p, g) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert M.mean_iou(g, g) == 1.0
    assert M.mean_iou(np.array([[2, 2]]), np.array([[0, 0]])) == 0.0  # each class in one map only


def test_semantic_map_miou_reads_generated_colours_by_palette():
    label = np.zeros((8, 8, 3), np.uint8)
    label[:4] = (255, 0, 0)
    gen = label.astype(np.int16) + _rng(7).integers(-30, 30, label.shape)  # colour noise
    gen = np.clip(gen, 0, 255).astype(np.uint8)
    assert M.semantic_map_miou(gen, label) == 1.0
    gen[:2] = 0  # half the red region is lost
    assert M.semantic_map_miou(gen, label) == pytest.approx((16 / 32 + 32 / 48) / 2)


def test_box_map_iou_on_rendered_box_maps():
    from datagen.stages.segment_render import Entity, render_boxes

    def boxes(*xyxy) -> np.ndarray:
        e = [
            Entity("dog", 2, np.array([b], float), np.ones(1), np.zeros((64, 64), bool))
            for b in xyxy
        ]
        return render_boxes(e, 64, 64)

    label = boxes((10, 10, 40, 30))
    assert M.box_map_iou(label, label) == 1.0
    shifted = boxes((14, 10, 44, 30))  # 4 px right: the same w x h box, overlap w - 4
    y, x = np.nonzero(M.palette_labels(label) == 3)
    w, h = x.max() + 1 - x.min(), y.max() + 1 - y.min()
    assert M.box_map_iou(shifted, label) == pytest.approx((w - 4) * h / ((w + 4) * h))
    assert M.box_map_iou(np.zeros_like(label), label) == 0.0
    assert np.isnan(M.box_map_iou(label, np.zeros_like(label)))


def test_box_iou_by_hand():
    from common.boxes import box_iou

    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3))[0, 0] == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3))[0, 0] == 0.0


# --------------------------------------------------------------------------- edges


def test_edge_f1_by_hand():
    gt = np.zeros((10, 10), np.uint8)
    gt[5, 1:9] = 255
    near = np.roll(gt, 1, axis=0)  # one pixel off: within the 2-pixel tolerance
    assert M.edge_f1(near, gt)["f1"] == 1.0
    assert M.edge_f1(near, gt, tolerance=0)["f1"] == 0.0
    half = gt.copy()
    half[5, 5:] = 0  # 4 of the 8 edge pixels, plus 4 spurious far away
    half[0, 0:4] = 255
    r = M.edge_f1(half, gt, tolerance=0)
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5
    assert M.edge_f1(np.zeros_like(gt), np.zeros_like(gt))["f1"] == 1.0
    assert M.edge_f1(np.zeros_like(gt), gt)["f1"] == 0.0


def test_canny_of_an_image_against_its_own_canny_map_is_perfect():
    from common.edges import canny

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 200
    edges = canny(img)
    assert edges.any() and M.edge_f1(canny(img), edges, tolerance=0)["f1"] == 1.0


# --------------------------------------------------------------------------- embeddings


def test_clip_score_and_cosine_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = np.array([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(M.cosine_similarity(img, txt), [1.0, -1.0, 1 / np.sqrt(2)])
    assert M.clip_score(img, txt) == pytest.approx((100 + 0 + 100 / np.sqrt(2)) / 3)


def test_frechet_distance_by_hand_and_against_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    # |mu1 - mu2|^2 = 5; Tr = 5 + 5 - 2 (sqrt(4) + sqrt(4)) = 2
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0)
    a, b = _rng(8).normal(size=(200, 6)), _rng(9).normal(0.3, 1.5, size=(150, 6))
    ref = _compute_fid(*(torch.tensor(v) for v in (*M.feature_stats(a), *M.feature_stats(b))))
    assert M.fid(a, b) == pytest.approx(float(ref), rel=1e-8)
    assert abs(M.fid(a, a)) < 1e-8
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_stats(a[:1])
