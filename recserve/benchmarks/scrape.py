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
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from recserve.benchmarks.results import ServerView
from recserve.server.metrics import PREFIX as FAMILY_PREFIX
from recserve.server.metrics import Name, total

PREFIX = f"{FAMILY_PREFIX}_"

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

    def delta(self, before: Snapshot, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Each label set of `name`: its value here minus its value in `before` (0 if it was absent)."""
        return {
            labels: v - before.samples.get((name, labels), 0.0) for labels, v in self.series(name).items()
        }


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


def _ms(seconds: float | None) -> float | None:
    return _round(seconds * 1000 if seconds is not None else None, 3)


# A histogram family's samples (prometheus_client's exposition; the server's metrics module names the family).
def _sum(family: str) -> str:
    return f"{family}_sum"


def _count(family: str) -> str:
    return f"{family}_count"


def _bucket(family: str) -> str:
    return f"{family}_bucket"


def batched_texts(snapshot: Snapshot) -> float:
    """The texts the server has run in batches, every model together."""
    return snapshot.total(_sum(Name.BATCH_SIZE))


def histogram_delta(before: Snapshot, after: Snapshot, family: str) -> dict[str, int]:
    """Observations per bucket during the step, not cumulative: upper bound (as text) -> count."""
    # Summed over every other label (the model): one cumulative count per upper bound.
    by_le: dict[str, float] = {}
    for labels, value in after.delta(before, _bucket(family)).items():
        le = dict(labels).get("le", "")
        by_le[le] = by_le.get(le, 0.0) + value
    bounds = sorted((float(le), le, value) for le, value in by_le.items())
    out: dict[str, int] = {}
    below = 0.0
    for _, le, cumulative in bounds:
        out[le] = round(cumulative - below)
        below = cumulative
    return out


def _by_label(
    before: Snapshot, after: Snapshot, counter: str, key: Callable[[dict[str, str]], str]
) -> dict[str, int]:
    """A counter's increase during the step, summed by `key` of the labels; label sets that did not move
    are left out."""
    out: dict[str, int] = {}
    for labels, value in after.delta(before, total(counter)).items():
        name = key(dict(labels))
        out[name] = out.get(name, 0) + round(value)
    return {k: v for k, v in out.items() if v}


def server_view(before: Snapshot, after: Snapshot) -> ServerView:
    """What the server saw between two scrapes: batching, padding, where the time went, errors."""

    def delta(name: str) -> float:
        return after.total(name) - before.total(name)

    def mean_of(family: str) -> float | None:
        return _mean(delta(_sum(family)), delta(_count(family)))

    batches = delta(_count(Name.BATCH_SIZE))
    request_s = mean_of(Name.REQUEST_SECONDS)
    tokenize_s = mean_of(Name.TOKENIZE_SECONDS)
    queue_s = mean_of(Name.QUEUE_WAIT_SECONDS)
    infer_s = mean_of(Name.INFERENCE_SECONDS)
    real_tokens = delta(total(Name.BATCH_REAL_TOKENS))
    padded_tokens = delta(_sum(Name.BATCH_TOKENS))

    def share(part: float | None) -> float | None:
        # Mean per observation over mean request duration: a call waits in the queue once and rides one
        # batch (the usual case), so this is the fraction of a typical call's latency spent there.
        return _round(part / request_s) if part is not None and request_s else None

    def reason(labels: dict[str, str]) -> str:
        return labels.get("reason", "?")

    return ServerView(
        seconds=_round(after.at - before.at, 3),
        batches=round(batches),
        mean_batch_size=_round(_mean(delta(_sum(Name.BATCH_SIZE)), batches), 3),
        mean_batch_tokens=_round(_mean(padded_tokens, batches), 1),
        # Token-weighted when the server counts real tokens; otherwise the mean of the per-batch ratios.
        padding_ratio=_round(padded_tokens / real_tokens if real_tokens > 0 else mean_of(Name.PADDING_RATIO)),
        mean_request_ms=_ms(request_s),
        mean_tokenize_ms=_ms(tokenize_s),
        mean_queue_wait_ms=_ms(queue_s),
        mean_inference_ms=_ms(infer_s),
        tokenize_share=share(tokenize_s),
        queue_share=share(queue_s),
        inference_share=share(infer_s),
        backlog_seconds=_round(after.total(Name.BACKLOG_SECONDS), 4),
        queue_texts=_round(after.total(Name.QUEUE_TEXTS), 0),
        in_flight=_round(after.total(Name.IN_FLIGHT), 0),
        requests=_by_label(
            before, after, Name.REQUESTS, lambda labels: f"{labels.get('rpc', '?')}:{labels.get('code', '?')}"
        ),
        failures=_by_label(before, after, Name.FAILURES, reason),
        dropped_texts=_by_label(before, after, Name.DROPPED_TEXTS, reason),
        batch_size_histogram=histogram_delta(before, after, Name.BATCH_SIZE),
    )
