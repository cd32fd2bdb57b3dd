"""The pose labeler: OpenPose rendering, the stage on real photos with tiny random
models, the production loading path, and the safe ``.pt`` loader."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from datagen.images import decode_rgb, encode_jpeg
from datagen.stages.pose import PoseParams, PoseStage
from datagen.stages.pose_render import COLORS, LIMBS, coco_to_openpose, render_openpose
from datagen.stages.protocol import column_for, meta_column, status_column
from datagen.stages.runner import run_stage
from tests.helpers import REPO

# -- rendering ----------------------------------------------------------------------------

# OpenPose-18 slot -> COCO-17 index, written out by hand (None: the neck).
EXPECTED_MAP = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
THRESHOLD = 0.3
LIMB_DIM = 0.6


def _person(
    confident: dict[int, tuple[float, float]], low: dict[int, tuple[float, float]] | None = None
) -> np.ndarray:
    """COCO ``[17, 3]``: the given keypoints at score 0.9 (``low``: 0.1), others 0."""
    kp = np.zeros((17, 3))
    for index, (x, y) in confident.items():
        kp[index] = (x, y, 0.9)
    for index, (x, y) in (low or {}).items():
        kp[index] = (x, y, 0.1)
    return kp


def test_coco_to_openpose_mapping_is_exact():
    kp = np.array([[10.0 * i, 10.0 * i + 1.0, 1.0] for i in range(17)])
    xy, present = coco_to_openpose(kp, THRESHOLD)
    assert xy.shape == (18, 2) and present.all()
    for slot, coco in enumerate(EXPECTED_MAP):
        if coco is None:  # neck: mid-shoulders (COCO 5 and 6)
            np.testing.assert_array_equal(xy[slot], [55.0, 56.0])
        else:
            np.testing.assert_array_equal(xy[slot], kp[coco, :2])


@pytest.mark.parametrize(
    ("left", "right", "neck"), [(0.9, 0.9, True), (0.9, 0.1, False), (0.1, 0.9, False)]
)
def test_neck_only_when_both_shoulders_are_confident(left, right, neck):
    kp = np.zeros((17, 3))
    kp[5] = (10, 20, left)
    kp[6] = (30, 20, right)
    _, present = coco_to_openpose(kp, THRESHOLD)
    assert present[1] == neck
    assert present[5] == (left >= THRESHOLD) and present[2] == (right >= THRESHOLD)


def test_one_limb_renders_exact_colours_and_black_elsewhere():
    # Right shoulder (COCO 6 -> OpenPose 2) at (20, 30), right elbow (COCO 8 -> OpenPose 3)
    # at (60, 30): one horizontal limb, OpenPose limb (2, 3) = colour 2, dimmed to 0.6.
    # A left wrist scored below the threshold must leave no trace.
    width, height = 100, 80
    person = _person({6: (20.0, 30.0), 8: (60.0, 30.0)}, low={9: (80.0, 70.0)})
    image = render_openpose([person], width, height, THRESHOLD)
    assert image.shape == (height, width, 3) and image.dtype == np.uint8

    limb = tuple(int(c * LIMB_DIM) for c in (255, 170, 0))
    shoulder, elbow = (255, 170, 0), (255, 255, 0)
    assert limb == (153, 102, 0)
    ys, xs = np.mgrid[0:height, 0:width]
    in_limb = ((xs - 40.0) / 20.0) ** 2 + ((ys - 30.0) / 4.0) ** 2  # ellipse: axes 20 x 4
    d_shoulder = np.hypot(xs - 20, ys - 30)
    d_elbow = np.hypot(xs - 60, ys - 30)

    def colour(mask):
        return {tuple(int(v) for v in px) for px in image[mask]}

    assert colour(d_shoulder <= 3) == {shoulder}
    assert colour(d_elbow <= 3) == {elbow}
    assert colour((in_limb <= 0.7) & (d_shoulder > 5) & (d_elbow > 5)) == {limb}
    assert colour((in_limb >= 1.5) & (d_shoulder > 5) & (d_elbow > 5)) == {(0, 0, 0)}
    assert colour(np.ones_like(d_elbow, bool)) == {(0, 0, 0), limb, shoulder, elbow}
    assert image[60:, 60:].max() == 0  # the low-score wrist at (80, 70)


def test_limb_needs_both_ends_and_render_is_deterministic():
    alone = render_openpose([_person({6: (20.0, 30.0)}, low={8: (60.0, 30.0)})], 100, 80, 0.3)
    assert alone[30, 40].tolist() == [0, 0, 0]  # no limb to the low-score elbow
    assert alone[30, 20].tolist() == list(COLORS[2])
    full = np.array([[20 + 5.0 * i, 10 + 6.0 * i, 0.9] for i in range(17)])
    a = render_openpose([full, full + [3, 1, 0]], 160, 140, 0.3)
    b = render_openpose([full, full + [3, 1, 0]], 160, 140, 0.3)
    np.testing.assert_array_equal(a, b)
    assert len(LIMBS) == 17 and len(COLORS) == 18


# -- the stage on real photographs, tiny random models -------------------------------------


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    images = {
        "bus": cv2.cvtColor(cv2.imread(str(assets / "bus.jpg")), cv2.COLOR_BGR2RGB),
        "zidane": cv2.cvtColor(cv2.imread(str(assets / "zidane.jpg")), cv2.COLOR_BGR2RGB),
        "astronaut": skimage.data.astronaut(),
    }
    out = {}
    for key, image in images.items():  # small: fast tests
        scale = 240 / max(image.shape[:2])
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        out[key] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return out


TINY = {
    "detector_weights": "random-tiny",
    "weights": "random-tiny",
    "device": "cpu",
    "dtype": "float32",
    "detector_imgsz": 256,
    "max_people": 3,
}


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {key: encode_jpeg(image, 90) for key, image in _photos().items()}


@pytest.fixture(scope="module")
def tiny_stage() -> PoseStage:
    stage = PoseStage(PoseParams(**TINY))
    stage.setup()
    return stage


def _with(stage: PoseStage, **changes) -> PoseStage:
    """The same loaded models under other params (no reload)."""
    other = PoseStage(dataclasses.replace(stage.params, **changes), stage.seed)
    other.detector, other.estimator, other.model_id = (
        stage.detector,
        stage.estimator,
        stage.model_id,
    )
    return other


def _run(stage: PoseStage, rows: dict[str, bytes]) -> dict[str, list]:
    batch = {"key": list(rows), "jpg": list(rows.values())}
    return run_stage(stage, batch, name="pose", needs=())


def test_stage_labels_real_photos(tiny_stage, photos):
    out = _run(tiny_stage, photos)
    assert out[status_column("pose")] == ["ok"] * len(photos)
    for i, jpg in enumerate(photos.values()):
        height, width = decode_rgb(jpg).shape[:2]
        pose = decode_rgb(out[column_for("pose.png")][i])
        assert pose.shape == (height, width, 3) and pose.dtype == np.uint8
        meta = json.loads(out[meta_column("pose")][i])
        assert meta["pose_model"] == "random-tiny+random-tiny"
        people = meta["people"]
        assert len(people) == 3  # the random detector finds hundreds: max_people caps them
        for person in people:
            x0, y0, x1, y1 = person["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert 0 < person["score"] <= 1
            assert len(person["keypoints"]) == 17
            for x, y, score in person["keypoints"]:
                assert 0 <= x <= width - 1 and 0 <= y <= height - 1 and 0 <= score <= 1
        # the image is the metadata drawn: re-rendering it gives the same pixels
        again = render_openpose(
            [np.array(p["keypoints"]) for p in people], width, height, THRESHOLD
        )
        np.testing.assert_array_equal(pose, again)
        assert pose.any()


@pytest.mark.parametrize("conf", [0.9, 1.01])
def test_high_threshold_filters_every_row(tiny_stage, photos, conf):
    # random-tiny scores every box sigmoid(2) = 0.88: the default 0.5 finds people (above)
    out = _run(_with(tiny_stage, person_conf=conf), photos)
    assert out[status_column("pose")] == ["filtered"] * len(photos)
    assert out["pose.error"] == ["NoPerson"] * len(photos)
    assert f"person_conf={conf:g}" in out["pose.message"][0]
    assert out[column_for("pose.png")] == [b""] * len(photos)


def test_bad_jpg_fails_its_row_only(tiny_stage, photos):
    rows = {"bus": photos["bus"], "garbage": b"not a jpeg at all", "zidane": photos["zidane"]}
    out = _run(tiny_stage, rows)
    assert out[status_column("pose")] == ["ok", "error", "ok"]
    assert out["pose.error"][1] == "UndecodableJpg"
    good = _run(tiny_stage, {"bus": photos["bus"], "zidane": photos["zidane"]})
    assert out[column_for("pose.png")][0] == good[column_for("pose.png")][0]
    assert out[column_for("pose.png")][2] == good[column_for("pose.png")][1]


def test_micro_batches_do_not_change_the_labels(tiny_stage, photos):
    whole = _run(tiny_stage, photos)
    split = _run(_with(tiny_stage, micro_batch=2, detector_batch=1), photos)
    assert whole[column_for("pose.png")] == split[column_for("pose.png")]
    assert whole[meta_column("pose")] == split[meta_column("pose")]


# -- the production loading path ------------------------------------------------------------


def test_stage_loads_real_format_weights_from_paths(tiny_stage, photos, tmp_path, monkeypatch):
    from datagen.stages.models import pose as pm
    from datagen.stages.models.tiny import pose as tiny_pose

    pt = tmp_path / "yolo-tiny.pt"
    tiny_pose.save_yolo_checkpoint(tiny_pose.build_random_yolo(tiny_stage.seed), pt)
    vitpose = tmp_path / "vitpose-tiny"
    model = tiny_pose.build_random_vitpose(tiny_pose.tiny_vitpose_config(), tiny_stage.seed)
    tiny_pose.save_vitpose(model, pm.processor_for(model.config), vitpose)
    assert (vitpose / "model.safetensors").exists() and (vitpose / "config.json").exists()

    import ultralytics.nn.tasks as tasks

    def no_ultralytics_load(*args, **kwargs):
        raise AssertionError("ultralytics must not read the checkpoint itself (full pickle)")

    monkeypatch.setattr(tasks, "torch_safe_load", no_ultralytics_load)
    monkeypatch.setattr(tasks, "load_checkpoint", no_ultralytics_load)
    params = {**TINY, "detector_weights": str(pt), "weights": str(vitpose)}
    stage = PoseStage(PoseParams(**params), tiny_stage.seed)
    stage.setup()
    pt.unlink()  # loaded once: inference never goes back to the file
    from_paths = _run(stage, photos)
    in_memory = _run(tiny_stage, photos)
    assert from_paths[status_column("pose")] == ["ok"] * len(photos)
    assert from_paths[column_for("pose.png")] == in_memory[column_for("pose.png")]
    for a, b in zip(from_paths[meta_column("pose")], in_memory[meta_column("pose")], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["pose_model"] == "yolo-tiny.pt+vitpose-tiny"
        assert a["people"] == b["people"]


def test_fused_checkpoint_loads(tmp_path):
    """Fused layers pickle ``forward = forward_fuse`` through getattr: admitted, restricted."""
    from datagen.stages.models import pose as pm
    from datagen.stages.models.tiny import pose as tiny_pose

    yolo = tiny_pose.build_random_yolo(0)
    yolo.fuse()
    tiny_pose.save_yolo_checkpoint(yolo, tmp_path / "fused.pt")
    loaded = pm.load_yolo_checkpoint(str(tmp_path / "fused.pt"))
    assert loaded.model.is_fused()


# -- the safe .pt loader ----------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile checkpoint does."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile(path: Path, payload: object, protocol: int = 2) -> str:
    import torch

    torch.save({"model": payload, "epoch": 1}, path, pickle_protocol=protocol)
    return str(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_loader_refuses_os_system(tmp_path, protocol):
    from datagen.stages.models import safe_pt as pm

    marker = tmp_path / "marker"
    path = _hostile(tmp_path / "evil.pt", _Reduce(os.system, (f"touch {marker}",)), protocol)
    with pytest.raises(pm.UnsafeCheckpoint, match=r"system") as err:
        pm.safe_torch_load(path)
    assert "\n" not in str(err.value) and "refusing" in str(err.value)
    stage = PoseStage(PoseParams(**{**TINY, "detector_weights": path}))
    with pytest.raises(pm.UnsafeCheckpoint):
        stage.setup()
    assert not marker.exists()


def test_safe_loader_refuses_other_code(tmp_path):
    import builtins

    from torch import nn
    from ultralytics.nn.tasks import DetectionModel

    from datagen.stages.models import safe_pt as pm

    cases = {
        "eval": (_Reduce(builtins.eval, ("1 + 1",)), r"builtins\.eval"),
        # a model class is admitted only to be filled from state, never called
        "ctor": (_Reduce(DetectionModel, ("yolo11n.yaml",)), r"calls 'ultralytics\.nn\.tasks"),
        "getattr": (_Reduce(getattr, (nn.Identity(), "__init__")), r"getattr"),
        "np_load": (_Reduce(np.load, ("x.npy",)), r"numpy"),
    }
    for name, (payload, message) in cases.items():
        path = _hostile(tmp_path / f"{name}.pt", payload)
        with pytest.raises(pickle.UnpicklingError, match=message):
            pm.safe_torch_load(path)


def test_safe_loader_refuses_non_checkpoints(tmp_path):
    from datagen.stages.models import pose as pm
    from datagen.stages.models import safe_pt

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(safe_pt.UnsafeCheckpoint, match="zip"):
        safe_pt.safe_torch_load(str(legacy))
    not_a_model = _hostile(tmp_path / "dict.pt", {"weights": [1, 2]})
    with pytest.raises(safe_pt.UnsafeCheckpoint, match="not an ultralytics detection model"):
        pm.load_yolo_checkpoint(not_a_model)


def test_the_restricted_reader_is_stdlib_and_the_wrappers_build_tiny_models_lazily():
    """``common.safe_pt`` (the one restricted pickle reader, training's too) imports no
    torch; importing every model wrapper imports no random builder (``models.tiny``)."""
    import subprocess
    import sys

    repo = REPO
    code = (
        "import sys, common.safe_pt\n"
        "assert 'torch' not in sys.modules, 'common.safe_pt imported torch'\n"
        "from datagen.stages.models import caption, depth, face, grounding, pose, sam\n"
        "tiny = sorted(m for m in sys.modules if m.startswith('datagen.stages.models.tiny'))\n"
        "assert not tiny, tiny\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("which", ["detector_weights", "weights"])
def test_missing_weights_path_is_a_clear_error(tmp_path, which):
    stage = PoseStage(PoseParams(**{**TINY, which: str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match=rf"pose {which}: weights .*nowhere.* do not exist"):
        stage.setup()


def test_pose_dag_validates_with_random_tiny():
    from pipelines import dag

    repo = REPO
    cfg = dag.load(repo / "pipelines" / "pose.yaml", ["weights=random-tiny"])
    assert cfg.subset_names == ["pose"]
