"""Summaries of repeated measurements: median with min and max."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of ``values`` (at least one)."""
    if not values:
        raise ValueError("summary of no values")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, float]:
    """Per-repeat ratios ours[i] / theirs[i] (measured side by side in the same repeat), summarised."""
    pairs = list(zip(ours, theirs))
    if not pairs:
        raise ValueError("ratio of no pairs")
    return summary([a / b for a, b in pairs])


def fmt_range(s: dict[str, float], digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)`` with ``digits`` decimals after dividing by ``scale``."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] / scale)} ({f.format(s['min'] / scale)}-{f.format(s['max'] / scale)})"
