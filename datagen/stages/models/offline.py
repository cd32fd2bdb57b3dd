"""Imported first by every model wrapper, before transformers, ultralytics or
segment-anything: they read the offline variables at import, so a worker that forgot to set
them still never reaches a hub, probes DNS, installs packages or fetches hub kernels.
A user's explicit value is kept."""

from __future__ import annotations

from common.offline import apply_offline_env

apply_offline_env()
