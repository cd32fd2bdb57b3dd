"""Toy labelers for the protocol tests: plain Python, no model, registered by the tests.

They record nothing globally (Ray runs them in other processes): what a stage saw is
written into its own output column, so the tests read it back from the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datagen.stages.protocol import ERROR, FILTERED, Failure, RowStage, Stage


@dataclass(frozen=True)
class MiddleParams:
    fail_every: int = 3  # rows whose number % fail_every == 1 fail (error)
    filter_every: int = 0  # rows whose number % filter_every == 2 are filtered (0: none)


def key_number(key: str) -> int:
    return int(str(key).rsplit("_", 1)[-1].split("-v")[0])


class MiddleStage(Stage):
    """Needs decode; batched; fails some rows, filters others, deterministically by key."""

    name: ClassVar[str] = "toy_middle"
    needs: ClassVar[tuple[str, ...]] = ("decode",)
    reads: ClassVar[tuple[str, ...]] = ("jpg",)
    produces: ClassVar[tuple[str, ...]] = ("canny.png", "hed.png", "toy_seen")
    Params: ClassVar[type] = MiddleParams

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"canny_png": [], "hed_png": [], "meta": [], "failure": []}
        p = self.params
        for key, jpg in zip(batch["key"], batch["jpg"], strict=True):
            n = key_number(key)
            failure = None
            if p.fail_every and n % p.fail_every == 1:
                failure = Failure(ERROR, "ToyError", f"{key} fails on purpose")
            elif p.filter_every and n % p.filter_every == 2:
                failure = Failure(FILTERED, "ToyFiltered", f"{key} is not for this subset")
            out["failure"].append(failure)
            out["canny_png"].append(None if failure else bytes(jpg))
            out["hed_png"].append(None if failure else bytes(jpg))
            out["meta"].append(None if failure else {"toy_seen": key})
        return out


class LastStage(RowStage):
    """Needs toy_middle: must never see a row toy_middle failed or filtered."""

    name: ClassVar[str] = "toy_last"
    needs: ClassVar[tuple[str, ...]] = ("toy_middle",)
    reads: ClassVar[tuple[str, ...]] = ("canny_png",)
    produces: ClassVar[tuple[str, ...]] = (
        "blur.jpg",
        "lowres.jpg",
        "masked.jpg",
        "mask.png",
        "degradations",
    )

    def label(self, row: dict[str, Any]) -> dict[str, Any]:
        n = key_number(row["key"])
        if n % 3 == 1 or n % 4 == 2:
            raise AssertionError(f"toy_last saw {row['key']}, which toy_middle rejected")
        data = bytes(row["canny_png"])
        return {
            "blur_jpg": data,
            "lowres_jpg": data,
            "masked_jpg": data,
            "mask_png": data,
            "meta": {"degradations": {"toy_last": row["key"]}},
        }
