"""Input manifests: every source becomes one Arrow table with a row per input.

Columns: ``key`` (stable, dot-free), ``uri`` (local path or fsspec URL),
``caption`` (nullable), ``byte_offset`` / ``byte_size`` (nullable; a byte range
inside ``uri``, how members of existing tars are addressed without unpacking),
``source_error`` (nullable; ``"Class: reason"`` when the source already knows
the row cannot be used, e.g. a caption that is not UTF-8 or a truncated tar).
Only names and offsets travel through the driver, never pixels.

One bad input never refuses the run: it keeps a row with a ``source_error``
and the decode stage quarantines that key with the reason, naming the file.
Only a manifest that cannot be used at all (a missing folder, an unreadable
parquet file, wrong column types) is a :class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import pyarrow as pa

from datagen import params as P
from datagen.io import BadInput, read_bytes
from datagen.schema import KEY_PATTERN

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
        ("source_error", pa.string()),
    ]
)
MAX_KEY_LENGTH = 200  # datagen.schema.KEY_PATTERN
MAX_CAPTION_BYTES = 1 << 20  # a sidecar or tar caption larger than this is not a caption
CAPTION_TIMEOUT_S = 30.0  # reading one sidecar caption


# Bumped whenever the keys derived for the same inputs change (2: tar stems that
# cleaning alters get a digest of the original stem), so resuming an output made
# with the old keys is refused instead of writing those inputs again.
KEY_SCHEME_VERSION = "2"


class SourceError(ValueError):
    """A manifest that cannot be used as given; the message says how to fix it."""


class Source:
    """The protocol every source kind follows, as :class:`datagen.stages.protocol.Stage`
    is every labeler's: ``kind`` (the DAG's ``source.kind``), ``Params`` (a frozen
    dataclass checked by :func:`datagen.params.build`, its first field ``kind``), the
    group ``subset`` its rows are samples of (``multiview``, ``faceid``; None for an
    item source, one input a row) and :meth:`rows`. Registered in
    :data:`datagen.sources.SOURCES`; the class is read on the driver to validate a DAG,
    so a source module imports only light things at its top."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type]
    subset: ClassVar[str | None] = None

    @classmethod
    def params(cls, spec: Mapping[str, Any], where: str = "source") -> Any:
        """``spec`` (a DAG's ``source`` section) as this source's Params; a
        :class:`datagen.params.ParamError` naming the key otherwise."""
        return P.build(cls.Params, spec, where)

    @classmethod
    def rows(cls, params: Any, work_dir: str, seed: int) -> pa.Table:
        """The manifest (:data:`MANIFEST_SCHEMA`, or the group schema of
        :mod:`datagen.sources.groups` for a group source): one row per input, or per
        sample of a group, chosen from ``seed``. ``work_dir``: where a generated source
        (the demo) caches what it makes unless its params name a folder."""
        raise NotImplementedError


def utf8_bytes(text: str) -> bytes:
    """Bytes of a name that may hold undecodable bytes (``surrogateescape``)."""
    return text.encode("utf-8", "surrogateescape")


def short_digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(utf8_bytes(text)).hexdigest()[:n]


def key_from_path(relative: str) -> str:
    """A stable, dot-free key from a relative path, unique even after sanitising.

    ``cats/tom.v2.jpg`` -> ``cats_tom_v2_jpg-<8 hex of the path>``: readable,
    and the hash keeps ``a/b.jpg`` and ``a_b.jpg`` apart.
    """
    readable = re.sub(r"[^A-Za-z0-9]+", "_", relative).strip("_")[:120] or "x"
    return f"{readable}-{short_digest(relative)}"


def check_manifest(table: pa.Table) -> pa.Table:
    """Reject duplicate or invalid keys up front: accounting is by key."""
    keys = table.column("key").to_pylist()
    bad = [k for k in keys if k is None or not KEY_PATTERN.match(k)]
    if bad:
        raise SourceError(
            f"{len(bad)} invalid keys (need [A-Za-z0-9_-], no dots), e.g. {bad[:5]}; "
            "use datagen.sources.key_from_path to derive keys"
        )
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dups = sorted({k for k in keys if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise SourceError(f"{len(dups)} duplicate keys in the manifest, e.g. {dups[:5]}")
    return table


def conform(table: pa.Table) -> pa.Table:
    """``table`` in MANIFEST_SCHEMA, missing nullable columns added (a manifest
    cached before ``source_error`` existed)."""
    for name in MANIFEST_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(
                name, pa.nulls(table.num_rows, MANIFEST_SCHEMA.field(name).type)
            )
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return check_manifest(pa.table(cols, schema=MANIFEST_SCHEMA))


def dedupe_keys(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose key an earlier row already took get a new, unique key and a
    ``DuplicateKey`` source error: quarantined by name, not refusing the run."""
    seen: set[str] = set()
    for row in rows:
        key = row["key"]
        if key not in seen:
            seen.add(key)
            continue
        n = 1
        while (new := f"{key[: MAX_KEY_LENGTH - 8]}-dup{n}") in seen:
            n += 1
        seen.add(new)
        row["key"] = new
        row["source_error"] = (
            f"DuplicateKey: {row.get('origin') or row['uri']} maps to key {key}, already taken"
        )
    return rows


# --- image folders -------------------------------------------------------------------------


def read_caption(path: str) -> tuple[str | None, str | None]:
    """``(caption, None)``, ``(None, None)`` without a sidecar, or ``(None,
    reason)``: only a regular file of at most MAX_CAPTION_BYTES of UTF-8 is a
    caption, read as every input is (:func:`datagen.io.read_bytes`: a FIFO
    would block the driver, a huge file fill its memory, a hung mount stall it)."""
    if not os.path.lexists(path):
        return None, None
    try:
        data = read_bytes(path, max_bytes=MAX_CAPTION_BYTES, timeout_s=CAPTION_TIMEOUT_S)
    except BadInput as exc:
        return None, f"BadCaption: {exc.message}"
    return decode_caption(data, path)


def decode_caption(data: bytes, where: str) -> tuple[str | None, str | None]:
    if len(data) > MAX_CAPTION_BYTES:
        return None, f"BadCaption: {where} has more than {MAX_CAPTION_BYTES} bytes"
    try:
        return data.decode("utf-8").strip(), None
    except UnicodeDecodeError as exc:
        return None, f"BadCaption: {where} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
