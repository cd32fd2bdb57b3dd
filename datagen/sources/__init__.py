"""Every source a DAG can name, and the one function that turns a spec into a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from datagen.sources.base import SourceError
from datagen.sources.demo import demo
from datagen.sources.folders import image_folder
from datagen.sources.parquet import parquet_manifest
from datagen.sources.webdataset import webdataset_shards

GROUP_SOURCE_KINDS: dict[str, str] = {
    "scenes": "multiview",
    "procedural_scenes": "multiview",
    "identities": "faceid",
    "demo_identities": "faceid",
}


def resolve(spec: dict[str, Any] | str, work_dir: str = ".", seed: int = 0) -> pa.Table:
    """A source spec from a DAG (``{kind, ...}``) or the CLI's ``--input`` string. Group
    sources (scenes, identities) give one row per sample, its views chosen from ``seed``."""
    if isinstance(spec, str):
        spec = guess_spec(spec)
    kind = spec.get("kind")
    if kind in ("scenes", "procedural_scenes"):
        from datagen.sources.scenes.manifest import scene_manifest

        return scene_manifest(spec, work_dir, seed)
    if kind in ("identities", "demo_identities"):
        from datagen.sources.identities import identity_manifest

        return identity_manifest(spec, work_dir, seed)
    if kind == "folder":
        return image_folder(spec["path"])
    if kind == "parquet":
        return parquet_manifest(spec["path"])
    if kind == "webdataset":
        return webdataset_shards(spec["urls"])
    if kind == "demo":
        cache = spec.get("cache_dir") or str(Path(work_dir) / "demo_inputs")
        return demo(cache, n=int(spec.get("n", 48)), max_side=int(spec.get("max_side", 512)))
    raise SourceError(
        f"unknown source kind {kind!r}: use folder, parquet, webdataset, demo, "
        + ", ".join(GROUP_SOURCE_KINDS)
    )


def guess_spec(text: str) -> dict[str, Any]:
    if text == "demo":
        return {"kind": "demo"}
    if text.endswith(".parquet"):
        return {"kind": "parquet", "path": text}
    if ".tar" in text:
        return {"kind": "webdataset", "urls": text}
    return {"kind": "folder", "path": text}
