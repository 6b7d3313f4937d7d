"""Figures computed from a step's recorded calls: throughput and latency over windows, warm-up failures, how
well the open loop kept its schedule, the calls by status and the goodput, and the checks that the figures
add up."""

from __future__ import annotations

import grpc
import numpy as np

from recserve.benchmarks import stats
from recserve.benchmarks.recorder import CODE_NAMES, OK, PENDING, WARMUP, CallTable, Windows
from recserve.benchmarks.results import (
    Consistency,
    Figures,
    Outcomes,
    Schedule,
    StatusFigures,
    Warmup,
)

# More than this share of the calls left late: the client, not only the server, limited the step.
FELL_BEHIND_FRACTION = 0.01
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
# The status name of calls that never got an answer (in flight when the step ended).
NO_ANSWER = "NO_ANSWER"


def figures(
    calls: CallTable,
    windows: Windows,
    first: int,
    last: int,
    texts_per: np.ndarray,
    tokens_per: np.ndarray,
) -> Figures:
    """Windows `first`..`last` (see loadgen's docstring for the definitions).

    `texts_per` and `tokens_per` are per prebuilt call of the workload, indexed by `calls.index`.
    """
    start, end = windows.bounds(first, last)
    seconds = end - start
    belongs = calls.within(first, last)
    ok = calls.code == OK
    failed = belongs & ~ok & (calls.code != PENDING)
    # NaN ends (pending calls) compare false: they arrived in no window.
    arrived = ok & (calls.end >= start) & (calls.end < end)
    done = belongs & ok
    return Figures(
        window_s=round(seconds, 6),
        sent=int(belongs.sum()),
        completed=int(done.sum()),
        failed=int(failed.sum()),
        errors=stats.error_counts(calls.code[failed], CODE_NAMES),
        calls_per_s=stats.rate(int(arrived.sum()), seconds),
        texts_per_s=stats.rate(int(texts_per[calls.index[arrived]].sum()), seconds),
        tokens_per_s=stats.rate(int(tokens_per[calls.index[arrived]].sum()), seconds),
        latency_ms=stats.latency_summary(latencies(calls, first, last)),
    )


def latencies(calls: CallTable, first: int, last: int) -> np.ndarray:
    """Seconds from due to answer of the successful calls that belong to windows `first`..`last`: what
    every latency figure of a step is computed from."""
    done = calls.within(first, last) & (calls.code == OK)
    lat: np.ndarray = calls.end[done] - calls.sched[done]
    return lat


def warmup(calls: CallTable) -> Warmup:
    rows = calls.window == WARMUP
    codes = calls.code[rows]
    failed = codes[(codes != OK) & (codes != PENDING)]
    return Warmup(
        sent=int(rows.sum()), failed=int(failed.size), errors=stats.error_counts(failed, CODE_NAMES)
    )


def schedule(
    calls: CallTable,
    first: int,
    last: int,
    *,
    rate: float,
    late_after_s: float,
    cap_hits: int,
    seconds: float,
) -> Schedule:
    """The open loop's send lag over windows `first`..`last` (`seconds` long)."""
    rows = calls.within(first, last)
    lag = calls.start[rows] - calls.sched[rows]
    late = int((lag > late_after_s).sum())
    frac = late / lag.size if lag.size else 0.0

    def ms(value: float) -> float:
        return round(value * 1000, 3)

    return Schedule(
        target_rate=rate,
        sent_rate=stats.rate(lag.size, seconds),
        late_after_ms=late_after_s * 1000,
        late_calls=late,
        late_fraction=round(frac, 6),
        lag_p50_ms=ms(float(np.percentile(lag, 50))) if lag.size else None,
        lag_p99_ms=ms(float(np.percentile(lag, 99))) if lag.size else None,
        lag_max_ms=ms(float(lag.max())) if lag.size else None,
        in_flight_cap_hits=cap_hits,
        client_fell_behind=frac > FELL_BEHIND_FRACTION or cap_hits > 0,
    )


def consistency(fig: Figures) -> Consistency:
    return Consistency(
        completed_plus_failed_is_sent=fig.completed + fig.failed == fig.sent,
        percentiles_ordered=stats.percentiles_ordered(fig.latency_ms),
        errors_add_up=sum(fig.errors.values()) == fig.failed,
    )


def status_name(code: int) -> str:
    if code == PENDING:
        return NO_ANSWER
    return CODE_NAMES.get(code, f"CODE_{code}")


def outcomes(calls: CallTable, windows: Windows, first: int, last: int, *, deadline_s: float) -> Outcomes:
    """Windows `first`..`last` by status (each status's count, share and latency) and the goodput.

    The statuses are of the calls that belong to the windows (they add up to the calls sent). The goodput,
    like throughput, counts the answers that arrive inside the windows: OK ones within the deadline. Counted
    by sending window instead, a level whose queue is still filling would also be credited with the answers
    to its last calls that come after the window, and could show more goodput than the server delivered.

    NOTE: every latency here runs from the *scheduled* send (as in `figures`), and so does the deadline of
    the goodput: an OK answer that came after the deadline counted from there (the client sent it late,
    say) is no use to the caller it was due for, so it is OK but not good.
    """
    start, end = windows.bounds(first, last)
    rows = calls.within(first, last)
    code = calls.code[rows]
    latency = calls.end[rows] - calls.sched[rows]
    answered = code != PENDING
    sent = int(rows.sum())
    statuses: dict[str, StatusFigures] = {}
    values, counts = np.unique(code, return_counts=True)
    # OK first, then the most frequent: the order a reader scans them in.
    order = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda vc: (vc[0] != OK, -vc[1]))
    for value, count in order:
        of = code == value
        statuses[status_name(value)] = StatusFigures(
            calls=count,
            share=round(count / sent, 6),
            latency_ms=stats.latency_summary(latency[of & answered]),
        )
    # NaN ends (pending calls) compare false: they arrived in no window.
    arrived = (calls.code == OK) & (calls.end >= start) & (calls.end < end)
    good = int((arrived & (calls.end - calls.sched <= deadline_s)).sum())
    admitted = answered & (code != RESOURCE_EXHAUSTED)
    return Outcomes(
        deadline_s=deadline_s,
        sent=sent,
        statuses=statuses,
        good=good,
        goodput_per_s=stats.rate(good, end - start),
        admitted_latency_ms=stats.latency_summary(latency[admitted]),
    )


def answered_between(
    ends: np.ndarray, codes: np.ndarray, texts: np.ndarray, start: float, end: float
) -> tuple[int, int, dict[str, int]]:
    """Calls answered in [start, end): (OK calls, their texts, failures by status name)."""
    inside = (ends >= start) & (ends < end)
    ok = inside & (codes == OK)
    failed = codes[inside & (codes != OK)]
    return int(ok.sum()), int(texts[ok].sum()), stats.error_counts(failed, CODE_NAMES)
