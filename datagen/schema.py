"""The One-Gen sample contract: what datagen writes and training reads (training imports
only this, ``datagen.shards`` and ``datagen.cameras`` from datagen). Its tables say what
the rest derives: fields and codecs, ``TASKS`` (token -> layout, fields, reversible, tag
kind), ``SUBSETS`` with their family and sample kind, prompts and the palette.

A sample is one WebDataset group: files ``<key>.<field>`` stored together in a
tar. ``<field>`` is a name plus a codec extension (``depth.png``), because
WebDataset decodes by the last extension. Every sample carries ``json``
metadata. The writer validates before a sample is committed and the training
reader validates after it is read, so a contract change breaks loudly on both
sides. Bump ``SCHEMA_VERSION`` on any incompatible change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

SCHEMA_VERSION = "1.0"

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")

# How a sample of a subset is laid out as training views (its tasks' ``layout``):
# ``single``: the target image alone; ``pair``: the target and one condition field (a map
# or a degraded copy); ``faceid``: photos of one person, img0 the target; ``multiview``:
# views of one scene, each with its camera (image and ray views alternate).
SAMPLE_KINDS: tuple[str, ...] = ("single", "pair", "faceid", "multiview")

# Task families: the default mix gives each the same budget (the paper's equal split).
TASK_FAMILIES: tuple[str, ...] = ("text2image", "image2image", "multiview_id")


@dataclass(frozen=True)
class Task:
    """A task token and what training builds from it.

    ``fields``: the views it shows, target first (a ``pair``'s second field is its
    condition; ``{i}`` marks per-view fields). ``reversible``: also trained the other way
    round (image -> map, "understanding") under the same token. ``tag_kind``: the prompt
    carries one colour tag (``color_tag``) of this kind per entity. ``layout`` None: a
    released token no One-Gen subset trains yet.
    """

    token: str
    layout: str | None
    fields: tuple[str, ...] = ()
    reversible: bool = False
    tag_kind: str | None = None

    @property
    def name(self) -> str:
        """The forward task's name: the token without brackets (``canny2image``)."""
        return self.token.strip("[]")

    @property
    def map_name(self) -> str:
        """What a reversible task's map is called: ``canny`` (its reverse: ``image2canny``)."""
        return self.name.split("2", 1)[0]


# Every released task token, spelled exactly as the released OneDiffusion code spells it,
# in its order.
TASKS: dict[str, Task] = {
    t.token: t
    for t in (
        Task("[[text2image]]", "single", ("jpg",)),
        Task("[[deblurring]]", "pair", ("jpg", "blur.jpg")),
        Task("[[image_inpainting]]", "pair", ("jpg", "masked.jpg")),
        Task("[[canny2image]]", "pair", ("jpg", "canny.png"), reversible=True),
        Task("[[depth2image]]", "pair", ("jpg", "depth.png"), reversible=True),
        Task("[[hed2img]]", "pair", ("jpg", "hed.png"), reversible=True),
        Task("[[pose2image]]", "pair", ("jpg", "pose.png"), reversible=True),
        Task(
            "[[semanticmap2image]]",
            "pair",
            ("jpg", "semantic.png"),
            reversible=True,
            tag_kind="mask",
        ),
        Task(
            "[[boundingbox2image]]",
            "pair",
            ("jpg", "boxes.png"),
            reversible=True,
            tag_kind="boundingbox",
        ),
        Task("[[image_editing]]", None),
        Task("[[faceid]]", "faceid", ("img{i}.jpg",)),
        Task("[[multiview]]", "multiview", ("img{i}.jpg", "cameras.npy", "intrinsics.npy")),
        Task("[[subject_driven]]", None),
    )
}
TASK_LABELS: tuple[str, ...] = tuple(TASKS)

# Map tasks run in both directions with the same token: forward (map -> image)
# and reverse, i.e. understanding (image -> map). Which view is the target is
# recorded by the training reader; the token does not change.
MAP_TASKS: frozenset[str] = frozenset(t.token for t in TASKS.values() if t.reversible)


def image_marker(index: int) -> str:
    """The per-image marker that precedes each view's caption in a prompt."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return f"[[img{index}]]"


# Prompt control syntax: task tokens and image markers (``[[depth2image]]``, ``[[img1]]``)
# and colour tags (``<#FF0000 red mask: cat>``). In a caption (a VLM's answer, a user's
# .txt, web alt text) they would teach the model a task token or a colour binding the
# sample does not have.
_CONTROL_TOKEN = re.compile(r"\[\[\s*([^\[\]]{0,64}?)\s*\]\]")
_COLOUR_TAG = re.compile(r"<\s*#[0-9A-Fa-f]{3,8}\b([^<>]{0,200})>")
_STRAY_BRACKETS = re.compile(r"\[\[|\]\]")


def neutralise_controls(text: str) -> tuple[str, int]:
    """``text`` with the prompt control syntax made plain words, and how many pieces were
    changed: ``[[faceid]]`` -> ``faceid``, ``<#FF0000 red mask: cat>`` -> ``cat`` (the
    label; the colour words when there is none), a stray ``[[`` / ``]]`` -> ``[`` / ``]``.
    What a caption says stays; only the syntax the prompt builder owns goes."""
    count = 0

    def token(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return m.group(1)

    def tag(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        body = m.group(1)
        return (body.split(":", 1)[1] if ":" in body else body).strip()

    text = _COLOUR_TAG.sub(tag, _CONTROL_TOKEN.sub(token, text))
    text, stray = _STRAY_BRACKETS.subn(lambda m: m.group(0)[0], text)
    return re.sub(r"[ \t]{2,}", " ", text).strip() if count + stray else text, count + stray


# The released model's named colour palette (its PROMPT_GUIDE), in its order. Each
# entity of a sample gets a distinct colour drawn at random from it, deterministic
# from key and seed (datagen.stages.segment_render.entity_colours), as the paper
# assigns random colours: always starting at red would tie "red" to "first entity".
PALETTE: tuple[tuple[str, str], ...] = (
    ("#FF0000", "red"),
    ("#00FF00", "lime"),
    ("#0000FF", "blue"),
    ("#FFFF00", "yellow"),
    ("#FF00FF", "magenta"),
    ("#00FFFF", "cyan"),
    ("#FFA500", "orange"),
    ("#800080", "purple"),
    ("#A52A2A", "brown"),
    ("#008000", "green"),
    ("#FFC0CB", "pink"),
    ("#008080", "teal"),
    ("#FF8C00", "darkorange"),
    ("#8A2BE2", "blueviolet"),
    ("#006400", "darkgreen"),
    ("#FF4500", "orangered"),
    ("#000080", "navy"),
    ("#FFD700", "gold"),
    ("#40E0D0", "turquoise"),
    ("#DA70D6", "orchid"),
)
_PALETTE_BY_NAME = {name: hexcode for hexcode, name in PALETTE}


def palette_rgb(index: int) -> tuple[int, int, int]:
    hexcode = PALETTE[index % len(PALETTE)][0]
    return tuple(int(hexcode[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def color_tag(color_name: str, kind: str, label: str) -> str:
    """``<#FFFF00 yellow mask: mouse>``; kind is ``mask`` or ``boundingbox``."""
    if color_name not in _PALETTE_BY_NAME:
        raise ValueError(f"colour {color_name!r} is not in the palette")
    if kind not in ("mask", "boundingbox"):
        raise ValueError(f"tag kind must be 'mask' or 'boundingbox', got {kind!r}")
    return f"<{_PALETTE_BY_NAME[color_name]} {color_name} {kind}: {label}>"


@dataclass(frozen=True)
class Field:
    """One file of a sample. ``name`` may hold ``{i}`` for per-view fields."""

    name: str
    description: str
    required: bool = True

    @property
    def codec(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def per_view(self) -> bool:
        return "{i}" in self.name

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.name).replace(r"\{i\}", r"(0|[1-9][0-9]*)") + "$")


@dataclass(frozen=True)
class Subset:
    """A One-Gen subset: its files, its metadata keys and the tasks it trains."""

    name: str
    fields: tuple[Field, ...]
    tasks: tuple[str, ...]
    family: str  # one of TASK_FAMILIES
    meta_keys: tuple[str, ...] = ()
    min_views: int = 1
    # Kept in the json when a stage produced them, not required (nor a reason to run
    # a stage): the source's own caption beside a VLM caption, which model made it.
    optional_meta_keys: tuple[str, ...] = ()
    description: str = ""

    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def kind(self) -> str:
        """The sample kind (one of SAMPLE_KINDS): the layout its tasks share."""
        kinds = {TASKS[t].layout for t in self.tasks}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"subset {self.name!r}: its tasks must share one layout, got {kinds}")
        return kinds.pop()  # type: ignore[return-value]


# Metadata every sample's json carries, whatever its subset.
COMMON_META_KEYS: tuple[str, ...] = ("key", "subset", "schema_version", "source", "tasks")

_IMAGE = Field("jpg", "the target RGB image (JPEG)")
# With a caption stage, ``caption`` (and ``txt``) hold the VLM's caption and these say
# where it came from; ``source_caption`` is the input's own caption, when it had one.
CAPTION_META_KEYS: tuple[str, ...] = (
    "caption_model",
    "source_caption",
    "entity_names",
    "controls_removed",  # prompt control syntax taken out of the captions (neutralise_controls)
)
_JSON = Field("json", "metadata: COMMON_META_KEYS plus the subset's meta_keys")

SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset(
            "t2i",
            (_IMAGE, Field("txt", "the caption, plain UTF-8"), _JSON),
            ("[[text2image]]",),
            family="text2image",
            meta_keys=("caption", "width", "height"),
            optional_meta_keys=CAPTION_META_KEYS,
            description="image + caption (the source's, or a VLM's with a caption stage)",
        ),
        Subset(
            "i2i",
            (
                _IMAGE,
                Field("canny.png", "Canny edges, 8-bit gray, white edges on black"),
                Field("hed.png", "soft edges (HED-like), 8-bit gray"),
                Field("blur.jpg", "the image blurred (gaussian or motion)"),
                Field("lowres.jpg", "the image downscaled, kept at its small size"),
                Field("masked.jpg", "the image with the inpainting mask filled"),
                Field("mask.png", "inpainting mask, 8-bit gray, 255 = hole"),
                _JSON,
            ),
            (
                "[[canny2image]]",
                "[[hed2img]]",
                "[[deblurring]]",
                "[[image_inpainting]]",
            ),
            family="image2image",
            meta_keys=("caption", "width", "height", "degradations"),
            optional_meta_keys=CAPTION_META_KEYS,
            description="cheap image-to-image pairs computed without a model",
        ),
        Subset(
            "semantic",
            (
                _IMAGE,
                Field("semantic.png", "entity masks painted in palette colours on black"),
                Field("boxes.png", "entity boxes drawn in palette colours on black"),
                _JSON,
            ),
            ("[[semanticmap2image]]", "[[boundingbox2image]]"),
            family="image2image",
            meta_keys=(
                "caption",
                "width",
                "height",
                "entities",
                "entities_dropped",
                "segment_model",
            ),
            optional_meta_keys=CAPTION_META_KEYS,
            description=(
                "grounded SAM masks and boxes per entity; entities: [{label, color, hex, "
                "mask_tag, box_tag, boxes [[x0, y0, x1, y1]], scores, mask (COCO RLE)}], "
                "entities_dropped: the VLM's entities the detector did not find"
            ),
        ),
        Subset(
            "depth",
            (_IMAGE, Field("depth.png", "16-bit relative inverse depth, near = bright"), _JSON),
            ("[[depth2image]]",),
            family="image2image",
            meta_keys=("caption", "width", "height", "depth_model", "depth_min", "depth_max"),
            optional_meta_keys=CAPTION_META_KEYS,
            description="depth_min/depth_max: the prediction's range before min-max scaling",
        ),
        Subset(
            "pose",
            (_IMAGE, Field("pose.png", "rendered skeletons on black"), _JSON),
            ("[[pose2image]]",),
            family="image2image",
            meta_keys=("caption", "width", "height", "people", "pose_model"),
            optional_meta_keys=CAPTION_META_KEYS,
            description="people: [{box, keypoints [[x, y, score] * 17]}] (COCO order)",
        ),
        Subset(
            "multiview",
            (
                Field("img{i}.jpg", "view i of the scene"),
                Field(
                    "cameras.npy",
                    "float32 [V, 4, 4] OpenCV camera-to-world in camera 0's PyTorch3D view "
                    "frame (the release's): camera 0 = diag(-1, -1, 1, 1)",
                ),
                Field("intrinsics.npy", "float32 [V, 3, 3] pixel intrinsics of each view"),
                _JSON,
            ),
            ("[[multiview]]",),
            family="multiview_id",
            meta_keys=(
                "scene",
                "caption",
                "captions",
                "num_views",
                "width",
                "height",
                "frames",
                "camera_scale",
            ),
            min_views=2,
            optional_meta_keys=("caption_model", "source_caption"),
            description=(
                "views of one scene, centre-cropped square; caption: the scene's (a VLM's of "
                "view 0, the source's, or empty), captions: per-view source captions; frames: "
                "the scene's frame index of each view; camera_scale: the factor applied to "
                "translations by the normalisation; Plücker rays are recomputed from the "
                "cameras at any resolution"
            ),
        ),
        Subset(
            "faceid",
            (Field("img{i}.jpg", "image i of one identity; img0 is the target"), _JSON),
            ("[[faceid]]",),
            family="multiview_id",
            meta_keys=("identity", "captions", "num_views"),
            min_views=2,
            optional_meta_keys=("caption_model", "face_boxes"),
            description=(
                "several photos of one person, img0 the target; captions: one per image (a "
                "VLM's or the manifest's); face_boxes: the face found in each, when a face "
                "check ran"
            ),
        ),
    )
}


def _check_tables() -> None:
    """The tables agree: every subset trains known tokens of one layout, in a known family,
    from fields it has; tags are of a kind ``color_tag`` writes. Run at import."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"datagen.schema tables: {what}")

    for t in TASKS.values():
        need(t.layout is None or t.layout in SAMPLE_KINDS, f"{t.token}: layout {t.layout!r}")
        need(t.tag_kind in (None, "mask", "boundingbox"), f"{t.token}: tag_kind {t.tag_kind!r}")
        reversible_ok = not t.reversible or (t.layout == "pair" and len(t.fields) == 2)
        need(reversible_ok, f"{t.token}: a reversible task is a pair of two fields")
    for s in SUBSETS.values():
        need(s.family in TASK_FAMILIES, f"subset {s.name!r}: family {s.family!r}")
        need(bool(s.tasks) and all(t in TASKS for t in s.tasks), f"{s.name!r}: unknown tasks")
        s.kind  # noqa: B018 - raises when its tasks mix layouts
        names = set(s.field_names())
        for t in s.tasks:
            need(set(TASKS[t].fields) <= names, f"subset {s.name!r} lacks the fields of {t}")


_check_tables()


class SchemaError(ValueError):
    """A sample breaks the contract; the message says which rule."""


def validate_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise SchemaError(
            f"invalid sample key {key!r}: keys are 1-200 chars of [A-Za-z0-9_-] (no dots, "
            "WebDataset splits samples at the first dot)"
        )


def _match_field(subset: Subset, name: str) -> tuple[Field, int | None] | None:
    for f in subset.fields:
        if f.per_view:
            m = f.pattern().match(name)
            if m:
                return f, int(m.group(1))
        elif f.name == name:
            return f, None
    return None


def validate_sample(subset_name: str, sample: Mapping[str, object]) -> dict:
    """Check one sample against its subset's contract; return its parsed metadata.

    ``sample`` maps ``__key__`` and field names (``jpg``, ``depth.png``, ...) to
    bytes, the shape both ``webdataset`` without decoding and the shard writer
    use. Raises :class:`SchemaError` naming the broken rule.
    """
    if subset_name not in SUBSETS:
        raise SchemaError(f"unknown subset {subset_name!r}; known: {sorted(SUBSETS)}")
    subset = SUBSETS[subset_name]
    key = sample.get("__key__")
    validate_key(key)  # type: ignore[arg-type]

    views: dict[str, set[int]] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        matched = _match_field(subset, name)
        if matched is None:
            raise SchemaError(f"{key}: field {name!r} is not part of subset {subset_name!r}")
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
            raise SchemaError(f"{key}: field {name!r} is empty or not bytes")
        f, view = matched
        if view is not None:
            views.setdefault(f.name, set()).add(view)

    for f in subset.fields:
        if not f.required:
            continue
        if f.per_view:
            got = views.get(f.name, set())
            if len(got) < subset.min_views:
                raise SchemaError(
                    f"{key}: subset {subset_name!r} needs at least {subset.min_views} "
                    f"views of {f.name!r}, got {len(got)}"
                )
            if got != set(range(len(got))):
                raise SchemaError(
                    f"{key}: views of {f.name!r} are not numbered 0..n-1: {sorted(got)}"
                )
        elif f.name not in sample:
            raise SchemaError(f"{key}: missing required field {f.name!r}")

    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))  # type: ignore[arg-type]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{key}: json metadata does not parse: {exc}") from exc
    if not isinstance(meta, dict):
        raise SchemaError(f"{key}: json metadata must be an object")
    missing = [k for k in COMMON_META_KEYS + subset.meta_keys if k not in meta]
    if missing:
        raise SchemaError(f"{key}: json metadata lacks {missing}")
    if meta["key"] != key:
        raise SchemaError(f"{key}: json key {meta['key']!r} does not match the sample key")
    if meta["subset"] != subset_name:
        raise SchemaError(f"{key}: json subset {meta['subset']!r} is not {subset_name!r}")
    if str(meta["schema_version"]).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(
            f"{key}: schema version {meta['schema_version']} is incompatible with {SCHEMA_VERSION}"
        )
    if not isinstance(meta["tasks"], list):
        raise SchemaError(f"{key}: tasks must be a list of task tokens, got {meta['tasks']!r}")
    bad_tasks = [t for t in meta["tasks"] if t not in subset.tasks]
    if not meta["tasks"] or bad_tasks:
        raise SchemaError(
            f"{key}: tasks {meta['tasks']} must be a non-empty subset of {list(subset.tasks)}"
        )
    return meta


def make_meta(key: str, subset_name: str, source: str, tasks: list[str], **fields: object) -> dict:
    """Metadata with the common keys filled in; the writer adds subset keys."""
    return {
        "key": key,
        "subset": subset_name,
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "tasks": tasks,
        **fields,
    }


def describe() -> dict:
    """The contract as plain data, for manifests and ``onegen datagen status``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "task_labels": list(TASK_LABELS),
        "tasks": {
            t.token: {
                "layout": t.layout,
                "fields": list(t.fields),
                "reversible": t.reversible,
                "tag_kind": t.tag_kind,
            }
            for t in TASKS.values()
        },
        "palette": [{"hex": h, "name": n} for h, n in PALETTE],
        "subsets": {
            s.name: {
                "fields": {f.name: f.description for f in s.fields},
                "tasks": list(s.tasks),
                "family": s.family,
                "kind": s.kind,
                "meta_keys": list(COMMON_META_KEYS + s.meta_keys),
                "optional_meta_keys": list(s.optional_meta_keys),
                "min_views": s.min_views,
            }
            for s in SUBSETS.values()
        },
    }
