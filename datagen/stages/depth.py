"""The depth labeler (the ``depth`` subset): DepthAnything-v2 relative inverse depth,
stored as a 16-bit PNG min-max scaled per image, near = bright, at the image's size.

It reads the stored ``jpg`` (decoded again here) rather than the in-memory image, so
the labels match the exact pixels training will see, and it can run in an actor pool
apart from the decode stage. Model code is in ``datagen.stages.models.depth``, imported in
:meth:`DepthStage.setup` only: this module stays light for the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from datagen.images import encode_png
from datagen.io import BadInput
from datagen.params import ParamError
from datagen.stages.models.common import ModelStage, check_weights_path, decode_stored, weights_id
from datagen.stages.protocol import Batch, batch_len, failure_from

DEPTH_LEVELS = 65535  # 16-bit PNG


@dataclass(frozen=True)
class DepthParams:
    """``weights``: a local ``save_pretrained`` folder, or ``random-tiny`` (meaningless
    labels). ``micro_batch``: images per forward pass. ``input_size``: the processor's
    target size (None: the processor's own, 518 for the released models; larger gives
    finer detail, slower). ``min_relative_range``: a map whose range is below this
    fraction of its magnitude is flat (no depth signal, or only dtype noise)."""

    weights: str = "models/depth-anything-v2-large"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    micro_batch: int = 8
    input_size: int | None = None
    min_relative_range: float = 1e-3

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ParamError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if self.input_size is not None and self.input_size < 14:
            raise ParamError(
                f"input_size: must be >= 14 (one patch) or null, got {self.input_size}"
            )
        if not 0 <= self.min_relative_range < 1:
            raise ParamError(
                f"min_relative_range: must be in [0, 1), got {self.min_relative_range}"
            )


def render_depth(
    disparity: np.ndarray, min_relative_range: float = 1e-3
) -> tuple[np.ndarray, float, float]:
    """uint16 ``[H, W]`` of a relative inverse depth map, min-max scaled to 0..65535
    (larger input = nearer = brighter), with the map's min and max.

    Raises ``BadInput`` ``NonFiniteDepth`` (NaN/inf, e.g. fp16 overflow) or ``FlatDepth``
    when ``max - min <= min_relative_range * max(|min|, |max|)``: scaling such a map
    would turn noise into a full-range label.
    """
    d = np.asarray(disparity, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise BadInput("BadDepth", f"depth map must be 2-D and non-empty, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise BadInput("NonFiniteDepth", "the depth prediction has NaN or infinite values")
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= min_relative_range * max(abs(lo), abs(hi)):
        raise BadInput("FlatDepth", f"the depth prediction is flat: min {lo:.6g}, max {hi:.6g}")
    scaled = np.rint((d - lo) * (DEPTH_LEVELS / (hi - lo)))
    return np.clip(scaled, 0, DEPTH_LEVELS).astype(np.uint16), lo, hi


class DepthStage(ModelStage):
    name: ClassVar[str] = "depth"
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("jpg",)
    produces: ClassVar[tuple[str, ...]] = ("depth.png", "depth_model", "depth_min", "depth_max")
    Params: ClassVar[type] = DepthParams

    def __init__(self, params: DepthParams | None = None, seed: int = 0):
        super().__init__(params, seed)
        self.model: Any = None  # loaded in setup(), on the worker

    def setup(self) -> None:
        check_weights_path(self.params.weights, "depth")
        from datagen.stages.models.depth import DepthModel

        p = self.params
        self.model = DepthModel.load(p.weights, device=p.device, dtype=p.dtype)

    def __call__(self, batch: Batch) -> dict[str, list[Any]]:
        if self.model is None:
            raise RuntimeError("DepthStage.setup() must load the model before it labels")
        p = self.params
        n = batch_len(batch)
        out: dict[str, list[Any]] = {
            "depth_png": [None] * n,
            "meta": [None] * n,
            "failure": [None] * n,
        }
        decoded, failures = decode_stored(batch["jpg"], self.name)
        for i, failure in failures.items():
            out["failure"][i] = failure
        rows = sorted(decoded)
        images = [decoded[i] for i in rows]
        maps = self.model.predict(images, micro_batch=p.micro_batch, input_size=p.input_size)
        model_id = weights_id(p.weights)
        for i, disparity in zip(rows, maps, strict=True):
            try:
                image, lo, hi = render_depth(disparity, p.min_relative_range)
                out["depth_png"][i] = encode_png(image)
            except Exception as exc:  # noqa: BLE001 - this row's failure
                out["failure"][i] = failure_from(exc)
                continue
            out["meta"][i] = {"depth_model": model_id, "depth_min": lo, "depth_max": hi}
        return out
