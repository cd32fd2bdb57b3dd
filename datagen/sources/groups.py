"""Group manifests: one row per multi-view sample (a scene's views, an identity's images).

A group row lists its views in per-view list columns (``uri``, ``byte_offset``,
``byte_size``, ``source_error``, ``view_caption``), so the per-view stages (decode, face,
caption) run on each view as on an item (:mod:`datagen.stages.runner`), and carries what belongs
to the whole group: ``group`` (the scene or identity id), ``group_caption``, ``source``
(where it was read), the ``frames`` it picked, and for scenes the cameras (OpenCV
camera-to-world, row-major, 16 floats per view), the pixel intrinsics (9 per view) and the
image size (W, H) those intrinsics refer to (``sizes``, 2 per view).

Sources choose the views here, on the driver, from names and cameras only: one row is
one sample, so a key is written, quarantined or filtered exactly once, and the choice is
a pure function of (key, seed), so a rerun resumes the same samples. A group that cannot
be a sample at all (an identity with too few images) keeps its row with ``group_filter``
(or ``group_error``): the first stage reports it, named, instead of it vanishing.

There is no ``caption`` column: a group's ``caption`` is the caption stage's (read as
its metadata), per-view source captions are ``view_caption``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from datagen.schema import KEY_PATTERN
from datagen.seeded import seeded_rng

GROUP_MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.list_(pa.string())),
        ("byte_offset", pa.list_(pa.int64())),
        ("byte_size", pa.list_(pa.int64())),
        ("source_error", pa.list_(pa.string())),
        ("view_caption", pa.list_(pa.string())),
        ("views", pa.int32()),
        ("group", pa.string()),
        ("group_caption", pa.string()),
        ("group_error", pa.string()),
        ("group_filter", pa.string()),
        ("source", pa.string()),
        ("frames", pa.list_(pa.int32())),
        ("cameras", pa.list_(pa.float64())),
        ("intrinsics", pa.list_(pa.float64())),
        ("sizes", pa.list_(pa.int32())),
    ]
)
# Group-level columns the stage runner and the sink read (datagen.stages.runner, pipelines.sink).
GROUP_COLUMNS: tuple[str, ...] = (
    "views",
    "group",
    "group_caption",
    "group_error",
    "group_filter",
    "source",
    "frames",
    "cameras",
    "intrinsics",
    "sizes",
    "view_caption",
)
_PER_VIEW = ("uri", "byte_offset", "byte_size", "source_error", "view_caption")


class GroupManifestError(ValueError):
    """A group manifest that cannot be used as built (a bug in a source, or a user's
    manifest with broken rows); the message names the key."""


def group_row(
    key: str,
    group: str,
    source: str,
    uris: Sequence[str],
    *,
    frames: Sequence[int] | None = None,
    view_captions: Sequence[str | None] | None = None,
    source_errors: Sequence[str | None] | None = None,
    byte_offsets: Sequence[int | None] | None = None,
    byte_sizes: Sequence[int | None] | None = None,
    group_caption: str | None = None,
    cameras: np.ndarray | None = None,
    intrinsics: np.ndarray | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    group_error: str | None = None,
    group_filter: str | None = None,
) -> dict[str, Any]:
    """One group row; ``cameras`` [V, 4, 4] OpenCV camera-to-world, ``intrinsics`` [V, 3, 3]
    in pixels of ``sizes`` (W, H) per view."""
    v = len(uris)
    none: list[Any] = [None] * v
    return {
        "key": key,
        "uri": list(uris),
        "byte_offset": list(byte_offsets) if byte_offsets is not None else none,
        "byte_size": list(byte_sizes) if byte_sizes is not None else none,
        "source_error": list(source_errors) if source_errors is not None else none,
        "view_caption": list(view_captions) if view_captions is not None else none,
        "views": v,
        "group": group,
        "group_caption": group_caption,
        "group_error": group_error,
        "group_filter": group_filter,
        "source": source,
        "frames": list(frames) if frames is not None else list(range(v)),
        "cameras": None if cameras is None else np.asarray(cameras, np.float64).ravel().tolist(),
        "intrinsics": (
            None if intrinsics is None else np.asarray(intrinsics, np.float64).ravel().tolist()
        ),
        "sizes": None if sizes is None else [int(x) for wh in sizes for x in wh],
    }


def group_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (:func:`group_row`) as a table in GROUP_MANIFEST_SCHEMA, checked: valid unique
    keys, per-view lists of ``views`` entries, camera arrays of 16 / 9 / 2 values a view."""
    seen: set[str] = set()
    for row in rows:
        key = row.get("key")
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise GroupManifestError(f"invalid group key {key!r}: 1-200 chars of [A-Za-z0-9_-]")
        if key in seen:
            raise GroupManifestError(f"duplicate group key {key!r}")
        seen.add(key)
        v = int(row["views"])
        for column in _PER_VIEW:
            if len(row[column]) != v:
                raise GroupManifestError(f"{key}: {column} has {len(row[column])} values, not {v}")
        for column, per in (("cameras", 16), ("intrinsics", 9), ("sizes", 2)):
            if row.get(column) is not None and len(row[column]) != per * v:
                raise GroupManifestError(f"{key}: {column} needs {per} values per view")
    cols = {name: [r.get(name) for r in rows] for name in GROUP_MANIFEST_SCHEMA.names}
    return pa.table(cols, schema=GROUP_MANIFEST_SCHEMA)


def group_rng(*parts: object) -> np.random.Generator:
    """A generator that depends only on ``parts`` (group id, sample index, seed): the views a
    sample picks never depend on the order or number of other groups."""
    return seeded_rng("\x1f".join(str(p) for p in parts))
