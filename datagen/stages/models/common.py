"""What every model labeler shares: where its weights come from, which device and
dtype it runs in, how many CPU threads it may use, and sub-batched inference.

``weights`` is a local folder or file (real weights, loaded offline) or
``random-tiny``: a tiny model built from a config with random weights, so the
mechanics (shapes, batching, rendering, the pipeline) run anywhere while the
labels mean nothing. The DAG-level ``weights=random-tiny`` switch sets every
``weights`` / ``*_weights`` parameter of a DAG's model stages to it. Before Ray
starts, the driver reads every local weights path as its wrapper will load it, no
tensor loaded (:meth:`ModelStage.check_weights`, the formats in ``common.weights_check``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from common.safe_pt import first_line
from common.weights_check import (  # stdlib only: training uses them too
    PROCESSOR_FILES,
    READ_ERRORS,
    CheckpointError,
    PretrainedFolder,
    check_pretrained_folder,  # noqa: F401 - the wrappers' load check, imported from here
    check_state_dict_file,
)
from datagen.images import decode_rgb
from datagen.stages.protocol import ERROR, Failure, Stage

RANDOM_TINY = "random-tiny"
TINY_SEED = 0  # one random-tiny model everywhere, whatever the DAG's seed
PERSON = 0  # COCO class id of "person" (also in YAML-built models with numeric names); the
# class the YOLO detectors keep, so in a one-class face model the face
T = TypeVar("T")


def check_ultralytics_pt(path: str | Path) -> None:
    """An ultralytics ``.pt`` as the pose and face detectors read it: the scan of their
    restricted loader (model classes and plain data only), no tensor loaded. Imported
    lazily: validating a DAG imports neither torch nor ultralytics until a ``.pt`` is named."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: not a file (an ultralytics .pt checkpoint)")
    from datagen.stages.models import offline  # noqa: F401 - before ultralytics is imported
    from datagen.stages.models.safe_pt import checkpoint_allowlist

    checkpoint_allowlist(str(path))


def weight_params(params_cls: type) -> tuple[str, ...]:
    """The Params fields that name weights (``weights``, ``detector_weights``)."""
    import dataclasses

    return tuple(
        f.name
        for f in dataclasses.fields(params_cls)
        if f.name == "weights" or f.name.endswith("_weights")
    )


def weights_id(weights: str) -> str:
    """What the metadata records as the model: ``random-tiny`` or the folder/file name."""
    if weights == RANDOM_TINY:
        return RANDOM_TINY
    return Path(weights.rstrip("/")).name


def check_weights_path(weights: str, what: str) -> None:
    """A one-line error for a weights path that is not there (real runs load offline)."""
    if weights != RANDOM_TINY and not os.path.exists(weights):
        raise FileNotFoundError(
            f"{what}: weights {weights!r} do not exist (a local path is needed: nothing is "
            f"downloaded); pass weights={RANDOM_TINY} for random-weight mechanics"
        )


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: Any) -> Any:
    """``auto``: bf16 on a GPU that has it (else fp16), fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def set_cpu_threads() -> None:
    """Torch's intra-op threads = the CPUs Ray gave this worker (``OMP_NUM_THREADS``, which Ray
    sets from ``num_cpus``; at least 1), not every core of the node in every actor."""
    import torch

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def decode_stored(jpgs: Sequence[Any], stage: str) -> tuple[dict[int, Any], dict[int, Failure]]:
    """The RGB image of each row's stored ``jpg`` (labels are made from the exact pixels
    training reads, not from the decode stage's in-memory image), and a typed failure
    for each row that has none or whose bytes do not decode."""
    images: dict[int, Any] = {}
    failures: dict[int, Failure] = {}
    for i, jpg in enumerate(jpgs):
        if jpg is None or len(jpg) == 0:
            failures[i] = Failure(ERROR, "NoImage", f"{stage} needs the jpg the decode stage wrote")
            continue
        try:
            images[i] = decode_rgb(bytes(jpg))
        except Exception as exc:  # noqa: BLE001 - cv2 raises several kinds
            failures[i] = Failure(ERROR, "UndecodableJpg", f"{type(exc).__name__}: {exc}")
    return images, failures


# How each model stage's wrapper reads each weights parameter: the one table the driver's
# check (:meth:`ModelStage.check_weights`) follows. Tokenizer groups as the wrappers
# require them (``TOKENIZER_FILES`` of models/caption.py and models/grounding.py).
WEIGHTS_FORMATS: dict[str, dict[str, Callable[[str], None]]] = {
    "caption": {
        "weights": PretrainedFolder(
            "caption",
            "AutoModelForImageTextToText",
            any_of=((*PROCESSOR_FILES, "tokenizer.json", "tokenizer_config.json"),),
        )
    },
    "depth": {
        "weights": PretrainedFolder(
            "depth",
            "DepthAnythingForDepthEstimation",
            ("depth_anything",),
            any_of=(PROCESSOR_FILES,),
        )
    },
    "pose": {
        "detector_weights": check_ultralytics_pt,
        "weights": PretrainedFolder("pose", "VitPoseForPoseEstimation", ("vitpose",)),
    },
    "segment": {
        "detector_weights": PretrainedFolder(
            "grounding",
            "GroundingDinoForObjectDetection",
            ("grounding-dino",),
            any_of=(PROCESSOR_FILES, ("tokenizer.json", "vocab.txt")),
        ),
        "weights": check_state_dict_file,
    },
    "face": {"weights": check_ultralytics_pt},
}


class ModelStage(Stage):
    """Base of labelers with a model: run in an actor pool, model loaded in ``setup()``."""

    uses_model: ClassVar[bool] = True

    @classmethod
    def check_weights(cls, params: Any) -> None:
        """Every weights path of ``params`` read as this stage's wrapper will load it, no
        tensor loaded (:data:`WEIGHTS_FORMATS`), so a broken checkpoint fails on the driver
        before Ray starts. A :class:`CheckpointError` ``"<key>: <file>: <what is wrong>"``;
        ``random-tiny`` has nothing to read."""
        formats = WEIGHTS_FORMATS.get(cls.name, {})
        for key in weight_params(type(params)):
            value = getattr(params, key)
            if value == RANDOM_TINY or key not in formats:
                continue
            try:
                formats[key](value)
            except READ_ERRORS as exc:
                raise CheckpointError(f"{key}: {first_line(exc)}") from None
