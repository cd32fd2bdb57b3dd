"""Errors of a datagen run that the CLI reports as one line (the cause is the
input, the output folder or another job, not the code)."""

from __future__ import annotations


class DatagenError(RuntimeError):
    pass
