"""The folder a benchmark works in: the user's, or a temporary one removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def work_folder(path: str | None, *, keep: bool, prefix: str) -> Iterator[Path]:
    """Yield ``path`` (created) or a fresh temp folder; remove it unless ``keep``,
    even when the benchmark fails, so a crashed run leaves no gigabytes behind."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
