"""Durations as the progress lines of both halves print them (a fit's ETA, a datagen run's)."""

from __future__ import annotations


def format_eta(seconds: float) -> str:
    """``42s``, ``1m23s``, ``2h05m``, ``3d04h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
