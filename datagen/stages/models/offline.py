"""Imported first by every ``*_model.py``, before transformers, ultralytics or
segment-anything: they read these variables at import, so a worker that forgot to set
them still never reaches a hub, probes DNS, installs packages or fetches hub kernels.
A user's explicit value is kept."""

from __future__ import annotations

import os

MODEL_OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "USE_HUB_KERNELS": "0",  # deformable attention would fetch kernels from the hub
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
}

for _key, _value in MODEL_OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
