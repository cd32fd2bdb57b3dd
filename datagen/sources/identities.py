"""Identity sources: photos of people grouped by identity -> faceid group rows.

A manifest (``.parquet``, ``.jsonl`` or ``.csv``) lists one photo a row: ``uri`` (a local
path, relative ones taken from the manifest's folder, or an fsspec URL), ``identity`` (a
string id) and an optional ``caption``; other columns are ignored. Every identity with at
least ``min_images`` photos (the paper keeps identities with 4 or more) gives
``samples_per_identity`` samples, each of n photos drawn without repeats, n uniform in
``[views[0], min(views[1], photos)]``, img0 the target: one group row per sample
(:mod:`datagen.sources.groups`), chosen from (identity, sample index, seed) only.

Nothing in the manifest disappears silently: an identity with too few photos is one row
with a ``TooFewImages`` ``group_filter`` (the first stage reports it as filtered), and a row
that cannot be an image of an identity (an empty ``uri``, an identity that is not a string,
the same photo twice) is a row of its own with a ``BadManifestRow`` ``group_error``
(quarantined, named). A manifest that cannot be used at all (unreadable, a missing column,
a column of the wrong type) is a :class:`~datagen.sources.SourceError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageEnhance

from datagen.io import BadInput, read_bytes
from datagen.params import ParamError
from datagen.sources.base import Source, SourceError
from datagen.sources.demo import base_demo_images
from datagen.sources.groups import group_rng, group_row, group_table

MAX_MANIFEST_BYTES = 1 << 30  # an identity manifest larger than this is not one
MANIFEST_TIMEOUT_S = 300.0  # reading the whole manifest
MANIFEST_FORMATS = (".parquet", ".jsonl", ".csv")


def _check_sampling(min_images: int, views: tuple[int, int], samples: int) -> None:
    """A faceid sample is a target and at least one reference; an identity that passes
    ``min_images`` must be able to fill the smallest sample."""
    lo, hi = views
    if lo < 2:
        raise ParamError(f"views: at least 2 (a target and a reference), got {list(views)}")
    if hi < lo:
        raise ParamError(f"views: need min <= max, got {list(views)}")
    if min_images < lo:
        raise ParamError(f"min_images: must be >= views[0]={lo}, got {min_images}")
    if samples < 1:
        raise ParamError(f"samples_per_identity: must be >= 1, got {samples}")


@dataclass(frozen=True)
class IdentitiesParams:
    """An identity manifest (parquet, jsonl or csv: ``uri``, ``identity``, optional
    ``caption``); identities with fewer than ``min_images`` images are filtered."""

    kind: Literal["identities"]
    path: str
    min_images: int = 4
    views: tuple[int, int] = (2, 5)
    samples_per_identity: int = 1

    def __post_init__(self) -> None:
        _check_sampling(self.min_images, self.views, self.samples_per_identity)
        if not self.path.lower().endswith(MANIFEST_FORMATS):
            raise ParamError(f"path: an identity manifest ends in {', '.join(MANIFEST_FORMATS)}")


@dataclass(frozen=True)
class DemoIdentitiesParams:
    """Augmented crops of the people photos shipped with ultralytics and scikit-image, one
    identity per person (:data:`DEMO_PEOPLE`: zidane.jpg and bus.jpg hold two each), for
    tests and the demo."""

    kind: Literal["demo_identities"]
    images_per_identity: int = 6
    min_images: int = 4
    views: tuple[int, int] = (2, 4)
    samples_per_identity: int = 2
    max_side: int = 384
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check_sampling(self.min_images, self.views, self.samples_per_identity)
        if self.images_per_identity < 1:
            raise ParamError(f"images_per_identity: must be >= 1, got {self.images_per_identity}")
        if self.max_side < 64:
            raise ParamError(f"max_side: must be >= 64 (decode's min_side), got {self.max_side}")


class IdentitiesSource(Source):
    """``source: {kind: identities, path: ...}``: faceid group rows of a manifest."""

    kind: ClassVar[str] = "identities"
    Params: ClassVar[type] = IdentitiesParams
    subset: ClassVar[str | None] = "faceid"

    @classmethod
    def rows(cls, params: IdentitiesParams, work_dir: str, seed: int) -> pa.Table:
        return group_table(identity_rows(params, seed))


class DemoIdentitiesSource(Source):
    """``source: {kind: demo_identities}``: the demo's photos, made once under ``cache_dir``
    (default ``<work_dir>/demo_identities``), then read as an ``identities`` manifest."""

    kind: ClassVar[str] = "demo_identities"
    Params: ClassVar[type] = DemoIdentitiesParams
    subset: ClassVar[str | None] = "faceid"

    @classmethod
    def rows(cls, params: DemoIdentitiesParams, work_dir: str, seed: int) -> pa.Table:
        cache = params.cache_dir or str(Path(work_dir) / "demo_identities")
        path = demo_identity_photos(cache, params.images_per_identity, params.max_side)
        manifest = IdentitiesParams(
            "identities", path, params.min_images, params.views, params.samples_per_identity
        )
        return IdentitiesSource.rows(manifest, work_dir, seed)


IDENTITY_SOURCES: dict[str, type[Source]] = {
    "identities": IdentitiesSource,
    "demo_identities": DemoIdentitiesSource,
}


def identity_manifest(spec: dict, work_dir: str, seed: int = 0) -> pa.Table:
    """The group rows (:data:`datagen.sources.groups.GROUP_MANIFEST_SCHEMA`) of an ``identities`` or
    ``demo_identities`` source spec."""
    cls = IDENTITY_SOURCES.get(spec.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise SourceError(f"not an identity source kind: {spec.get('kind')!r}")
    return cls.rows(cls.params(spec), work_dir, seed)


# -- reading a manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One manifest row: ``where`` names it (``line 7``, ``row 7``); ``problem`` says why it
    cannot be a photo of an identity (None when it can)."""

    where: str
    uri: Any
    identity: Any
    caption: Any
    problem: str | None = None


def _row_problem(uri: Any, identity: Any, caption: Any) -> str | None:
    if not isinstance(uri, str) or not uri.strip():
        return f"uri {uri!r} is empty or not a string"
    if not isinstance(identity, str) or not identity.strip():
        return f"identity {identity!r} is empty or not a string"
    if caption is not None and not isinstance(caption, str):
        return f"caption {caption!r} is not a string"
    return None


def _photo(where: str, uri: Any, identity: Any, caption: Any) -> Photo:
    caption = caption or None  # an empty caption is no caption
    return Photo(where, uri, identity, caption, _row_problem(uri, identity, caption))


def _read_manifest_bytes(path: str) -> bytes:
    try:
        return read_bytes(path, max_bytes=MAX_MANIFEST_BYTES, timeout_s=MANIFEST_TIMEOUT_S)
    except BadInput as exc:
        raise SourceError(f"identity manifest {path} cannot be read: {exc}") from exc


def _text(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"identity manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc


def _string_column(table: pa.Table, name: str, path: str) -> list[Any]:
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise SourceError(
            f"{path}: identity manifest column {name!r} has type {kind}, expected string"
        )
    return column.to_pylist()


def _parquet_photos(path: str, data: bytes) -> Iterator[Photo]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(
            f"identity manifest {path} is not a readable parquet file: {type(exc).__name__}: "
            f"{exc}".splitlines()[0]
        ) from exc
    _require(path, table.column_names)
    uris = _string_column(table, "uri", path)
    ids = _string_column(table, "identity", path)
    has_caption = "caption" in table.column_names
    captions = _string_column(table, "caption", path) if has_caption else [None] * len(uris)
    for i, (uri, identity, caption) in enumerate(zip(uris, ids, captions, strict=True)):
        yield _photo(f"row {i + 1}", uri, identity, caption)


def _jsonl_photos(path: str, data: bytes) -> Iterator[Photo]:
    objects: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(_text(path, data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise SourceError(f"{path} line {number}: a JSON object per line is needed")
        objects.append((number, obj))
    _require(path, {k for _, obj in objects for k in obj} if objects else {"uri", "identity"})
    for number, obj in objects:
        yield _photo(f"line {number}", obj.get("uri"), obj.get("identity"), obj.get("caption"))


def _csv_photos(path: str, data: bytes) -> Iterator[Photo]:
    reader = csv.DictReader(io.StringIO(_text(path, data), newline=""))
    try:
        _require(path, reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise SourceError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from exc
    for number, row in rows:
        photo = _photo(f"line {number}", row.get("uri"), row.get("identity"), row.get("caption"))
        if None in row:  # more fields than the header names: a shifted row
            extra = f"{len(row[None])} more fields than the header names"
            photo = Photo(photo.where, photo.uri, photo.identity, None, extra)
        yield photo


def _require(path: str, columns: Any) -> None:
    missing = [c for c in ("uri", "identity") if c not in columns]
    if missing:
        raise SourceError(f"{path}: identity manifest lacks columns {missing} (uri, identity)")


def read_photos(path: str) -> list[Photo]:
    """Every row of an identity manifest, its relative local uris made absolute from the
    manifest's folder (workers do not share the driver's working folder)."""
    suffix = Path(path).suffix.lower()
    if suffix not in MANIFEST_FORMATS:
        raise SourceError(f"identity manifest {path}: use a {', '.join(MANIFEST_FORMATS)} file")
    data = _read_manifest_bytes(path)
    readers = {".parquet": _parquet_photos, ".jsonl": _jsonl_photos, ".csv": _csv_photos}
    photos = list(readers[suffix](path, data))
    fs, local_path = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        return photos
    folder = Path(local_path).resolve().parent
    return [
        Photo(p.where, str(folder / p.uri), p.identity, p.caption, p.problem)
        if p.problem is None and "://" not in p.uri and not os.path.isabs(p.uri)
        else p
        for p in photos
    ]


# -- manifest rows -> group rows -------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def identity_key(identity: str) -> str:
    """``<identity cleaned>-<8 hex of the id>``: readable, stable, and distinct for ids
    that clean to the same text (``Ann Lee`` and ``ann_lee`` differ)."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", identity).strip("_")[:120] or "identity"
    return f"{cleaned}-{_digest(identity)}"


def _grouped(photos: list[Photo]) -> tuple[dict[str, list[Photo]], list[Photo]]:
    """Photos by identity (manifest order), and the rows that are no photo of one."""
    by_identity: dict[str, list[Photo]] = {}
    seen: dict[tuple[str, str], str] = {}
    bad: list[Photo] = []
    for photo in photos:
        if photo.problem is not None:
            bad.append(photo)
            continue
        first = seen.setdefault((photo.identity, photo.uri), photo.where)
        if first != photo.where:
            bad.append(
                Photo(
                    photo.where,
                    photo.uri,
                    photo.identity,
                    None,
                    f"repeats {first} (one photo twice)",
                )
            )
            continue
        by_identity.setdefault(photo.identity, []).append(photo)
    return by_identity, bad


def _bad_row(photo: Photo, path: str) -> dict[str, Any]:
    where = photo.where.replace(" ", "")
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(path).stem).strip("_")[:80] or "manifest"
    identity = photo.identity if isinstance(photo.identity, str) else ""
    return group_row(
        f"{stem}-{where}-bad",
        identity,
        f"{path}#{photo.where}",
        [photo.uri if isinstance(photo.uri, str) else ""],
        group_error=f"BadManifestRow: {path} {photo.where}: {photo.problem}",
    )


def _sample_rows(
    identity: str, photos: list[Photo], source: IdentitiesParams, seed: int
) -> list[dict[str, Any]]:
    base, where = identity_key(identity), f"{source.path}#{identity}"
    if len(photos) < source.min_images:
        return [
            group_row(
                base,
                identity,
                where,
                [p.uri for p in photos],
                view_captions=[p.caption for p in photos],
                group_filter=(
                    f"TooFewImages: identity {identity} has {len(photos)} images, fewer than "
                    f"min_images={source.min_images}"
                ),
            )
        ]
    rows = []
    hi = min(source.views[1], len(photos))
    for k in range(source.samples_per_identity):
        rng = group_rng(identity, k, seed)
        n = int(rng.integers(source.views[0], hi + 1))
        frames = [int(f) for f in rng.choice(len(photos), size=n, replace=False)]
        rows.append(
            group_row(
                f"{base}-s{k}",
                identity,
                where,
                [photos[f].uri for f in frames],
                frames=frames,
                view_captions=[photos[f].caption for f in frames],
            )
        )
    return rows


def identity_rows(source: IdentitiesParams, seed: int = 0) -> list[dict[str, Any]]:
    """The group rows of a manifest: samples of each kept identity, one filtered row per
    identity with too few photos, one error row per unusable manifest row."""
    by_identity, bad = _grouped(read_photos(source.path))
    rows = [
        row
        for identity, photos in by_identity.items()
        for row in _sample_rows(identity, photos, source, seed)
    ]
    return rows + [_bad_row(photo, source.path) for photo in bad]


# -- the demo identities ---------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPerson:
    """One person of a shipped photo: the photo's name in ``sources.base_demo_images``, a
    box around the head (pixels of the full photo), the crop sizes (multiples of the head
    box's long side; capped where another face is near) and a caption."""

    photo: str
    head: tuple[int, int, int, int]
    scales: tuple[float, float]
    caption: str


# Boxes picked by looking at the photos; crops of zidane.jpg and bus.jpg stay clear of the
# other people's faces.
DEMO_PEOPLE: dict[str, DemoPerson] = {
    "astronaut": DemoPerson(
        "astronaut",
        (150, 15, 300, 185),
        (1.6, 3.0),
        "a photo of a smiling woman astronaut with short brown hair in an orange spacesuit",
    ),
    "cameraman": DemoPerson(
        "camera",
        (150, 65, 275, 200),
        (1.6, 3.0),
        "a black and white photo of a dark-haired man in a coat looking through a camera",
    ),
    "zidane": DemoPerson(
        "zidane",
        (470, 200, 670, 455),
        (1.5, 2.2),
        "a photo of a bald man in a dark suit and tie, shouting",
    ),
    "ancelotti": DemoPerson(
        "zidane",
        (890, 40, 1080, 270),
        (1.5, 2.2),
        "a photo of a grey-haired man in a dark suit and tie looking to the side",
    ),
    "bus_bearded_man": DemoPerson(
        "bus",
        (98, 395, 168, 485),
        (1.8, 2.4),
        "a photo of a bearded man with sunglasses in a cream fleece coat on a street",
    ),
    "bus_man_in_black": DemoPerson(
        "bus",
        (258, 402, 314, 475),
        (1.8, 2.4),
        "a photo of a man with sunglasses in a black coat and a red shirt on a street",
    ),
}
DEMO_VERSION = "1"  # bump when the demo photos change: they are cached under it


def _square_around(
    head: tuple[int, int, int, int], side: float, shift: tuple[float, float], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A square of ``side`` around the head's centre moved by ``shift``, kept inside the
    photo (smaller where the photo is)."""
    width, height = size
    s = int(min(side, width, height))
    cx = (head[0] + head[2]) / 2 + shift[0]
    cy = (head[1] + head[3]) / 2 + shift[1]
    x0 = int(np.clip(round(cx - s / 2), 0, width - s))
    y0 = int(np.clip(round(cy - s / 2), 0, height - s))
    return x0, y0, x0 + s, y0 + s


def demo_photo(
    person: DemoPerson, photo: Image.Image, j: int, max_side: int
) -> tuple[Image.Image, str]:
    """Augmented crop ``j`` of ``person`` (a function of the person and ``j`` only): another
    crop around the head, maybe mirrored, lighter or darker, more or less colourful."""
    rng = group_rng("demo_identities", person.photo, person.head, j)
    head_side = max(person.head[2] - person.head[0], person.head[3] - person.head[1])
    scale = float(rng.uniform(*person.scales))
    dx, dy = (float(v) for v in rng.uniform(-0.12, 0.12, 2) * head_side)
    box = _square_around(person.head, scale * head_side, (dx, dy), photo.size)
    img = photo.crop(box)
    caption = person.caption
    caption += ", cropped close" if scale < sum(person.scales) / 2 else ", head and shoulders"
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption += ", mirrored"
    brightness = float(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.8, 1.25)))
    if abs(brightness - 1) > 0.1:
        caption += ", in bright light" if brightness > 1 else ", in dim light"
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img, caption


def demo_identity_photos(cache_dir: str, images_per_identity: int, max_side: int) -> str:
    """The demo's photos and manifest (``manifest.parquet``: uri, identity, caption), made
    once under ``cache_dir`` in a folder named by the demo version and parameters, reused
    while every file is there; returns the manifest's path."""
    root = Path(cache_dir) / f"v{DEMO_VERSION}-{images_per_identity}x{max_side}"
    manifest = root / "manifest.parquet"
    if manifest.exists():
        uris = pq.read_table(manifest, columns=["uri"]).column("uri").to_pylist()
        if len(uris) == len(DEMO_PEOPLE) * images_per_identity and all(
            Path(u).is_file() for u in uris
        ):
            return str(manifest)
    photos = {name: img for name, img, _ in base_demo_images()}
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"uri": [], "identity": [], "caption": []}
    for identity, person in DEMO_PEOPLE.items():
        if person.photo not in photos:
            raise SourceError(f"demo identities: photo {person.photo!r} is not installed")
        for j in range(images_per_identity):
            img, caption = demo_photo(person, photos[person.photo], j, max_side)
            path = root / f"{identity}_{j:03d}.jpg"
            img.save(path, quality=92)
            rows["uri"].append(str(path.resolve()))
            rows["identity"].append(identity)
            rows["caption"].append(caption)
    partial = root / f".manifest-{os.getpid()}-{os.urandom(4).hex()}.parquet"
    pq.write_table(pa.table(rows, schema=_DEMO_SCHEMA), partial)
    os.replace(partial, manifest)  # the manifest appears only once every photo is written
    return str(manifest)


_DEMO_SCHEMA = pa.schema(
    [("uri", pa.string()), ("identity", pa.string()), ("caption", pa.string())]
)
