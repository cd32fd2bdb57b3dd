"""Which metric scores which task: a generated sample against its held-out ground truth.

Each scorer takes the generated views and the sample's own views (float ``[V, H, W, 3]`` in
[0, 1], the target first for a pair task) and returns ``{metric: value}``; the first metric
is the task's headline (the progress line shows it). The task-to-metric choice follows the
paper's tables where a task has one (depth: AbsRel / delta1; cameras: RayDiffusion's
accuracies; novel views: PSNR / SSIM) and is a model-free controllability check otherwise
(a canny map of the generation against its condition, a generated map read back by the
palette).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from common.edges import canny
from datagen.cameras import pose_metrics
from training.evaluation import metrics as M
from training.evaluation.scored import PAIR_TASKS

# Our depth labels are relative inverse depth scaled to [0, 1] (datagen.stages.depth): no
# metric depth. They are scored by the benchmarks' protocol with the label as the disparity
# of a pseudo depth 1 / d in [1, 1 / DISPARITY_FLOOR]; pixels below the floor are not scored.
DISPARITY_FLOOR = 0.02
PSNR_CAP = 100.0
# An edge map resized to the bucket turns its 1-pixel lines gray: an edge is a pixel above this.
EDGE_LEVEL = 0.25

Scorer = Callable[..., dict[str, float]]


def _gray(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).mean(-1)


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def capped_psnr(gen: np.ndarray, truth: np.ndarray) -> float:
    """PSNR, at most ``PSNR_CAP`` dB: identical views (inf) keep a mean finite and loggable."""
    return min(M.psnr(gen, truth), PSNR_CAP)


def image_fidelity(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The generated target view against the true one."""
    return {"psnr": capped_psnr(gen[0], truth[0]), "ssim": M.ssim(gen[0], truth[0])}


def canny_control(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """canny2image: the canny map of the generated image against the condition's edges,
    then the image's fidelity."""
    f1 = M.edge_f1(canny(_uint8(gen[0])), _gray(truth[1]) > EDGE_LEVEL)["f1"]
    return {"edge_f1": f1, **image_fidelity(gen, truth)}


def edge_map(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """image2canny: the generated edge map against the label's."""
    r = M.edge_f1(_gray(gen[0]) > EDGE_LEVEL, _gray(truth[0]) > EDGE_LEVEL)
    return {"edge_f1": r["f1"], "edge_precision": r["precision"], "edge_recall": r["recall"]}


def relative_depth(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """image2depth: the benchmarks' affine-invariant protocol on the generated disparity
    (``metrics.depth_from_disparity``), against the label as a pseudo depth."""
    label = _gray(truth[0])
    valid = label > DISPARITY_FLOOR
    if not valid.any():
        return {}
    pseudo = 1.0 / np.maximum(label, DISPARITY_FLOOR)
    depth = M.depth_from_disparity(_gray(gen[0]), pseudo, valid, 1.0, 1.0 / DISPARITY_FLOOR)
    return M.depth_metrics(depth, pseudo, valid)


def semantic_map(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"miou": M.semantic_map_miou(_uint8(gen[0]), _uint8(truth[0]))}


def box_map(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    iou = M.box_map_iou(_uint8(gen[0]), _uint8(truth[0]))
    return {} if np.isnan(iou) else {"box_iou": iou}


def novel_views(
    gen: np.ndarray, truth: np.ndarray, cond: np.ndarray, lpips: Any = None
) -> dict[str, float]:
    """multiview: PSNR / SSIM (and LPIPS with its weights) over the generated (not given)
    image views, as Table 2."""
    targets = [i for i, c in enumerate(cond) if not c]
    if not targets:
        return {}
    out = {
        "psnr": float(np.mean([capped_psnr(gen[i], truth[i]) for i in targets])),
        "ssim": float(np.mean([M.ssim(gen[i], truth[i]) for i in targets])),
    }
    if lpips is not None:
        out["lpips"] = float(np.mean([lpips.distance(gen[i], truth[i]) for i in targets]))
    return out


def caption_of(prompt: str) -> str:
    """``[[text2image]] a cat`` -> ``a cat``: what a CLIP scores the image against."""
    text = prompt.strip()
    return text.split("]]", 1)[1].strip() if text.startswith("[[") and "]]" in text else text


def identity(gen: np.ndarray, truth: np.ndarray, face: Any) -> dict[str, float]:
    """faceid: the ArcFace similarity of the generated target's face to the true target's
    (the held-out photo of that identity); nothing when the true photo shows no face."""
    target = face.face(_uint8(truth[0]))
    if target is None:
        return {}
    return face.similarity(_uint8(gen[0]), face.embed(target))


def text_alignment(gen: np.ndarray, prompt: str, clip: Any) -> dict[str, float]:
    """text2image: the generated image's CLIP score against its caption."""
    image = _uint8(gen[0])
    return {"clip_score": M.clip_score(clip.images([image]), clip.texts([caption_of(prompt)]))}


def camera_accuracy(
    rays_gen: np.ndarray, rays_true: np.ndarray, size: tuple[int, int]
) -> dict[str, float]:
    """camera_pose: the cameras the generated ray views give against those of the true ray
    views (both recovered as ``onegen sample`` recovers them, camera 0 at the identity), by
    RayDiffusion's relative-rotation @15 deg and camera-centre @0.1 / @0.3 accuracies
    (Table 5). Rays that describe no camera score 0."""
    from training.errors import FitError
    from training.inference.multiview import recover_cameras

    try:
        pred = recover_cameras(rays_gen, size)[0]
        true = recover_cameras(rays_true, size)[0]
    except FitError:
        return {"rotation_acc_15": 0.0, "center_acc_0.1": 0.0, "center_acc_0.3": 0.0}
    # "rotation_acc@15" as pose_metrics names it: MLflow refuses "@" in a metric name
    return {
        name.replace("@", "_"): value
        for name, value in pose_metrics(pred, true).items()
        if not np.isnan(value)
    }


# task name -> scorer of (generated views, true views); multiview and camera_pose are
# scored by novel_views / camera_accuracy (they need the condition mask or the rays).
PAIR_SCORERS: dict[str, Scorer] = {
    "canny2image": canny_control,
    "hed2img": image_fidelity,
    "depth2image": image_fidelity,
    "semanticmap2image": image_fidelity,
    "boundingbox2image": image_fidelity,
    "pose2image": image_fidelity,
    "deblurring": image_fidelity,
    "image_inpainting": image_fidelity,
    "image2canny": edge_map,
    "image2hed": image_fidelity,
    "image2depth": relative_depth,
    "image2semanticmap": semantic_map,
    "image2boundingbox": box_map,
    "image2pose": image_fidelity,
}
if tuple(PAIR_SCORERS) != PAIR_TASKS:  # the light list the config check reads
    raise RuntimeError("training.evaluation.scored.PAIR_TASKS must name PAIR_SCORERS' tasks")
