"""The server's own view of a step: its Prometheus metrics scraped before and after, and the difference.

Counters and histograms are differenced (only what happened during the step counts); gauges are read at the
end of the measurement, while the load is still on.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "recserve_"

Key = tuple[str, tuple[tuple[str, str], ...]]


class ScrapeError(RuntimeError):
    """The metrics endpoint could not be read or is not a recserve server's."""


@dataclass
class Snapshot:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""

    at: float
    samples: dict[Key, float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **match: str) -> float:
        """Sum over every label set of `name` that matches `match`."""
        return sum(
            v
            for (n, labels), v in self.samples.items()
            if n == name and all(dict(labels).get(k) == m for k, m in match.items())
        )

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse(text: str, at: float | None = None) -> Snapshot:
    snap = Snapshot(at=time.monotonic() if at is None else at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX):
                snap.samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return snap


def fetch(url: str, timeout: float = 5.0) -> Snapshot:
    """One scrape (blocking); ScrapeError when unreachable or without any recserve_ metric."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ScrapeError(f"cannot read metrics at {url}: {exc}") from None
    try:
        snap = parse(text)
    except ValueError as exc:
        raise ScrapeError(f"{url} is not Prometheus text: {exc}") from None
    if not snap.samples:
        raise ScrapeError(f"{url} has no {PREFIX}* metrics: not a recserve server's metrics endpoint")
    return snap


async def fetch_async(url: str, within: float = 5.0) -> Snapshot:
    # urllib blocks: off the event loop so the load loops keep their schedule meanwhile.
    return await asyncio.to_thread(fetch, url, within)


def _mean(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def histogram_delta(before: Snapshot, after: Snapshot, name: str) -> dict[str, int]:
    """Observations per bucket during the step, not cumulative: upper bound (as text) -> count."""
    bounds = []
    for labels, value in after.series(f"{name}_bucket").items():
        le = dict(labels).get("le", "")
        bounds.append((float(le), le, value - before.samples.get((f"{name}_bucket", labels), 0.0)))
    bounds.sort()
    out: dict[str, int] = {}
    below = 0.0
    for _, le, cumulative in bounds:
        out[le] = round(cumulative - below)
        below = cumulative
    return out


def server_view(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What the server saw between two scrapes: batching, padding, where the time went, errors."""

    def delta(name: str, **match: str) -> float:
        return after.total(name, **match) - before.total(name, **match)

    batches = delta("recserve_batch_size_count")
    request_s = _mean(
        delta("recserve_request_duration_seconds_sum"), delta("recserve_request_duration_seconds_count")
    )
    tokenize_s = _mean(delta("recserve_tokenize_seconds_sum"), delta("recserve_tokenize_seconds_count"))
    queue_s = _mean(delta("recserve_queue_wait_seconds_sum"), delta("recserve_queue_wait_seconds_count"))
    infer_s = _mean(delta("recserve_inference_seconds_sum"), delta("recserve_inference_seconds_count"))
    real_tokens = delta("recserve_batch_real_tokens_total")
    padded_tokens = delta("recserve_batch_tokens_sum")

    def share(part: float | None) -> float | None:
        # Mean per observation over mean request duration: a call waits in the queue once and rides one
        # batch (the usual case), so this is the fraction of a typical call's latency spent there.
        return _round(part / request_s) if part is not None and request_s else None

    requests: dict[str, int] = {}
    for labels, value in after.series("recserve_requests_total").items():
        lab = dict(labels)
        n = round(value - before.samples.get(("recserve_requests_total", labels), 0.0))
        if n:
            key = f"{lab.get('rpc', '?')}:{lab.get('code', '?')}"
            requests[key] = requests.get(key, 0) + n
    failures = {
        dict(labels).get("reason", "?"): round(
            v - before.samples.get(("recserve_failures_total", labels), 0.0)
        )
        for labels, v in after.series("recserve_failures_total").items()
    }
    return {
        "seconds": _round(after.at - before.at, 3),
        "batches": round(batches),
        "mean_batch_size": _round(_mean(delta("recserve_batch_size_sum"), batches), 3),
        "mean_batch_tokens": _round(_mean(padded_tokens, batches), 1),
        # Token-weighted when the server counts real tokens; otherwise the mean of the per-batch ratios.
        "padding_ratio": _round(
            padded_tokens / real_tokens
            if real_tokens > 0
            else _mean(delta("recserve_padding_ratio_sum"), delta("recserve_padding_ratio_count"))
        ),
        "mean_request_ms": _round(request_s * 1000 if request_s is not None else None, 3),
        "mean_tokenize_ms": _round(tokenize_s * 1000 if tokenize_s is not None else None, 3),
        "mean_queue_wait_ms": _round(queue_s * 1000 if queue_s is not None else None, 3),
        "mean_inference_ms": _round(infer_s * 1000 if infer_s is not None else None, 3),
        "tokenize_share": share(tokenize_s),
        "queue_share": share(queue_s),
        "inference_share": share(infer_s),
        "backlog_seconds": _round(after.get("recserve_backlog_seconds"), 4),
        "queue_texts": _round(after.get("recserve_queue_texts"), 0),
        "in_flight": _round(after.get("recserve_in_flight"), 0),
        "requests": requests,
        "failures": {k: v for k, v in failures.items() if v},
        "batch_size_histogram": histogram_delta(before, after, "recserve_batch_size"),
    }
