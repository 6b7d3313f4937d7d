"""Exact statistics over the stored latencies of a step: percentiles, rates, error counts."""

from __future__ import annotations

import itertools
import math

import numpy as np

from recserve.benchmarks.results import LatencyDistribution, LatencySummary

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
# The distribution plot's points: the body in steps of a quartile or so, the tail in nines; 0 and 100 are
# the fastest and the slowest call.
DISTRIBUTION_PERCENTILES: tuple[float, ...] = (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100)


def nearest_rank(sorted_values: np.ndarray, q: float) -> float:
    """The q-th percentile by nearest rank: the smallest observed value with at least q% at or below it."""
    # The small epsilon keeps float noise (0.999 * 1000 = 999.0000000000001) from skipping a rank.
    rank = max(1, math.ceil(q / 100.0 * sorted_values.size - 1e-9))
    return float(sorted_values[rank - 1])


def latency_summary(latencies_s: np.ndarray) -> LatencySummary:
    """Milliseconds: p50, p90, p99, p99.9, max and mean; None for each when there are no samples.

    NOTE: exact over every stored sample, by nearest rank: each percentile is a latency that was actually
    observed (as HDR histograms report), and the values are ordered by construction.
    """
    if latencies_s.size == 0:
        return LatencySummary()
    ms = np.sort(latencies_s * 1000.0)
    p50, p90, p99, p99_9 = (round(nearest_rank(ms, q), 3) for q in PERCENTILES)
    return LatencySummary(
        p50=p50, p90=p90, p99=p99, p99_9=p99_9, max=round(float(ms[-1]), 3), mean=round(float(ms.mean()), 3)
    )


def paired_p50_ms(seconds: np.ndarray, reference_s: np.ndarray) -> float | None:
    """The p50 (nearest rank) of the differences of two equally long series of timings, call by call, in
    ms; None when empty. What the two calls of a pair shared (the same text, the machine's speed at that
    moment) drops out of their difference, where a difference of two p50s compares the two distributions
    whole, each a mix of every text and every moment."""
    if seconds.size == 0:
        return None
    return round(nearest_rank(np.sort((seconds - reference_s) * 1000.0), 50.0), 3)


def latency_distribution(latencies_s: np.ndarray) -> LatencyDistribution | None:
    """Milliseconds at DISTRIBUTION_PERCENTILES, by nearest rank; None when there are no samples."""
    if latencies_s.size == 0:
        return None
    ms = np.sort(latencies_s * 1000.0)
    return LatencyDistribution(
        percentiles=DISTRIBUTION_PERCENTILES,
        ms=tuple(round(nearest_rank(ms, q), 3) for q in DISTRIBUTION_PERCENTILES),
    )


def percentiles_ordered(lat: LatencySummary) -> bool:
    seq = lat.tail()
    if any(v is None for v in seq):
        return all(v is None for v in seq)
    return all(a <= b for a, b in itertools.pairwise(seq))  # type: ignore[operator]


def is_stable(previous: float, current: float, tolerance: float) -> bool:
    """Two windows' throughputs within `tolerance` of each other (relative to the larger)."""
    top = max(previous, current)
    return top == 0 or abs(previous - current) <= tolerance * top


def error_counts(codes: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    """Failed calls by status name; code 0 (OK) is not an error."""
    values, counts = np.unique(codes[codes != 0], return_counts=True)
    return {names.get(int(v), f"CODE_{int(v)}"): int(c) for v, c in zip(values, counts, strict=True)}


def rate(count: float, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else 0.0
