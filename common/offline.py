"""The one table of variables that keep every process offline, free of telemetry and quiet.

Set before transformers, ultralytics, Ray or MLflow are imported (they read some of them at
import), with ``setdefault`` so a user's explicit value wins. Local Ray workers inherit them;
a remote cluster's workers get them through the runtime env (:func:`offline_env`). No
``YOLO_CONFIG_DIR``: ultralytics then uses ~/.config/Ultralytics, or its own private per-user
folder when that is not writable, never a shared fixed path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

HUB_OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
OFFLINE_ENV: dict[str, str] = {
    **HUB_OFFLINE_ENV,
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "USE_HUB_KERNELS": "0",  # Grounding DINO's deformable attention would fetch hub kernels
    "YOLO_OFFLINE": "1",  # ultralytics probes DNS at import without it
    "YOLO_AUTOINSTALL": "False",
    "YOLO_VERBOSE": "False",  # its settings banner and per-image lines in every actor's log
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_DEDUP_LOGS": "1",
}


def apply_offline_env(keys: Iterable[str] | None = None, force: bool = False) -> None:
    """Set ``keys`` of :data:`OFFLINE_ENV` (all by default) in this process and whatever it
    starts; ``force`` overrides a value already set (a hub switch that must hold)."""
    for key in OFFLINE_ENV if keys is None else keys:
        if force:
            os.environ[key] = OFFLINE_ENV[key]
        else:
            os.environ.setdefault(key, OFFLINE_ENV[key])


def offline_env() -> dict[str, str]:
    """The offline variables as this process has them (a user's explicit value kept), for
    the runtime env of a cluster's workers."""
    return {key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()}
