"""Cheap image-to-image pairs without a model: canny, soft edges, blur, low-res,
inpainting (the i2i subset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datagen.images import encode_jpeg, encode_png
from datagen.io import BadInput
from datagen.stages.degrade_ops import degrade_all
from datagen.stages.protocol import RowStage


@dataclass(frozen=True)
class DegradeParams:
    canny_low: int = 100
    canny_high: int = 200
    downscale_factors: tuple[int, ...] = (2, 3, 4)
    jpeg_quality: int = 95


class DegradeStage(RowStage):
    name: ClassVar[str] = "degrade"
    # 2: motion blur in numpy; 3: soft edges in numpy (the same bytes on every CPU)
    version: ClassVar[str] = "3"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("image",)
    produces: ClassVar[tuple[str, ...]] = (
        "canny.png",
        "hed.png",
        "blur.jpg",
        "lowres.jpg",
        "masked.jpg",
        "mask.png",
        "degradations",
    )
    Params: ClassVar[type] = DegradeParams

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        image = row["image"]
        if image is None or image.ndim != 3 or image.shape[0] < 2:
            raise BadInput("NoImage", "degrade needs the decoded image of the decode stage")
        p = self.params
        factors = tuple(int(f) for f in p.downscale_factors)
        maps, params = degrade_all(image, row["key"], self.seed, p.canny_low, p.canny_high, factors)
        q = p.jpeg_quality
        return {
            "canny_png": encode_png(maps["canny"]),
            "hed_png": encode_png(maps["hed"]),
            "blur_jpg": encode_jpeg(maps["blur"], q),
            "lowres_jpg": encode_jpeg(maps["lowres"], q),
            "masked_jpg": encode_jpeg(maps["masked"], q),
            "mask_png": encode_png(maps["mask"]),
            "meta": {"degradations": params},
        }
