"""The one text -> random generator rule: every "random" choice datagen makes (degradations,
entity colours, the views a group sample picks) is a function of its own key and seed, so a
rerun, a resume or another worker order gives the same bytes."""

from __future__ import annotations

import hashlib

import numpy as np


def seeded_rng(text: str) -> np.random.Generator:
    """A generator seeded by the first 8 bytes of ``sha256(text)`` (little endian). Callers
    spell ``text`` from their key, seed and purpose; the golden shards pin those spellings."""
    digest = hashlib.sha256(text.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
