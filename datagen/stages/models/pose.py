"""The pose labeler's models: an ultralytics YOLO person detector and a transformers
ViTPose keypoint model. Imported only in ``PoseStage.setup()`` (on the worker): it
pulls in torch, ultralytics and transformers.

Checkpoints are untrusted data. Ultralytics reads a ``.pt`` with full pickle (code
runs on load), so :func:`safe_torch_load` reads it here instead: the pickle's globals
are scanned first and only model classes (``ultralytics.nn`` modules, ``torch.nn``
modules) and a few plain data types are admitted, model classes only as objects to
fill (``NEWOBJ``), never as constructors to call (``REDUCE``); then
``torch.load(weights_only=True)`` runs with exactly that allowlist, and the model it
returns is handed to ultralytics, which never opens the file.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).

# isort: split

import importlib
import pathlib
import pickle
import pickletools
import threading
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datagen.stages.models.common import chunks

PERSON = 0  # COCO class id of "person" (also in YAML-built models with numeric names)
RANDOM_TINY_YOLO_YAML = "yolo11n.yaml"
MAX_PICKLE_BYTES = 256 << 20  # a checkpoint's object graph; yolo11x's is well under 1 MiB


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint whose pickle could run code or build something other than a model."""


# -- the safe .pt loader ------------------------------------------------------------------


@dataclass(frozen=True)
class PickleGlobals:
    """What a pickle references: every global, the globals it calls (``REDUCE``) and
    those it instantiates without calling a constructor (``NEWOBJ``)."""

    names: frozenset[str]
    called: frozenset[str]
    instantiated: frozenset[str]


class _Global(str):
    """A global on the simulated stack (its dotted name)."""


class _Str(str):
    """A string constant on the simulated stack (``STACK_GLOBAL`` reads two)."""


_UNKNOWN = object()
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_REFUSED_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # calls or registry lookups we cannot vet


def scan_pickle(data: bytes, what: str = "pickle") -> PickleGlobals:
    """Walk the opcodes of ``data`` on a symbolic stack (nothing is executed): which
    globals it names, which it calls and which it instantiates. A call whose callable
    is not a plain global (computed at load time) is refused outright."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    names: set[str] = set()
    called: set[str] = set()
    instantiated: set[str] = set()

    def pop(n: int = 1) -> list[Any]:
        if n > len(stack):
            raise UnsafeCheckpoint(f"{what}: malformed pickle (stack underflow)")
        taken = stack[len(stack) - n :] if n else []
        del stack[len(stack) - n :]
        return taken

    try:
        ops = list(pickletools.genops(data))
    except ValueError as exc:
        raise UnsafeCheckpoint(f"{what}: malformed pickle: {exc}") from exc
    for op, arg, _pos in ops:
        name = op.name
        if name in _REFUSED_OPS:
            raise UnsafeCheckpoint(
                f"{what}: refusing pickle opcode {name} (not used by torch.save)"
            )
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            # the protocol-2 names Python 3 maps (``__builtin__.set``), as torch's reader does
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[(module, attr)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
            full = f"{module}.{attr}"
            names.add(full)
            stack.append(_Global(full))
        elif name == "STACK_GLOBAL":
            module, attr = pop(2)
            if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                raise UnsafeCheckpoint(f"{what}: a global whose name is computed at load time")
            full = f"{module}.{attr}"
            names.add(full)
            stack.append(_Global(full))
        elif name in _STRING_OPS:
            stack.append(_Str(arg) if isinstance(arg, str) else _UNKNOWN)
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else _UNKNOWN
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _UNKNOWN
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg), _UNKNOWN))
        elif name == "DUP":
            stack.append(stack[-1] if stack else _UNKNOWN)
        elif name == "REDUCE":
            _args, func = pop(1) + pop(1)
            if not isinstance(func, _Global):
                raise UnsafeCheckpoint(f"{what}: calls an object computed at load time")
            called.add(str(func))
            stack.append(_UNKNOWN)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            taken = pop(3 if name == "NEWOBJ_EX" else 2)
            cls = taken[0]
            if not isinstance(cls, _Global):
                raise UnsafeCheckpoint(f"{what}: instantiates a class computed at load time")
            instantiated.add(str(cls))
            stack.append(_UNKNOWN)
        else:  # every other opcode: its documented stack effect, values unknown
            before = op.stack_before
            if pickletools.markobject in before:
                if not marks:
                    raise UnsafeCheckpoint(f"{what}: malformed pickle (no mark)")
                del stack[marks.pop() :]
                pop(before.index(pickletools.markobject))
            else:
                pop(len(before))
            stack.extend(_UNKNOWN for _ in op.stack_after)
    return PickleGlobals(frozenset(names), frozenset(called), frozenset(instantiated))


def _checkpoint_pickle(path: str) -> bytes:
    """The ``data.pkl`` record ``torch.load`` would unpickle (a ``torch.save`` zip)."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint(
            f"{path}: not a torch.save zip archive (legacy or foreign formats are not loaded)"
        )
    with zipfile.ZipFile(path) as archive:
        records = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(records) != 1 or any(n.endswith("constants.pkl") for n in archive.namelist()):
            raise UnsafeCheckpoint(f"{path}: not a torch.save checkpoint (a TorchScript archive?)")
        if archive.getinfo(records[0]).file_size > MAX_PICKLE_BYTES:  # tensors live outside it
            raise UnsafeCheckpoint(f"{path}: its pickle is over {MAX_PICKLE_BYTES} bytes")
        return archive.read(records[0])


def _checkpoint_getattr(obj: Any, name: str) -> Any:
    """``builtins.getattr`` as checkpoints may use it: fused ultralytics layers pickle
    ``layer.forward = layer.forward_fuse`` as ``getattr(layer, "forward_fuse")``.
    Only those two methods of model layers (bound or not); nothing else."""
    if name in ("forward", "forward_fuse"):
        if isinstance(obj, nn.Module):
            return getattr(type(obj), name).__get__(obj)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return getattr(obj, name)
    raise UnsafeCheckpoint(
        f"checkpoint calls getattr({type(obj).__name__}, {name!r}): only the forward / "
        "forward_fuse methods of model layers are allowed"
    )


_MODEL_MODULE_PREFIXES = ("ultralytics.nn.modules.", "torch.nn.modules.")
_MODEL_MODULES = {"ultralytics.nn.tasks", "ultralytics.nn.modules"}
# Classes only filled from state (NEWOBJ + BUILD) in trainer-written checkpoints that
# kept the loss: admitted when defined in these modules, never called.
_LOSS_MODULES = {"ultralytics.utils.loss", "ultralytics.utils.tal"}


def _plain_data_globals() -> dict[str, tuple[Any, bool]]:
    """Non-model globals real ultralytics checkpoints hold, -> (object, may be called):
    numpy scalars and dtypes (metrics), the args namespace, pickled paths (as pure paths:
    no I/O), getattr (restricted) and two renamed legacy classes."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]
    table: dict[str, tuple[Any, bool]] = {
        "builtins.getattr": (_checkpoint_getattr, True),
        "numpy.core.multiarray.scalar": (scalar, True),
        "numpy._core.multiarray.scalar": (scalar, True),
        "numpy.dtype": (np.dtype, True),
        "ultralytics.utils.IterableSimpleNamespace": (IterableSimpleNamespace, True),
        "ultralytics.yolo.utils.IterableSimpleNamespace": (IterableSimpleNamespace, True),
        "ultralytics.nn.modules.block.Silence": (nn.Identity, False),
        "ultralytics.nn.tasks.YOLOv10DetectionModel": (DetectionModel, False),
    }
    for module in ("pathlib", "pathlib._local"):
        table[f"{module}.PosixPath"] = (pathlib.PurePosixPath, True)
        table[f"{module}.WindowsPath"] = (pathlib.PureWindowsPath, True)
    return table


def _model_class(full: str) -> type | None:
    """The class ``full`` names when it is a model layer (or a loss class) of an admitted
    module, defined there; else None."""
    module, _, attr = full.rpartition(".")
    is_model = module in _MODEL_MODULES or module.startswith(_MODEL_MODULE_PREFIXES)
    if not (is_model or module in _LOSS_MODULES) or not attr.isidentifier():
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except (ImportError, ValueError):
        return None
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    if is_model and not issubclass(obj, nn.Module):
        return None
    return obj


def checkpoint_allowlist(path: str) -> list[tuple[Any, str]]:
    """``(object, name)`` for every global the checkpoint at ``path`` needs beyond
    torch's own weights-only set, or :class:`UnsafeCheckpoint` naming the first global
    that is not admitted (or a model class the pickle would call)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    found = scan_pickle(_checkpoint_pickle(path), path)
    torch_default = _get_allowed_globals()
    plain = _plain_data_globals()
    allow: list[tuple[Any, str]] = []
    for full in sorted(found.names):
        if full in torch_default:
            continue
        if full in plain:
            obj, callable_ok = plain[full]
        else:
            obj, callable_ok = _model_class(full), False
            if obj is None:
                raise UnsafeCheckpoint(
                    f"{path}: refusing to load: its pickle references {full!r}, which is not "
                    "an allowed checkpoint global (only ultralytics / torch.nn model classes "
                    "and plain data are; loading it could run code)"
                )
        if full in found.called and not callable_ok:
            raise UnsafeCheckpoint(
                f"{path}: refusing to load: its pickle calls {full!r} (a constructor run at "
                "load time; model classes are only filled from state)"
            )
        allow.append((obj, full))
    if "numpy.dtype" in found.names:  # BUILD on a dtype needs its class (not a pickle global)
        classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}
        allow += [(c, f"numpy.dtypes.{c.__name__}") for c in sorted(classes, key=str)]
    return allow


_LOAD_LOCK = threading.Lock()  # safe_globals edits a process-wide set


def safe_torch_load(path: str) -> Any:
    """``torch.load`` of a ``.pt`` with no code execution: scanned, then weights-only
    with the minimal allowlist. Raises :class:`UnsafeCheckpoint` with one line naming
    what was refused."""
    allow = checkpoint_allowlist(path)
    with _LOAD_LOCK, torch.serialization.safe_globals(allow):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsafeCheckpoint(f"{path}: weights-only load refused: {first}") from exc


# -- the person detector ------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """One image's persons: pixel ``xyxy`` boxes ``[N, 4]`` and scores ``[N]``, best first."""

    boxes: np.ndarray
    scores: np.ndarray


def _wrap_yolo(model: nn.Module, ckpt: dict[str, Any], source: str) -> Any:
    """A ``YOLO`` around an already loaded detection model: ultralytics' own ``.pt``
    loading (full pickle) is replaced, everything else (predictor, NMS, letterbox) is
    ultralytics' as usual."""
    from ultralytics import YOLO

    class _PreloadedYOLO(YOLO):
        def _load(self, weights: str, task: str | None = None) -> None:
            self.model, self.ckpt = model, ckpt
            self.task = model.task
            self.overrides = self.model.args = self._reset_ckpt_args(model.args)
            self.overrides.pop("data", None)  # a path the checkpoint names: never opened
            self.ckpt_path = None
            self.overrides["model"] = weights
            self.overrides["task"] = self.task
            self.model_name = weights

    return _PreloadedYOLO(source)


def load_yolo_checkpoint(path: str) -> Any:
    """A ``YOLO`` from an ultralytics ``.pt`` (as its trainer or ``YOLO.save`` writes
    it), read by :func:`safe_torch_load`; the model is prepared as ultralytics'
    ``load_checkpoint`` does (fp32, args, eval)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import DetectionModel, guess_model_task

    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise UnsafeCheckpoint(f"{path}: not an ultralytics checkpoint (no checkpoint dict)")
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, DetectionModel):
        raise UnsafeCheckpoint(
            f"{path}: holds {type(model).__name__}, not an ultralytics detection model"
        )
    train_args = ckpt.get("train_args") or {}
    model = model.float().eval()
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else {})}
    model.pt_path = str(path)
    model.task = getattr(model, "task", None) or guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
    return _wrap_yolo(model, ckpt, str(path))


RANDOM_PERSON_LOGIT = 2.0  # random-tiny person score: sigmoid(2) = 0.88 for every box


def build_random_yolo(seed: int = 0, yaml: str = RANDOM_TINY_YOLO_YAML) -> Any:
    """A random-init ``YOLO`` from ultralytics' packaged YAML (no download).

    Its features barely move the class logits, so every box scores what the head's
    bias says: ultralytics' init (1.6e-4) would find nobody at any real ``person_conf``;
    the person bias is set to :data:`RANDOM_PERSON_LOGIT` instead, so every box scores
    about 0.88 as a person: DAG thresholds up to ~0.85 see people (the mechanics run
    unchanged), ``person_conf >= 0.9`` none. Weights are rounded to fp16, as
    ultralytics saves them, so a saved copy reproduces the model exactly."""
    from ultralytics import YOLO

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yolo = YOLO(yaml)
    head = yolo.model.model[-1]
    for name in ("cv3", "one2one_cv3"):
        for branch in getattr(head, name, None) or ():
            branch[-1].bias.data[PERSON] = RANDOM_PERSON_LOGIT
    yolo.model.half().float()
    yolo.model.eval()
    return yolo


def save_yolo_checkpoint(yolo: Any, path: str | Path) -> None:
    """Write ``yolo`` as ultralytics does (``Model.save``: the model in fp16 in a
    checkpoint dict with date, version, license), plus the ``train_args`` and
    ``train_metrics`` trainer-written checkpoints carry: the real format, for tests and
    benchmarks."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    yolo.ckpt = {
        **(yolo.ckpt or {}),
        "epoch": -1,
        "train_args": dict(DEFAULT_CFG_DICT),
        "train_metrics": {"fitness": np.float64(0.0)},  # numpy scalars, as trainers write
    }
    yolo.save(str(path))


class PersonDetector:
    """Batched YOLO person detection over RGB images."""

    def __init__(self, yolo: Any, device: torch.device, half: bool, imgsz: int, iou: float):
        self.yolo, self.device, self.half, self.imgsz, self.iou = yolo, device, half, imgsz, iou

    def _precision(self) -> dict[str, Any]:
        """fp16 on a GPU when asked: ``quantize`` in ultralytics 8.4 (``half`` before)."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        if "quantize" in DEFAULT_CFG_DICT:
            return {"quantize": 16 if self.half else 32}
        return {"half": self.half}

    def __call__(self, images: Sequence[np.ndarray], conf: float, batch: int) -> list[Detections]:
        """Persons scored above ``conf`` in each image (pixel boxes, clipped to it)."""
        out: list[Detections] = []
        device = "cpu" if self.device.type == "cpu" else str(self.device.index or 0)
        for part in chunks(list(images), batch):
            results = self.yolo.predict(
                # ultralytics reads numpy as BGR: flip the RGB channels
                [np.ascontiguousarray(im[..., ::-1]) for im in part],
                conf=min(max(float(conf), 0.0), 1.0),  # it refuses values outside [0, 1]
                iou=self.iou,
                classes=[PERSON],
                rect=False,  # always the square letterbox: an image's boxes never depend on its batch
                imgsz=self.imgsz,
                device=device,
                **self._precision(),
                batch=len(part),
                verbose=False,
            )
            for r in results:
                boxes = r.boxes.xyxy.float().cpu().numpy().reshape(-1, 4).astype(np.float64)
                scores = r.boxes.conf.float().cpu().numpy().reshape(-1).astype(np.float64)
                keep = scores > conf
                order = np.argsort(-scores[keep], kind="stable")
                out.append(Detections(boxes[keep][order], scores[keep][order]))
        return out


def load_detector(
    weights: str,
    device: torch.device,
    half: bool,
    imgsz: int,
    iou: float,
    seed: int = 0,
    build: Callable[[int], Any] = build_random_yolo,
    load: Callable[[str], Any] = load_yolo_checkpoint,
) -> PersonDetector:
    """From a local ``.pt`` (safely, ``load``) or ``random-tiny`` (``build``); the face
    check passes its own one-class pair."""
    from datagen.stages.models.common import RANDOM_TINY

    yolo = build(seed) if weights == RANDOM_TINY else load(weights)
    yolo.model.to(device)
    return PersonDetector(yolo, device, half, imgsz, iou)


# -- ViTPose ----------------------------------------------------------------------------


def tiny_vitpose_config() -> Any:
    """A tiny random ViTPose (2 layers, 32 wide, 64x48 crops) with 17 COCO heatmaps."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(
        image_size=[64, 48],
        patch_size=[8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
        layer_norm_eps=1e-6,
    )
    return VitPoseConfig(backbone_config=backbone, num_labels=17)


def _vit_config(hidden: int, heads: int) -> Any:
    """A real-size ViTPose (ViT/16, 12 layers, 256x192 crops, simple decoder, 17
    heatmaps, as the usyd-community checkpoints): random init, nothing downloaded."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(
        image_size=[256, 192],
        patch_size=[16, 16],
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        out_indices=[12],
        layer_norm_eps=1e-6,
    )
    return VitPoseConfig(backbone_config=backbone, num_labels=17, use_simple_decoder=True)


def vitpose_base_config() -> Any:
    """ViTPose-B at real size (768 wide, 12 heads; 86M parameters) for GPU benchmarks."""
    return _vit_config(768, 12)


def vitpose_small_config() -> Any:
    """ViTPose-S at real size (384 wide, 6 heads; 22M parameters) for CPU benchmarks."""
    return _vit_config(384, 6)


def processor_for(config: Any) -> Any:
    """The image processor matching a config's crop size (built in code, offline)."""
    from transformers import VitPoseImageProcessor

    height, width = config.backbone_config.image_size
    return VitPoseImageProcessor(size={"height": int(height), "width": int(width)})


def build_vitpose(config: Any, seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)`` with random weights from ``config`` (seeded)."""
    from transformers import VitPoseForPoseEstimation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitPoseForPoseEstimation(config)
    return model.eval(), processor_for(config)


def save_vitpose(model: Any, processor: Any, folder: str | Path) -> None:
    """A ViTPose folder as the hub has it (config, safetensors, preprocessor config)."""
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def load_vitpose(folder: str) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder, offline; a folder without a
    preprocessor config gets the default processor at the model's crop size."""
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

    model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True)
    if (Path(folder) / "preprocessor_config.json").exists():
        processor = VitPoseImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        processor = processor_for(model.config)
    return model.eval(), processor


class PoseEstimator:
    """Top-down ViTPose over every person of every image, in sub-batches of
    ``micro_batch`` persons (crops are made per sub-batch, so memory stays bounded)."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.device, self.dtype = processor, device, dtype
        self.moe = int(getattr(model.config.backbone_config, "num_experts", 1) or 1) > 1

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], micro_batch: int
    ) -> list[np.ndarray]:
        """COCO-17 keypoints ``[N_i, 17, 3]`` (x, y, score in image pixels) of each
        image's ``[N_i, 4]`` xyxy boxes."""
        from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

        persons = [(i, j) for i, b in enumerate(boxes) for j in range(len(b))]
        out = [np.zeros((len(b), 17, 3), dtype=np.float64) for b in boxes]
        for part in chunks(persons, micro_batch):
            by_image: dict[int, list[int]] = {}
            for i, j in part:
                by_image.setdefault(i, []).append(j)
            order = sorted(by_image)
            xywh = [
                [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes[i][by_image[i]].tolist()]
                for i in order
            ]
            inputs = self.processor(
                images=[images[i] for i in order], boxes=xywh, return_tensors="pt"
            )
            pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
            kwargs: dict[str, Any] = {}
            if self.moe:  # ViTPose+ experts: index 0 is COCO
                kwargs["dataset_index"] = torch.zeros(
                    len(pixels), dtype=torch.long, device=self.device
                )
            heatmaps = self.model(pixel_values=pixels, **kwargs).heatmaps.float().cpu()
            results = self.processor.post_process_pose_estimation(
                VitPoseEstimatorOutput(heatmaps=heatmaps), boxes=xywh
            )
            for i, per_image in zip(order, results, strict=True):
                for j, person in zip(by_image[i], per_image, strict=True):
                    out[i][j, :, :2] = person["keypoints"].numpy()
                    out[i][j, :, 2] = person["scores"].numpy().reshape(-1)
        return out


def load_pose_estimator(
    weights: str, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> PoseEstimator:
    """From a local ViTPose folder or ``random-tiny``."""
    from datagen.stages.models.common import RANDOM_TINY

    if weights == RANDOM_TINY:
        model, processor = build_vitpose(tiny_vitpose_config(), seed)
    else:
        model, processor = load_vitpose(weights)
    return PoseEstimator(model, processor, device, dtype)
