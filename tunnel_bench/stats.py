"""Percentiles, medians and throughput arithmetic (pure).

Percentiles use linear interpolation between closest ranks (numpy's default, "type 7"), so p50 of an
even-sized sample is the mean of the two middle values and p99 of 200 samples lies between the 198th and
the 199th smallest. Latency summaries keep the sample count and the number of failed attempts, which are
left out of the percentiles and reported next to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MB", "latency_summary", "median", "percentile", "ratio", "throughput"]

MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes), like the anchors in DESIGN.md


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; ValueError if empty."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def latency_summary(seconds: Sequence[float], failures: int = 0) -> dict[str, float | int | None]:
    """p50/p99/mean/max in milliseconds of the successful attempts, plus counts."""
    if not seconds:
        return {"n": 0, "failures": failures, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "failures": failures,
        "p50_ms": round(percentile(ms, 50), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "mean_ms": round(sum(ms) / len(ms), 4),
        "max_ms": round(max(ms), 4),
    }


def throughput(total_bytes: int, instances: int, seconds: float) -> dict[str, float]:
    """MB/s and instances/s for one transfer of ``total_bytes`` in ``instances`` files."""
    if seconds <= 0:
        raise ValueError("a transfer takes a positive time")
    return {"seconds": round(seconds, 4), "mb_s": round(total_bytes / MB / seconds, 2),
            "inst_s": round(instances / seconds, 1)}


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is zero."""
    if value is None or baseline in (None, 0):
        return None
    return value / baseline
