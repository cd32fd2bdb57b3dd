"""Every source a DAG can name (the one registry), imported on first use, and the one
function that turns a spec into a manifest.

A source kind is a :class:`datagen.sources.base.Source` class (``kind``, ``Params``, the
group ``subset`` it writes if any, ``rows(params, work_dir, seed)``) in its own module;
the modules import :mod:`datagen.sources.base` and each other, never this package.
Nothing here binds a name that a submodule has (``datagen.sources.demo`` is the module).
"""

from __future__ import annotations

import importlib
from typing import Any

import pyarrow as pa

from datagen.sources.base import Source, SourceError

SOURCES: dict[str, str] = {
    "folder": "datagen.sources.folders:FolderSource",
    "parquet": "datagen.sources.parquet:ParquetSource",
    "webdataset": "datagen.sources.webdataset:WebDatasetSource",
    "demo": "datagen.sources.demo:DemoSource",
    "scenes": "datagen.sources.scenes.manifest:ScenesSource",
    "procedural_scenes": "datagen.sources.scenes.manifest:ProceduralScenesSource",
    "identities": "datagen.sources.identities:IdentitiesSource",
    "demo_identities": "datagen.sources.identities:DemoIdentitiesSource",
}


def source(kind: str) -> type[Source]:
    """The Source class registered as ``kind``."""
    if kind not in SOURCES:
        raise KeyError(f"unknown source kind {kind!r}; known: {list(SOURCES)}")
    module, cls = SOURCES[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve(spec: dict[str, Any] | str, work_dir: str = ".", seed: int = 0) -> pa.Table:
    """A source spec from a DAG (``{kind, ...}``, checked against its kind's ``Params``) or
    the CLI's ``--input`` string. Group sources (scenes, identities) give one row per
    sample, its views chosen from ``seed``."""
    if isinstance(spec, str):
        spec = guess_spec(spec)
    kind = spec.get("kind")
    if kind not in SOURCES:
        raise SourceError(f"unknown source kind {kind!r}: use {', '.join(SOURCES)}")
    cls = source(kind)
    return cls.rows(cls.params(spec), work_dir, seed)


def guess_spec(text: str) -> dict[str, Any]:
    if text == "demo":
        return {"kind": "demo"}
    if text.endswith(".parquet"):
        return {"kind": "parquet", "path": text}
    if ".tar" in text:
        return {"kind": "webdataset", "urls": text}
    return {"kind": "folder", "path": text}
