"""Image folders: every image file under a root, a sidecar ``.txt`` as its caption."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec
import pyarrow as pa

from datagen.sources.base import (
    IMAGE_EXTENSIONS,
    Source,
    SourceError,
    dedupe_keys,
    key_from_path,
    manifest_table,
    read_caption,
    utf8_bytes,
)


def _folder_row(path: str, relative: str, uri: str, local: bool) -> dict[str, Any]:
    try:
        utf8_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        # Arrow strings are UTF-8: keep a readable, escaped name and quarantine the file.
        shown = utf8_bytes(uri).decode("utf-8", "backslashreplace")
        return {
            "key": key_from_path(relative),
            "uri": shown,
            "source_error": f"BadFileName: {shown} is not a valid UTF-8 path",
        }
    caption, error = read_caption(str(Path(path).with_suffix(".txt"))) if local else (None, None)
    return {"key": key_from_path(relative), "uri": uri, "caption": caption, "source_error": error}


def image_folder(root: str) -> pa.Table:
    """Every image under ``root`` (recursive), in sorted order. Non-image
    extensions are skipped; broken images with image extensions are kept, so
    the decode stage quarantines them with a reason, and so are images whose
    sidecar caption cannot be read (with the sidecar named as the reason)."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    rows = []
    for path in sorted(fs.find(base)):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        relative = path[len(base.rstrip("/")) + 1 :]
        uri = path if local else f"{protocol}://{path}"
        rows.append(_folder_row(path, relative, uri, local))
    return manifest_table(dedupe_keys(rows))


@dataclass(frozen=True)
class FolderParams:
    kind: Literal["folder"]
    path: str


class FolderSource(Source):
    """``source: {kind: folder, path: ...}``: :func:`image_folder`."""

    kind: ClassVar[str] = "folder"
    Params: ClassVar[type] = FolderParams

    @classmethod
    def rows(cls, params: FolderParams, work_dir: str, seed: int) -> pa.Table:
        return image_folder(params.path)
