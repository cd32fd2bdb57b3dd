"""The paper's evaluation metrics as plain array functions (numpy; torch where a convolution
helps), each following the published protocol its docstring names, so a checkpoint's figures
compare with the paper's tables and with other runs.

Everything here is model-free: scores that need a network (CLIP, FID's features, face
embeddings, LPIPS) take the embeddings or features that ``training.evaluation.scorers``
computes from local weights. The camera metrics (RayDiffusion's relative-rotation and
camera-centre accuracies) live in ``datagen.cameras``, beside the camera conventions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.boxes import box_iou
from datagen.schema import PALETTE, palette_rgb

DELTA1 = 1.25
# NYUv2's Eigen crop (Eigen et al. 2014) on the 480 x 640 frame, as Marigold and
# DepthAnything evaluate: rows 45..470, columns 41..600.
EIGEN_CROP = (45, 471, 41, 601)  # y0, y1, x0, x1 (exclusive ends)
BACKGROUND_RGB = (0, 0, 0)  # semantic and box maps: black where no entity is


def _float(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes {a.shape} and {b.shape} differ")


# --------------------------------------------------------------------------- depth


def eigen_crop_mask(height: int = 480, width: int = 640) -> np.ndarray:
    """bool ``[H, W]``: True inside NYUv2's Eigen crop. Only defined on the 480 x 640 frame."""
    if (height, width) != (480, 640):
        raise ValueError(f"the Eigen crop is defined on 480 x 640 frames, not {height} x {width}")
    mask = np.zeros((height, width), bool)
    y0, y1, x0, x1 = EIGEN_CROP
    mask[y0:y1, x0:x1] = True
    return mask


def align_scale_shift(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray
) -> tuple[float, float]:
    """Least-squares ``(s, t)`` minimising ``sum_mask (s * pred + t - target)^2``: the
    affine-invariant alignment of MiDaS (Ranftl et al. 2020), DepthAnything and Marigold.
    A constant prediction gets ``s = 0`` and ``t`` the target's mean."""
    p, g = _float(pred, "pred"), _float(target, "target")
    _same_shape(p, g, "pred, target")
    m = np.asarray(mask, bool)
    _same_shape(p, m, "pred, mask")
    if not m.any():
        raise ValueError("align_scale_shift: no valid pixel")
    x, y = p[m], g[m]
    xc = x - x.mean()
    var = float((xc * xc).sum())
    if var <= 1e-300:
        return 0.0, float(y.mean())
    s = float((xc * (y - y.mean())).sum() / var)
    return s, float(y.mean() - s * x.mean())


def depth_from_disparity(
    pred_disparity: np.ndarray,
    gt_depth: np.ndarray,
    valid: np.ndarray,
    min_depth: float,
    max_depth: float,
) -> np.ndarray:
    """Metric depth of a relative inverse-depth prediction (our depth maps, DepthAnything's
    output): aligned by scale and shift to ``1 / gt`` over ``valid``, clamped to the
    benchmark's disparity range ``[1 / max_depth, 1 / min_depth]`` and inverted (the
    MiDaS / DepthAnything protocol for disparity-space models)."""
    if not 0 < min_depth < max_depth:
        raise ValueError(
            f"depth range: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}"
        )
    g = _float(gt_depth, "gt_depth")
    m = np.asarray(valid, bool) & np.isfinite(g) & (g > 0)
    target = np.where(m, 1.0 / np.where(m, g, 1.0), 0.0)
    s, t = align_scale_shift(pred_disparity, target, m)
    disparity = np.clip(s * _float(pred_disparity, "pred") + t, 1.0 / max_depth, 1.0 / min_depth)
    return 1.0 / disparity


def depth_from_affine_depth(
    pred_depth: np.ndarray,
    gt_depth: np.ndarray,
    valid: np.ndarray,
    min_depth: float,
    max_depth: float,
) -> np.ndarray:
    """Metric depth of an affine-invariant depth prediction (Marigold's protocol): aligned
    by scale and shift to ``gt`` over ``valid``, clipped to ``[min_depth, max_depth]``."""
    if not 0 < min_depth < max_depth:
        raise ValueError(
            f"depth range: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}"
        )
    g = _float(gt_depth, "gt_depth")
    m = np.asarray(valid, bool) & np.isfinite(g)
    s, t = align_scale_shift(pred_depth, np.where(m, g, 0.0), m)
    return np.clip(s * _float(pred_depth, "pred") + t, min_depth, max_depth)


def depth_valid_mask(
    gt_depth: np.ndarray, min_depth: float, max_depth: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Pixels a benchmark scores: finite GT strictly inside ``(min_depth, max_depth)``,
    and inside ``mask`` (NYUv2's Eigen crop, DIODE's ``*_depth_mask.npy``) when given."""
    g = _float(gt_depth, "gt_depth")
    valid = np.isfinite(g) & (g > min_depth) & (g < max_depth)
    if mask is not None:
        m = np.asarray(mask, bool)
        _same_shape(g, m, "gt_depth, mask")
        valid &= m
    return valid


def abs_rel(pred_depth: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray) -> float:
    """Mean absolute relative error ``|p - g| / g`` over the valid pixels (Eigen et al.)."""
    p, g, m = _depth_inputs(pred_depth, gt_depth, valid)
    return float(np.mean(np.abs(p[m] - g[m]) / g[m]))


def delta1(pred_depth: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of valid pixels with ``max(p / g, g / p) < 1.25`` (Eigen et al.)."""
    p, g, m = _depth_inputs(pred_depth, gt_depth, valid)
    ratio = np.maximum(p[m] / g[m], g[m] / p[m])
    return float(np.mean(ratio < DELTA1))


def _depth_inputs(pred, gt, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, g = _float(pred, "pred_depth"), _float(gt, "gt_depth")
    _same_shape(p, g, "pred_depth, gt_depth")
    m = np.asarray(valid, bool) & (g > 0) & (p > 0)
    if not m.any():
        raise ValueError("depth metrics: no valid pixel")
    return p, g, m


def depth_metrics(
    pred_depth: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray
) -> dict[str, float]:
    return {
        "abs_rel": abs_rel(pred_depth, gt_depth, valid),
        "delta1": delta1(pred_depth, gt_depth, valid),
    }


# --------------------------------------------------------------------------- images


def _images(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[N, C, H, W]`` from ``[H, W]``, ``[H, W, C]`` (channels-last, as images are
    stored) or ``[N, H, W, C]``."""
    x, y = torch.as_tensor(np.asarray(a, np.float64)), torch.as_tensor(np.asarray(b, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"images: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    if x.ndim == 2:
        x, y = x[None, None], y[None, None]
    elif x.ndim == 3:
        x, y = x.permute(2, 0, 1)[None], y.permute(2, 0, 1)[None]
    elif x.ndim == 4:
        x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images: [H, W], [H, W, C] or [N, H, W, C]; got {tuple(x.shape)}")
    return x, y


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, per image, averaged
    over a batch (the NVS papers' convention: Zero123, EscherNet). Identical images: inf."""
    x, y = _images(pred, target)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse.numpy())
    return float(values.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (Wang et al. 2004): an 11-tap Gaussian window of sigma 1.5,
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, per channel over the window positions that fit
    inside the image, averaged (torchmetrics' and scikit-image's Gaussian SSIM)."""
    x, y = _images(pred, target)
    if min(x.shape[-2:]) < kernel_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the window")
    c = x.shape[1]
    g = _gaussian_window(kernel_size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, kernel_size, kernel_size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
    return float((num / den).flatten(1).mean(1).mean())


# --------------------------------------------------------------------------- maps


def palette_rgb_array(with_background: bool = True) -> np.ndarray:
    """``[K, 3]`` uint8: black (class 0, no entity) then the released palette in its order."""
    colours = [palette_rgb(i) for i in range(len(PALETTE))]
    return np.array(([BACKGROUND_RGB] if with_background else []) + colours, np.uint8)


def palette_labels(image: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """int ``[H, W]``: each pixel's nearest palette entry (squared RGB distance), the
    class of a generated map whose colours are only roughly the palette's."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"palette_labels: an RGB [H, W, 3] image; got {img.shape}")
    pal = palette_rgb_array() if palette is None else np.asarray(palette)
    d = ((img[..., None, :].astype(np.int64) - pal[None, None].astype(np.int64)) ** 2).sum(-1)
    return d.argmin(-1)


def mean_iou(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Mean over classes of ``|P ∩ G| / |P ∪ G|``, over the classes in either map (a class
    only one map has scores 0), background included: the per-image mIoU of semantic
    segmentation (Everingham et al., PASCAL VOC)."""
    p, g = np.asarray(pred_labels), np.asarray(gt_labels)
    _same_shape(p, g, "pred_labels, gt_labels")
    classes = np.union1d(np.unique(p), np.unique(g))
    ious = [
        np.logical_and(p == c, g == c).sum() / np.logical_or(p == c, g == c).sum() for c in classes
    ]
    return float(np.mean(ious))


def semantic_map_miou(generated: np.ndarray, label: np.ndarray) -> float:
    """mIoU of a generated semantic map against the label map, both read by palette colour."""
    return mean_iou(palette_labels(generated), palette_labels(label))


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_map_iou(generated: np.ndarray, label: np.ndarray) -> float:
    """Mean, over the label's entity colours, of the IoU of the box around that colour's
    pixels in the generated box map and in the label (0 where the generation lacks the
    colour): a box map's outlines read back as one box per entity colour. NaN for a label
    with no box."""
    gen, lab = palette_labels(generated), palette_labels(label)
    scores = []
    for c in np.unique(lab):
        if c == 0:
            continue
        want, got = _box_of(lab == c), _box_of(gen == c)
        scores.append(0.0 if got is None else float(box_iou(got, want)[0, 0]))
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------- edges


def edge_f1(pred_edges: np.ndarray, gt_edges: np.ndarray, tolerance: int = 2) -> dict[str, float]:
    """Precision, recall and F1 of binary edge maps with a ``tolerance``-pixel match
    (an edge pixel counts when the other map has one within a (2 t + 1)-square), a simple
    form of the BSDS boundary benchmark (Martin et al. 2004) without one-to-one matching.
    The controllability check of canny-to-image: canny of the generation vs the condition.
    Both maps empty: all 1; one empty: 0."""
    p, g = np.asarray(pred_edges) > 0, np.asarray(gt_edges) > 0
    _same_shape(p, g, "pred_edges, gt_edges")
    if not p.any() and not g.any():
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if not p.any() or not g.any():
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    k = 2 * tolerance + 1

    def grow(m: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(m, dtype=torch.float32)[None, None]
        return (F.max_pool2d(t, k, stride=1, padding=tolerance)[0, 0] > 0).numpy()

    precision = float((p & grow(g)).sum() / p.sum())
    recall = float((g & grow(p)).sum() / g.sum())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- embeddings


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``[N, D]`` embeddings: the ID similarity of face embeddings
    (ArcFace features, as PhotoMaker / InstantID report it)."""
    x, y = _float(a, "a"), _float(b, "b")
    _same_shape(x, y, "a, b")
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return (x * y).sum(-1)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """CLIP score (Hessel et al. 2021, with torchmetrics' scale 100 for w = 2.5):
    ``100 * max(cos(image, text), 0)`` per pair, averaged. torchmetrics' ``CLIPScore`` clamps
    the mean instead of each pair: the two agree on every single pair and whenever no
    cosine is negative (a trained CLIP's usual case)."""
    return float(np.mean(100.0 * np.maximum(cosine_similarity(image_embeds, text_embeds), 0.0)))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, N >= 2."""
    f = _float(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: [N >= 2, D]; got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)`` (Heusel et al. 2017), FID's distance.
    The trace of the square root comes from the eigenvalues of ``S1 S2`` (real and >= 0 up
    to round-off for covariances); a near-singular product gets ``eps`` on the diagonals
    first, as pytorch-fid does."""
    m1, m2 = _float(mu1, "mu1"), _float(mu2, "mu2")
    s1, s2 = np.atleast_2d(_float(sigma1, "sigma1")), np.atleast_2d(_float(sigma2, "sigma2"))
    _same_shape(m1, m2, "mu1, mu2")
    _same_shape(s1, s2, "sigma1, sigma2")
    eig = np.linalg.eigvals(s1 @ s2)
    if not np.isfinite(eig).all() or (eig.real < -1e-6 * max(1.0, abs(eig).max())).any():
        off = np.eye(len(s1)) * eps
        eig = np.linalg.eigvals((s1 + off) @ (s2 + off))
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between two sets of image features (Inception pool features
    for FID proper; CLIP image features for CLIP-FID, Kynkäänniemi et al. 2023)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
