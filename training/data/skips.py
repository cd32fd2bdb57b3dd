"""What the data loader skipped, counted over the run: metrics, a progress summary, a limit.

Batches of ``training.data.datamodule`` carry ``skipped``, ``skip_reasons`` ({reason: n}) and
``skip_last``; every rank counts its own batches (``add``), the module merges the ranks'
counts at each log window (one ``all_gather_object`` it already runs), so totals are sums
over ranks and the same on every rank: the limit stops every rank at the same step, and
rank 0 saves the totals in the checkpoint so a resumed run keeps counting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.errors import SkipRateError

# Defaults of ``data.max_skip_rate`` / ``data.skip_rate_min_samples`` (fit config, DataConfig).
MAX_SKIP_RATE = 0.05  # a subset's skipped / read over the run: stop above
SKIP_RATE_MIN_SAMPLES = 200  # ... once this many of its samples were read


def empty() -> dict[str, dict]:
    """``used``: {subset: samples in batches}; ``skipped``: {"subset.reason": n};
    ``last``: {subset: "reason: message"}."""
    return {"used": {}, "skipped": {}, "last": {}}


def add(counts: dict[str, dict], batch: Mapping[str, Any]) -> None:
    """Count one batch of ``training.data.datamodule`` (other sources carry no ``skipped``: ignored)."""
    if "skipped" not in batch or not batch.get("subsets"):
        return
    subset = str(batch["subsets"][0])
    counts["used"][subset] = counts["used"].get(subset, 0) + len(batch["subsets"])
    reasons = batch.get("skip_reasons") or {}
    if int(batch["skipped"]) and not reasons:
        reasons = {"unreadable": int(batch["skipped"])}
    for reason, n in reasons.items():
        key = f"{subset}.{reason}"
        counts["skipped"][key] = counts["skipped"].get(key, 0) + int(n)
    if batch.get("skip_last"):
        counts["last"][subset] = str(batch["skip_last"])


def merge(into: dict[str, dict], *parts: Mapping[str, Any] | None) -> dict[str, dict]:
    """Add ``parts`` (other ranks' or a window's counts) into ``into``; the last part with a
    ``last`` for a subset wins."""
    for part in parts:
        if not part:
            continue
        for kind in ("used", "skipped"):
            for key, n in (part.get(kind) or {}).items():
                into[kind][key] = into[kind].get(key, 0) + int(n)
        into["last"].update(part.get("last") or {})
    return into


def per_subset(counts: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """{subset: (skipped, used)}."""
    out: dict[str, list[int]] = {s: [0, int(n)] for s, n in counts["used"].items()}
    for key, n in counts["skipped"].items():
        out.setdefault(key.split(".", 1)[0], [0, 0])[0] += int(n)
    return {s: (a, b) for s, (a, b) in sorted(out.items())}


def metrics(counts: Mapping[str, Any]) -> dict[str, float]:
    """Cumulative ``data/skipped.<subset>.<reason>``, ``data/skipped.<subset>``,
    ``data/skipped`` and skip rates skipped / (skipped + used), per subset and overall."""
    subsets = per_subset(counts)
    if not subsets:
        return {}
    out: dict[str, float] = {f"data/skipped.{k}": float(n) for k, n in counts["skipped"].items()}
    total_skipped = total_read = 0
    for subset, (skipped, used) in subsets.items():
        out[f"data/skipped.{subset}"] = float(skipped)
        out[f"data/skip_rate.{subset}"] = skipped / max(skipped + used, 1)
        total_skipped += skipped
        total_read += skipped + used
    out["data/skipped"] = float(total_skipped)
    out["data/skip_rate"] = total_skipped / max(total_read, 1)
    return out


def summary(counts: Mapping[str, Any]) -> str:
    """``skipped 3 (1.2%: t2i.decode 2, t2i.schema 1)`` for the progress line; "" if none."""
    subsets = per_subset(counts)
    if not subsets:
        return ""
    skipped = sum(s for s, _ in subsets.values())
    read = sum(s + u for s, u in subsets.values())
    detail = ", ".join(f"{k} {n}" for k, n in sorted(counts["skipped"].items()) if n)
    return f"skipped {skipped} ({skipped / max(read, 1):.1%}{': ' + detail if detail else ''})"


def check(counts: Mapping[str, Any], max_rate: float, min_samples: int) -> None:
    """``SkipRateError`` naming the first subset that skipped more than ``max_rate`` of the
    samples read from it, once ``min_samples`` were read."""
    for subset, (skipped, used) in per_subset(counts).items():
        read = skipped + used
        if read >= max(min_samples, 1) and skipped / read > max_rate:
            last = counts["last"].get(subset, "")
            raise SkipRateError(
                f"data subset {subset!r} skipped {skipped} of {read} samples read "
                f"({skipped / read:.1%} > data.max_skip_rate {max_rate:.1%}, all ranks); "
                f"last: {last or 'unknown'}; repair or drop its shards, or raise "
                "data.max_skip_rate"
            )
