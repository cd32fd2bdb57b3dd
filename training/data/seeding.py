"""Seeds derived from integers, the same in every process and on every rerun."""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
