"""The config error of the data section, below every data module that checks a key
(``training.config.ConfigError`` is this class)."""

from __future__ import annotations

from typing import Any

from common.overrides import closest


class ConfigError(ValueError):
    """A config the fit cannot start from; the message is one line naming the key."""


def unknown_key(full_key: str, known: Any) -> str:
    """``data.batchsize: unknown key; did you mean data.batch_size?``, or the valid keys."""
    parent, _, leaf = full_key.rpartition(".")
    close = closest(leaf, known)
    prefix = f"{parent}." if parent else ""
    hint = f"; did you mean {prefix}{close}?" if close else f"; valid keys: {sorted(known)}"
    return f"{full_key}: unknown key{hint}"
