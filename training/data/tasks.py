"""Which views a training sample shows and what its prompt says, per task.

Everything here is plain data and string building on top of the contract in
:mod:`datagen.schema`; no decoding, no randomness (callers pass their draws).

Views: view 0 is always the target, the rest are conditions (DESIGN.md). For a
map task the forward direction (``canny2image``) has the image as target and
the map as condition; the reverse (understanding) direction (``image2canny``)
swaps them and keeps the same task token, as the released model does.

Prompts follow the released OneDiffusion inference code (``format_prompt`` in
its demo, ``PROMPT_GUIDE.md``): single-condition tasks are
``"[[canny2image]] <caption>"`` with no per-image marker; semantic / box tasks
put the colour tags between token and caption
(``"[[semanticmap2image]] <#FF0000 red mask: cat> <caption>"``); multi-image
tasks caption each image after its marker
(``"[[faceid]] [[img0]] <target caption> [[img1]] <ref caption> ..."``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datagen.schema import (
    MAP_TASKS,
    PALETTE,
    SUBSETS,
    TASK_FAMILIES,
    TASKS,
    color_tag,
    image_marker,
    neutralise_controls,
)

# Task families for the default mixing budget (the paper's equal split): the subsets'
# ``family`` in the schema.
FAMILIES: dict[str, tuple[str, ...]] = {
    family: tuple(s.name for s in SUBSETS.values() if s.family == family)
    for family in TASK_FAMILIES
}

# Map-task token -> the field holding the map, and the short name used in the
# reverse task's name (``image2<name>``). Degradation tasks have no reverse.
MAP_FIELDS: dict[str, tuple[str, str]] = {
    t.token: (t.fields[1], t.map_name) for t in TASKS.values() if t.reversible
}
DEGRADATION_FIELDS: dict[str, str] = {
    t.token: t.fields[1] for t in TASKS.values() if t.layout == "pair" and not t.reversible
}
# Tags attached to the prompt for these tokens: (kind for color_tag).
TAG_KINDS: dict[str, str] = {t.token: t.tag_kind for t in TASKS.values() if t.tag_kind}

_HEX_TO_NAME = {h.upper(): n for h, n in PALETTE}
_NAMES = {n for _, n in PALETTE}


@dataclass(frozen=True)
class TaskSpec:
    """One concrete task: its logging name, its token and its views (fields).

    ``views[0]`` is the target field; ``views[1:]`` are condition fields.
    """

    name: str
    token: str
    views: tuple[str, ...]

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def cond_mask(self) -> list[bool]:
        return [False] + [True] * (len(self.views) - 1)


# Sample kinds whose views are fixed by the task (the rest are built per sample).
FIXED_LAYOUTS: tuple[str, ...] = ("single", "pair")


def forward_task(token: str) -> TaskSpec:
    task = TASKS.get(token)
    if task is None or task.layout not in FIXED_LAYOUTS:
        raise NotImplementedError(
            f"task {token} has no fixed two-view layout (faceid/multiview are built per sample)"
        )
    return TaskSpec(task.name, token, task.fields)


def reverse_task(token: str) -> TaskSpec:
    if token not in MAP_TASKS or token not in MAP_FIELDS:
        raise ValueError(f"{token} has no reverse direction")
    field, short = MAP_FIELDS[token]
    return TaskSpec(f"image2{short}", token, (field, "jpg"))


def layout_task_names(token: str) -> tuple[str, ...]:
    """The task names trained under ``token`` (both directions of a map task)."""
    layout = TASKS[token].layout
    if layout == "faceid":
        return ("faceid",)
    if layout == "multiview":
        return MULTIVIEW_TASKS
    if layout in FIXED_LAYOUTS:
        names = (forward_task(token).name,)
        return (*names, reverse_task(token).name) if token in MAP_FIELDS else names
    return ()


def faceid_task(num_views: int) -> TaskSpec:
    """img0 is the target, img1..img{V-1} the references."""
    if num_views < 2:
        raise ValueError("faceid needs at least 2 views")
    return TaskSpec("faceid", "[[faceid]]", tuple(f"img{i}.jpg" for i in range(num_views)))


# Multiview samples train two tasks under the one released token: novel views (the first
# k images and every camera clean, the other images generated) and camera-pose estimation
# (every image clean, the cameras of views 1.. generated as Plücker ray views).
MULTIVIEW_TASKS: tuple[str, ...] = ("multiview", "camera_pose")


@dataclass(frozen=True)
class MultiviewLayout:
    """A multiview sample as the model sees it: image and ray views alternate
    (img0, ray0, img1, ray1, ...), as the released pipeline lays them out; ``cond_mask``
    covers those 2 x ``num_images`` views."""

    name: str  # "multiview" or "camera_pose"
    num_images: int
    clean_images: int  # images 0..clean_images-1 are conditions

    @property
    def cond_mask(self) -> list[bool]:
        mask = []
        for i in range(self.num_images):
            mask.append(i < self.clean_images)  # image view i
            # ray view i: every camera is given for novel views; camera 0 (the identity)
            # anchors pose estimation
            mask.append(self.name == "multiview" or i == 0)
        return mask


def multiview_layout(name: str, num_images: int, u: float = 0.0) -> MultiviewLayout:
    """``multiview``: 1..num_images-1 clean images (``u`` in [0, 1) picks how many);
    ``camera_pose``: all images clean."""
    if name not in MULTIVIEW_TASKS:
        raise ValueError(f"{name!r} is not a multiview task ({', '.join(MULTIVIEW_TASKS)})")
    if num_images < 2:
        raise ValueError(f"a multiview sample needs at least 2 images, got {num_images}")
    if name == "camera_pose":
        return MultiviewLayout(name, num_images, num_images)
    clean = 1 + min(int(u * (num_images - 1)), num_images - 2)
    return MultiviewLayout(name, num_images, clean)


def all_task_names() -> list[str]:
    """Every task name this module can produce (for config validation)."""
    return [name for token in TASKS for name in layout_task_names(token)]


def task_token(name: str) -> str:
    """The prompt token of a task name: ``image2canny`` -> ``[[canny2image]]``."""
    for token in TASKS:
        if name in layout_task_names(token):
            return token
    raise KeyError(f"unknown task name {name!r}")


def task_spec(name: str, num_views: int = 2) -> TaskSpec:
    """The :class:`TaskSpec` of a task name, as the trainer builds it: ``depth2image`` ->
    views ``(jpg, depth.png)``, ``image2depth`` -> ``(depth.png, jpg)`` (the map is the
    target, view 0). ``num_views`` is used by faceid only (target + references)."""
    if name == "faceid":
        return faceid_task(num_views)
    if name in MULTIVIEW_TASKS:
        raise NotImplementedError(
            f"{name} samples interleave image and ray views: see multiview_layout"
        )
    token = task_token(name)
    if name.startswith("image2"):
        return reverse_task(token)
    return forward_task(token)


def subset_task_names(subset: str) -> list[str]:
    """Every task name a subset can train (both directions of its map tasks)."""
    return [name for token in SUBSETS[subset].tasks for name in layout_task_names(token)]


def candidate_tasks(
    subset: str,
    fields: Sequence[str] | set[str],
    meta: Mapping[str, Any],
    allowed: set[str] | None = None,
) -> list[tuple[TaskSpec, TaskSpec | None]]:
    """The (forward, reverse-or-None) task pairs a sample of ``subset`` supports.

    A task counts when the subset trains it, the sample's metadata lists its
    token and the fields it needs are present. ``allowed`` (task names)
    filters; a pair survives if either direction is allowed (the disallowed
    direction is returned as None / dropped by the caller).
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}")
    present = set(fields)
    listed = set(meta.get("tasks") or SUBSETS[subset].tasks)
    out: list[tuple[TaskSpec, TaskSpec | None]] = []
    for token in SUBSETS[subset].tasks:
        if token not in listed or TASKS[token].layout not in FIXED_LAYOUTS:
            continue
        fwd = forward_task(token)
        if not set(fwd.views) <= present:
            continue
        rev = reverse_task(token) if token in MAP_FIELDS else None
        if allowed is not None:
            fwd_ok, rev_ok = fwd.name in allowed, rev is not None and rev.name in allowed
            if not (fwd_ok or rev_ok):
                continue
            out.append((fwd if fwd_ok else None, rev if rev_ok else None))  # type: ignore[arg-type]
            continue
        out.append((fwd, rev))
    return out


def choose_task(
    pairs: list[tuple[TaskSpec | None, TaskSpec | None]],
    u_task: float,
    u_direction: float,
    reverse_prob: float,
) -> TaskSpec | None:
    """Pick a pair uniformly with ``u_task`` in [0, 1), then the reverse
    direction with probability ``reverse_prob`` (when both exist)."""
    if not pairs:
        return None
    fwd, rev = pairs[min(int(u_task * len(pairs)), len(pairs) - 1)]
    if fwd is None:
        return rev
    if rev is None:
        return fwd
    return rev if u_direction < reverse_prob else fwd


def _colour_name(value: Any, index: int) -> str:
    """An entity's colour as a palette name: a name, a hex code or an index."""
    if isinstance(value, str):
        if value in _NAMES:
            return value
        name = _HEX_TO_NAME.get(value.upper())
        if name:
            return name
    if isinstance(value, int) and not isinstance(value, bool):
        return PALETTE[value % len(PALETTE)][1]
    if value is None:
        return PALETTE[index % len(PALETTE)][1]
    raise ValueError(f"entity colour {value!r} is not in the palette")


def colour_tags(entities: Sequence[Mapping[str, Any]] | None, kind: str) -> list[str]:
    """``<#FF0000 red mask: cat>`` per entity, in the stored order; an entity
    without a colour gets the palette colour of its position (the datagen
    painting rule: entities take palette colours in order). Entities that are not a list
    of objects are a ``ValueError`` (the sample's metadata is wrong)."""
    if entities is not None and not isinstance(entities, list | tuple):
        raise ValueError(f"entities must be a list, got {type(entities).__name__}")
    tags = []
    for i, entity in enumerate(entities or []):
        if not isinstance(entity, Mapping):
            raise ValueError(f"entity {i} must be an object, got {type(entity).__name__}")
        label = str(entity.get("label", "")).strip()
        if not label:
            continue
        tags.append(color_tag(_colour_name(entity.get("color"), i), kind, label))
    return tags


def plain_text(text: str) -> str:
    """A caption without prompt control syntax (``datagen.schema.neutralise_controls``)."""
    return neutralise_controls(text)[0]


def build_prompt(
    task: TaskSpec,
    caption: str | Sequence[str],
    meta: Mapping[str, Any] | None = None,
    drop_caption: bool = False,
) -> str:
    """The training prompt for one sample. ``caption`` is one string, or one
    per view for multi-image tasks. Caption dropout empties the caption(s) but
    keeps the task token, the image markers and the colour tags (the tags say
    which colour means what, which both directions need)."""
    # Shards made before datagen neutralised captions (or by other tools) may still carry
    # control syntax in a caption: only the builder writes tokens, markers and tags.
    caption = plain_text(caption) if isinstance(caption, str) else [plain_text(c) for c in caption]
    parts = [task.token]
    if task.token in TAG_KINDS:
        parts += colour_tags((meta or {}).get("entities"), TAG_KINDS[task.token])
    if TASKS[task.token].layout == "faceid":
        captions = [caption] * task.num_views if isinstance(caption, str) else list(caption)
        if len(captions) < task.num_views:
            captions += [""] * (task.num_views - len(captions))
        for i in range(task.num_views):
            parts.append(image_marker(i))
            if not drop_caption and captions[i].strip():
                parts.append(captions[i].strip())
        return " ".join(parts)
    text = caption if isinstance(caption, str) else (caption[0] if caption else "")
    if not drop_caption and text.strip():
        parts.append(text.strip())
    return " ".join(parts)
