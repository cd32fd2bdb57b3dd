"""Comparing the whole states a fit's debug report saves (``DebugCallback.full_state``)."""

from __future__ import annotations

import torch


def assert_restored(saved: dict, restored: dict) -> None:
    """Model, EMA and optimizer state after a restore are exactly what was saved (keyed by
    name on both sides, whatever the process count that wrote or read them)."""
    assert set(restored["model"]) == set(saved["model"])
    for key, value in saved["model"].items():
        assert torch.equal(restored["model"][key], value), key
    sa, sb = saved["optimizer"]["state"], restored["optimizer"]["state"]
    assert set(sa) == set(sb) and sa
    for name in sa:
        for k in sa[name]:
            assert torch.equal(torch.as_tensor(sa[name][k]), torch.as_tensor(sb[name][k])), name
