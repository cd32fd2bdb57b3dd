"""The driver-side weights check (common/weights_check.py, ``ModelStage.check_weights``):
tiny real checkpoints written in the real formats pass; a corrupted copy fails with one
line naming the key, the file and what is wrong; nothing from a pickle runs.

The cases: a safetensors header whose length runs past the end of the file, tensor
offsets past the data section or not matching dtype x shape, a sharded index naming a
missing shard, ``config.json`` not JSON or naming another model, a missing processor file,
a ``.pth`` / ``.pt`` whose pickle calls ``os.system``. And the table covers every weights
parameter of every model stage, with the tokenizer files the wrappers require.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.weights_check import check_safetensors
from datagen.stages import LABELERS, labeler
from datagen.stages.depth import DepthParams, DepthStage
from datagen.stages.face import FaceParams, FaceStage
from datagen.stages.models.common import (
    RANDOM_TINY,
    WEIGHTS_FORMATS,
    CheckpointError,
    ModelStage,
    weight_params,
)
from datagen.stages.segment import SegmentParams, SegmentStage


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory) -> Path:
    from datagen.stages.models.tiny.depth import save_tiny

    return save_tiny(tmp_path_factory.mktemp("weights") / "depth")


@pytest.fixture
def depth(tiny_depth, tmp_path) -> Path:
    """A fresh copy of the tiny DepthAnything folder (config, safetensors, processor)."""
    return Path(shutil.copytree(tiny_depth, tmp_path / "depth"))


def _check_depth(folder: Path) -> None:
    DepthStage.check_weights(DepthParams(weights=str(folder)))


def _refused(check: Callable[[], None], *expected: str) -> str:
    with pytest.raises(CheckpointError) as err:
        check()
    message = str(err.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """``path`` with its safetensors header edited (the data section kept as it was)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _a_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__")


def test_a_genuine_tiny_checkpoint_passes(depth):
    _check_depth(depth)
    names = check_safetensors(depth / "model.safetensors")
    assert names and all(isinstance(n, str) for n in names)
    DepthStage.check_weights(DepthParams(weights=RANDOM_TINY))  # no files: nothing to read


def test_a_header_length_past_the_end_of_the_file(depth):
    st = depth / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    _refused(
        lambda: _check_depth(depth),
        "weights: ",
        str(st),
        f"header length {len(raw)} runs past the end of the file ({len(raw)} bytes)",
    )


def test_offsets_past_the_end_of_the_data_section(depth):
    st = depth / "model.safetensors"

    def past_the_end(header: dict[str, Any]) -> None:
        tensor = _a_tensor(header)
        tensor["data_offsets"] = [tensor["data_offsets"][0], st.stat().st_size * 2]

    _rewrite_header(st, past_the_end)
    _refused(lambda: _check_depth(depth), str(st), "data_offsets", "lie outside the data section")


def test_offsets_that_do_not_fit_dtype_and_shape(depth):
    st = depth / "model.safetensors"
    _rewrite_header(st, lambda h: _a_tensor(h)["shape"].append(2))
    _refused(lambda: _check_depth(depth), str(st), "spans", "needs")


def test_a_truncated_file_leaves_tensors_past_its_end(depth):
    st = depth / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-16])
    _refused(lambda: _check_depth(depth), str(st), "lie outside the data section")


def test_a_header_that_is_not_json(depth):
    st = depth / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])
    _refused(lambda: _check_depth(depth), str(st), "header is not JSON")


def test_a_sharded_index_naming_a_missing_shard(depth):
    st = depth / "model.safetensors"
    names = sorted(check_safetensors(st))
    st.rename(depth / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (depth / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(
        lambda: _check_depth(depth),
        "model.safetensors.index.json",
        "names shard 'model-00002-of-00002.safetensors', which does not exist",
    )
    # every shard there, but one does not hold a tensor the index maps to it
    weight_map[names[0]] = "model-00001-of-00002.safetensors"
    weight_map["extra.weight"] = "model-00001-of-00002.safetensors"
    (depth / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(lambda: _check_depth(depth), "maps 'extra.weight'", "which does not hold it")
    del weight_map["extra.weight"]
    (depth / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _check_depth(depth)


def test_a_config_that_is_not_json(depth):
    (depth / "config.json").write_text('{"model_type": "depth_anything",')
    _refused(lambda: _check_depth(depth), f"{depth / 'config.json'}: not JSON")


def test_a_config_naming_another_architecture(depth):
    config = json.loads((depth / "config.json").read_text())
    config.update(model_type="vitpose", architectures=["VitPoseForPoseEstimation"])
    (depth / "config.json").write_text(json.dumps(config))
    _refused(
        lambda: _check_depth(depth),
        "model_type is 'vitpose' (architectures ['VitPoseForPoseEstimation'])",
        "DepthAnythingForDepthEstimation, which needs model_type 'depth_anything'",
    )


def test_a_folder_without_its_processor_file(depth):
    (depth / "preprocessor_config.json").unlink()
    _refused(lambda: _check_depth(depth), "lack ['preprocessor_config.json']")


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile checkpoint does."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def test_a_pickle_calling_os_system_is_refused_unrun(tmp_path):
    import torch

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Reduce(os.system, (f"touch {marker}",))}, evil)
    shutil.copy(evil, tmp_path / "evil.pt")
    sam = SegmentParams(detector_weights=RANDOM_TINY, weights=str(evil))
    _refused(lambda: SegmentStage.check_weights(sam), "weights: ", str(evil), "system")
    face = FaceParams(weights=str(tmp_path / "evil.pt"))
    _refused(lambda: FaceStage.check_weights(face), "weights: ", "refusing to load", "system")
    assert not marker.exists()


def test_genuine_sam_pth_and_yolo_pt_pass(tmp_path):
    from datagen.stages.models.tiny.face import build_random_face_yolo
    from datagen.stages.models.tiny.pose import save_yolo_checkpoint
    from datagen.stages.models.tiny.sam import save_tiny_sam

    sam = save_tiny_sam(tmp_path / "sam.pth")
    SegmentStage.check_weights(SegmentParams(detector_weights=RANDOM_TINY, weights=str(sam)))
    save_yolo_checkpoint(build_random_face_yolo(0), tmp_path / "face.pt")
    FaceStage.check_weights(FaceParams(weights=str(tmp_path / "face.pt")))


def test_every_weights_parameter_of_every_model_stage_has_a_format():
    for name in LABELERS:
        cls = labeler(name)
        if issubclass(cls, ModelStage):
            assert set(WEIGHTS_FORMATS.get(name, {})) == set(weight_params(cls.Params)), name


def test_the_table_asks_for_the_tokenizer_files_the_wrappers_require():
    from datagen.stages.models import caption, grounding

    caption_groups = WEIGHTS_FORMATS["caption"]["weights"].any_of
    assert set(caption.TOKENIZER_FILES) <= set(caption_groups[0])
    assert grounding.TOKENIZER_FILES in WEIGHTS_FORMATS["segment"]["detector_weights"].any_of


def test_genuine_tiny_folders_of_every_format_pass(tmp_path):
    """Each save_pretrained format the stages load, written by the tiny builders: the
    caption families, Grounding DINO, ViTPose (with a YOLO person detector)."""
    from datagen.stages.caption import CaptionParams, CaptionStage
    from datagen.stages.models.pose import processor_for
    from datagen.stages.models.tiny import caption
    from datagen.stages.models.tiny.grounding import save_tiny_grounder
    from datagen.stages.models.tiny.pose import (
        build_random_vitpose,
        build_random_yolo,
        save_vitpose,
        save_yolo_checkpoint,
        tiny_vitpose_config,
    )
    from datagen.stages.pose import PoseParams, PoseStage

    for family in caption.TINY_FAMILIES:
        folder = caption.save_tiny(tmp_path / family, family)
        CaptionStage.check_weights(CaptionParams(weights=str(folder)))
    grounder = save_tiny_grounder(tmp_path / "grounding")
    SegmentStage.check_weights(SegmentParams(detector_weights=str(grounder), weights=RANDOM_TINY))
    vitpose = build_random_vitpose(tiny_vitpose_config())
    save_vitpose(vitpose, processor_for(vitpose.config), tmp_path / "vitpose")
    save_yolo_checkpoint(build_random_yolo(0), tmp_path / "yolo.pt")
    PoseStage.check_weights(
        PoseParams(detector_weights=str(tmp_path / "yolo.pt"), weights=str(tmp_path / "vitpose"))
    )
    config = json.loads((grounder / "config.json").read_text())
    (grounder / "config.json").write_text(json.dumps({**config, "model_type": "depth_anything"}))
    _refused(
        lambda: SegmentStage.check_weights(
            SegmentParams(detector_weights=str(grounder), weights=RANDOM_TINY)
        ),
        "detector_weights: ",
        "GroundingDinoForObjectDetection, which needs model_type 'grounding-dino'",
    )
