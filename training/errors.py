"""Errors a fit or a sampling run reports to the user as one line (the CLI prints them
without a traceback): the cause is outside the code (a file, a server, the data)."""

from __future__ import annotations


class FitError(RuntimeError):
    """A user-facing failure whose message is one complete line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckpointError(FitError):
    """A checkpoint that is missing, truncated or corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks for code to run while it is read: never loaded, never skipped
    silently (``resume=last`` does not fall back past it)."""


class TrackingError(FitError):
    """The MLflow tracking server cannot be reached."""


class SkipRateError(FitError):
    """The data loader skipped more corrupt samples than ``data.max_skip_rate`` allows."""


def warn(message: str) -> None:
    """A one-line warning on stderr, from the global rank-0 process only."""
    import sys

    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"onegen: warning: {message}", file=sys.stderr, flush=True)
