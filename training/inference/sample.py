"""Generating from a checkpoint: its config, its EMA weights, the tasks as the trainer laid
them out (view 0 the target, view 1 the condition), each view written in its field's format.

    onegen sample --checkpoint runs/onegen-demo/<run>/checkpoints/step00000040.ckpt --task image2depth \\
        --image photo.jpg --out samples/

A released or ``onegen export``-ed folder samples the same way through a
:class:`ModelSource` (``onegen sample --weights``, ``training.inference.weights``).

The multiview tasks (image and ray views interleaved) are in ``training.inference.multiview``,
built on this module's checks and checkpoint reading; the sampler loop is
``training.inference.generate``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.api import CheckpointException

from model import NextDiT, NextDiTConfig
from training.checkpoint_io import checkpoint_meta, load_weights
from training.config import ConfigError, from_checkpoint, model_config, trained_tasks
from training.data.tasks import MULTIVIEW_TASKS, all_task_names, task_spec
from training.data.tasks import task_token as token_of
from training.encoders import FrozenEncoders, build_encoders, vae_stride
from training.errors import CheckpointError
from training.inference.generate import SamplerSettings, generate
from training.inference.grid import Panel, Row, render_grid, save_grid_image
from training.inference.images import load_image, save_view


class SampleUsageError(ConfigError):
    """A sampling request that is wrong as asked (a task, image, size or device the command
    line got wrong, or a task the checkpoint never trained), found before any weights are
    read; ``onegen sample`` reports it as a usage error (exit code 2)."""


def normalise_task(task: str) -> str:
    """``[[depth2image]]`` (a prompt token) or `` depth2image `` -> ``depth2image``."""
    return task.strip().strip("[]").strip()


def task_token(task: str) -> str:
    """The prompt token of a task the trainer builds (``image2depth`` -> ``[[depth2image]]``),
    or a SampleUsageError naming the tasks there are."""
    try:
        return token_of(normalise_task(task))
    except KeyError:
        raise SampleUsageError(
            f"unknown task {task!r}; tasks: {', '.join(all_task_names())}"
        ) from None


def sample_layout(task: str) -> tuple[str, tuple[str, ...]]:
    """``(token, fields)`` of a task ``onegen sample`` runs: the fields of its two views as
    the trainer lays them out (view 0 the target, view 1 the condition ``--image``), or one
    field for ``text2image``. ``depth2image``: ``(jpg, depth.png)``, the depth map is the
    condition; ``image2depth``: ``(depth.png, jpg)``, the photo is the condition and the
    depth map is generated. faceid: one reference image (view 1)."""
    token = task_token(task)
    spec = task_spec(normalise_task(task), num_views=2)
    return token, spec.views


def sample_prompt(task: str, prompt: str) -> str:
    """The prompt as the trainer builds it for a two-view sample of ``task`` (view 0 the
    target): ``[[depth2image]] a cat``; faceid marks each image and captions the target,
    ``[[faceid]] [[img0]] a cat [[img1]]`` (the release's PROMPT_GUIDE layout)."""
    from training.data.tasks import build_prompt, task_spec

    name = normalise_task(task)
    if name == "faceid":
        return build_prompt(task_spec(name, num_views=2), [prompt, ""])
    return f"{task_token(name)} {prompt}".strip()


_FIELD_WORDS = {
    "jpg": "a photo",
    "blur.jpg": "a blurred photo",
    "masked.jpg": "a masked photo",
    "boxes.png": "a bounding-box map",
    "semantic.png": "a semantic map",
}


def describe_field(field: str) -> str:
    """What a view of this field is, in words: ``depth.png`` -> ``a depth map``."""
    if field in _FIELD_WORDS:
        return _FIELD_WORDS[field]
    if field.startswith("img") and field.endswith(".jpg"):  # faceid: img0 target, img1.. refs
        return "a photo of the face"
    return f"a {field.split('.')[0]} map"


def check_options(
    *,
    size: int | None,
    steps: int | None,
    device: str,
    out_dir: str | Path | None,
) -> None:
    """The checks every task's request shares (size, steps, device, output folder)."""
    if size is not None and size <= 0:
        raise SampleUsageError(f"--size must be a positive number of pixels, got {size}")
    if steps is not None and steps <= 0:
        raise SampleUsageError(f"--steps must be at least 1, got {steps}")
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise SampleUsageError(
                f"--device {device!r} is not a device (auto, cpu, cuda, cuda:N)"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SampleUsageError(f"--device {device}: no CUDA device on this machine")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise SampleUsageError(f"--out {out_dir} exists and is not a folder")


def check_request(
    task: str,
    *,
    image: str | Path | None,
    size: int | None,
    steps: int | None = None,
    device: str = "cpu",
    out_dir: str | Path | None = None,
) -> tuple[str, str, tuple[str, ...]]:
    """The checks of a sampling request that need no checkpoint; ``(task, token, fields)``
    with the task name normalised, or a one-line :class:`SampleUsageError`."""
    task = normalise_task(task)
    if task in MULTIVIEW_TASKS:
        raise SampleUsageError(
            f"--task {task} interleaves image and ray views: sample it with "
            "training.inference.multiview.sample_multiview_from_checkpoint"
        )
    token, fields = sample_layout(task)
    if len(fields) == 1 and image is not None:
        raise SampleUsageError(f"--task {task} generates from the prompt alone: drop --image")
    if len(fields) > 1 and image is None:
        raise SampleUsageError(
            f"--task {task} needs --image: the {fields[1]} condition ({describe_field(fields[1])}"
            f", view 1) to generate {describe_field(fields[0])} ({fields[0]}, view 0) from"
        )
    check_options(size=size, steps=steps, device=device, out_dir=out_dir)
    return task, token, fields


def check_trained(task: str, cfg: DictConfig, checkpoint: str | Path) -> None:
    """A SampleUsageError unless a fit with the checkpoint's config trains ``task``."""
    trained = trained_tasks(cfg)
    if task not in trained:
        raise SampleUsageError(
            f"--task {task} was never trained by {checkpoint}: its config trains "
            f"{', '.join(trained) if trained else 'no task onegen sample runs'}"
        )


def check_size(side: int, stride: tuple[int, int], *, given: bool) -> None:
    """A SampleUsageError unless ``side`` divides into whole patches of latent pixels."""
    step = math.lcm(*stride)
    if side % step == 0:
        return
    lower, upper = side // step * step, (side // step + 1) * step
    hint = f"try {lower} or {upper}" if lower else f"try {upper}"
    what = f"--size {side}" if given else f"samples.resolution {side} (the default of its config)"
    raise SampleUsageError(
        f"{what} is not a multiple of {step}, the model's patch grid in pixels "
        f"(VAE downsampling x patch size): {hint}"
    )


def resolve_device(device: str) -> str:
    """``auto``: cuda when there is one, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def fit_config(checkpoint: str | Path) -> DictConfig:
    """The fit config a checkpoint was trained with, read from its metadata only (no
    weights): a ConfigError when it has none (not a OneGenModule checkpoint)."""
    meta = checkpoint_meta(checkpoint)
    if not meta.get("config"):
        raise ConfigError(f"{checkpoint} has no One-Gen config (not a OneGenModule checkpoint?)")
    return from_checkpoint(meta["config"])


def net_config(cfg: DictConfig, checkpoint: str | Path) -> NextDiTConfig:
    """The ``NextDiTConfig`` of a checkpoint's fit config, or a one-line ConfigError."""
    try:
        return model_config(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{checkpoint}: its model config is not valid ({exc})") from None


def patch_grid(cfg: DictConfig, mcfg: NextDiTConfig) -> tuple[int, int]:
    """The model's patch grid in pixels: the VAE's downsampling x the patch size."""
    down = vae_stride(cfg)
    return down * mcfg.patch_size[1], down * mcfg.patch_size[2]


def load_checkpoint_net(checkpoint: str | Path, mcfg: NextDiTConfig, weights: str) -> NextDiT:
    """The checkpoint's ``weights`` (ema or model) in a NextDiT on CPU; weights that do not
    fit the model are a one-line CheckpointError."""
    net = NextDiT(mcfg)
    try:
        load_weights(checkpoint, net, weights)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, CheckpointException) as exc:
        lines = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{checkpoint}: its {weights} weights do not load into the model its config "
            f"describes ({lines[-1] if lines else type(exc).__name__})"
        ) from None
    return net


def load_run_net(
    checkpoint: str | Path, cfg: DictConfig, mcfg: NextDiTConfig, weights: str
) -> NextDiT:
    """A run's checkpoint as a plain NextDiT on CPU: its ``weights``, or for a LoRA fit its
    base (``model.init_from``, checked by sha256) with those adapters merged in."""
    from training.lora import enabled

    if enabled(cfg):
        from training.init_from import load_lora_checkpoint

        return load_lora_checkpoint(checkpoint, cfg, mcfg, weights)
    return load_checkpoint_net(checkpoint, mcfg, weights)


def with_encoders(net: NextDiT, cfg: DictConfig, device: str) -> tuple[NextDiT, FrozenEncoders]:
    """``net`` in eval mode on ``device`` and the frozen encoders ``cfg`` names, the tiny
    text encoder as wide as the net's captions (its vocabulary in a temporary folder)."""
    net.eval().to(device)
    with tempfile.TemporaryDirectory(prefix="onegen-sample-vocab-") as vocab_dir:
        frozen = build_encoders(cfg, net.config.caption_dim, vocab_dir).to(device)
    return net, frozen


class ModelSource(Protocol):
    """A model to sample that is not a run's checkpoint (a released or exported folder,
    ``training.inference.weights``): :meth:`read` its configs (no tensor read, every check
    that needs none), then :meth:`load` its weights and encoders."""

    def read(self, task: str) -> tuple[DictConfig, NextDiTConfig, tuple[int, int]]:
        """``(cfg, model config, patch grid in pixels)``; ``cfg`` names the encoders and
        the sampler's defaults."""
        ...

    def load(
        self, cfg: DictConfig, mcfg: NextDiTConfig, device: str
    ) -> tuple[NextDiT, FrozenEncoders]: ...


Source = str | Path | ModelSource  # a checkpoint (file or sharded folder), or a ModelSource


def read_config(source: Source, task: str) -> tuple[DictConfig, NextDiTConfig, tuple[int, int]]:
    """``(cfg, model config, patch grid in pixels)`` of a checkpoint, read from its metadata
    only (no weights): a ConfigError when it has none, a SampleUsageError when its fit never
    trained ``task``. A :class:`ModelSource` reads its own."""
    if not isinstance(source, (str, Path)):
        return source.read(task)
    cfg = fit_config(source)
    check_trained(task, cfg, source)
    mcfg = net_config(cfg, source)
    return cfg, mcfg, patch_grid(cfg, mcfg)


def load_model(
    source: Source, cfg: DictConfig, mcfg: NextDiTConfig, weights: str, device: str
) -> tuple[NextDiT, FrozenEncoders]:
    """The checkpoint's ``weights`` (ema or model) in a NextDiT in eval mode, and the frozen
    encoders its config names; a :class:`ModelSource` loads its own."""
    if not isinstance(source, (str, Path)):
        return source.load(cfg, mcfg, device)
    return with_encoders(load_run_net(source, cfg, mcfg, weights), cfg, device)


def sample_from_checkpoint(
    checkpoint: Source,
    task: str,
    out_dir: str | Path,
    *,
    image: str | Path | None = None,
    prompt: str = "a photo",
    steps: int | None = None,
    guidance: float | None = None,
    size: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    device: str = "cpu",
) -> list[Path]:
    """Generate with a checkpoint's EMA (or ``weights``) weights, or a :class:`ModelSource`
    (a released or exported folder); writes one PNG per view plus a labelled grid.

    ``text2image`` generates one image from the prompt. Every other task generates view 0
    from the condition ``image`` (view 1), in the trainer's layout: the forward direction of
    a map task (``depth2image``, ``pose2image``) takes the map and makes a photo, the reverse
    (``image2depth``, ``image2pose``) takes a photo and makes the map. Each view is written
    in its field's format (a depth map as a 16-bit gray PNG, see :func:`save_view`).

    Checked in this order, before any weights are read: the request itself
    (:func:`check_request`), then the source's config (a checkpoint's fit trained the task;
    the size fits the patch grid), then the condition image. ``out_dir`` is created only when the
    PNGs are written, and holds nothing but them (the tiny text encoder's vocabulary goes to
    a temporary folder)."""
    task, token, fields = check_request(
        task, image=image, size=size, steps=steps, device=device, out_dir=out_dir
    )
    device = resolve_device(device)
    cfg, mcfg, stride = read_config(checkpoint, task)
    side = int(size or cfg.samples.resolution)
    if image is None or size is not None:
        check_size(side, stride, given=size is not None)
    cond_pixels = cond_mask = None
    views = 1
    if image is not None:  # its own size rounded down to the patch grid unless --size
        cond = load_image(image, (side, side) if size else None, multiple=math.lcm(*stride))
        cond_pixels = torch.stack([torch.zeros_like(cond), cond])[None]  # view 0 = target
        cond_mask = torch.tensor([[False, True]])
        views = 2
    net, frozen = load_model(checkpoint, cfg, mcfg, weights, device)
    pixels = generate(
        lambda x, t, txt, m: net(x, t, txt, m),
        frozen,
        [sample_prompt(task, prompt)],
        SamplerSettings.from_config(cfg, steps=steps, guidance=guidance, seed=seed),
        views=views,
        size=(side, side),
        cond_pixels=cond_pixels,
        cond_mask=cond_mask,
        device=torch.device(device),
    )[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, panels = [], []
    for v in range(pixels.shape[0]):
        role = "condition" if cond_mask is not None and bool(cond_mask[0, v]) else "generated"
        paths.append(save_view(pixels[v], fields[v], out / f"{task}_view{v}_{role}.png"))
        panels.append(Panel(pixels[v], role))
    grid = render_grid([Row(task, prompt, panels)], int(cfg.samples.cell))
    paths.append(save_grid_image(grid, out / f"{task}_grid.png"))
    return paths
