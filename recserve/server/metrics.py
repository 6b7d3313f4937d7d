"""Prometheus metrics, declared once: prefix `recserve_`, base units, explicit buckets, registry passed in.

The family names are module constants (`Name.*`) so that the benchmark's scraper reads the very names the
server writes; a counter's exposed sample carries `_total`, a histogram's `_sum`, `_count` and `_bucket`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "recserve"
# Geometric, 0.25 ms .. ~16 s: the encoder's latency spans 4+ orders of magnitude between batch 1 on a GPU
# and a long batch on a small CPU.
DURATION_BUCKETS = tuple(0.00025 * 2**k for k in range(17))
BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024 texts
TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 18))  # 16 .. 131072 padded tokens
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0, 8.0)


class Name:
    """Every family's name as Prometheus exposes it (counters without their `_total` suffix)."""

    REQUESTS: Final = f"{PREFIX}_requests"
    TEXTS: Final = f"{PREFIX}_texts"
    FAILURES: Final = f"{PREFIX}_failures"
    DROPPED_TEXTS: Final = f"{PREFIX}_dropped_texts"
    REQUEST_SECONDS: Final = f"{PREFIX}_request_duration_seconds"
    TOKENIZE_SECONDS: Final = f"{PREFIX}_tokenize_seconds"
    QUEUE_WAIT_SECONDS: Final = f"{PREFIX}_queue_wait_seconds"
    INFERENCE_SECONDS: Final = f"{PREFIX}_inference_seconds"
    BATCH_SIZE: Final = f"{PREFIX}_batch_size"
    BATCH_TOKENS: Final = f"{PREFIX}_batch_tokens"
    BATCH_REAL_TOKENS: Final = f"{PREFIX}_batch_real_tokens"
    PADDING_RATIO: Final = f"{PREFIX}_padding_ratio"
    QUEUE_TEXTS: Final = f"{PREFIX}_queue_texts"
    QUEUE_TOKENS: Final = f"{PREFIX}_queue_tokens"
    IN_FLIGHT: Final = f"{PREFIX}_in_flight"
    BACKLOG_SECONDS: Final = f"{PREFIX}_backlog_seconds"
    MODEL_INFO: Final = f"{PREFIX}_model_info"


def total(counter: str) -> str:
    """The sample name of a counter family: `recserve_requests` -> `recserve_requests_total`."""
    return f"{counter}_total"


class Metrics:
    """Every metric family of the server; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            Name.REQUESTS, "Calls by RPC and gRPC status code", ("rpc", "code"), registry=r
        )
        self.texts = Counter(
            Name.TEXTS,
            "Texts (or pairs) run through the model for calls that succeeded",
            ("rpc",),
            registry=r,
        )
        self.failures = Counter(
            Name.FAILURES, "Failed calls by reason (one per call)", ("reason",), registry=r
        )
        self.dropped_texts = Counter(
            Name.DROPPED_TEXTS,
            "Queued texts the batcher dropped before inference, by reason (deadline, cancelled)",
            ("reason",),
            registry=r,
        )
        self.request_seconds = histogram(Name.REQUEST_SECONDS, "Whole call", DURATION_BUCKETS, ("rpc",))
        self.tokenize_seconds = histogram(Name.TOKENIZE_SECONDS, "Tokenisation of one call", DURATION_BUCKETS)
        self.queue_wait_seconds = histogram(
            Name.QUEUE_WAIT_SECONDS, "From enqueue to the call's first batch starting", DURATION_BUCKETS
        )
        self.inference_seconds = histogram(
            Name.INFERENCE_SECONDS, "One batch through the model", DURATION_BUCKETS
        )
        self.batch_size = histogram(Name.BATCH_SIZE, "Texts per batch", BATCH_SIZE_BUCKETS)
        self.batch_tokens = histogram(
            Name.BATCH_TOKENS, "Padded tokens per batch (longest x count)", TOKEN_BUCKETS
        )
        self.batch_real_tokens = Counter(Name.BATCH_REAL_TOKENS, "Real (unpadded) tokens run", registry=r)
        self.padding_ratio = histogram(
            Name.PADDING_RATIO, "Padded tokens / real tokens per batch", PADDING_BUCKETS
        )
        self.queue_texts = Gauge(Name.QUEUE_TEXTS, "Texts waiting for a batch", registry=r)
        self.queue_tokens = Gauge(Name.QUEUE_TOKENS, "Tokens waiting for a batch", registry=r)
        self.in_flight = Gauge(Name.IN_FLIGHT, "Embed and Score calls being handled", registry=r)
        self.backlog_seconds = Gauge(
            Name.BACKLOG_SECONDS,
            "Queued tokens / recent tokens per second: seconds of work waiting (an autoscaling signal)",
            registry=r,
        )
        self.model_info = Gauge(
            Name.MODEL_INFO,
            "The model served (value 1)",
            ("name", "sha256", "precision", "provider"),
            registry=r,
        )

    def set_model(self, name: str, sha256: str, precision: str, provider: str) -> None:
        self.model_info.labels(name, sha256, precision, provider).set(1)

    def watch(self, backlog_seconds: Callable[[], float], in_flight: Callable[[], int]) -> None:
        """These gauges read the batcher's estimate and the engine's count at scrape time, so neither
        number is kept twice."""
        self.backlog_seconds.set_function(backlog_seconds)
        self.in_flight.set_function(in_flight)

    # --- batcher observer -------------------------------------------------------------------------
    def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.batch_real_tokens.inc(real_tokens)
        self.padding_ratio.observe(padded_tokens / max(real_tokens, 1))

    def batch_finished(self, size: int, seconds: float, ok: bool) -> None:
        self.inference_seconds.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def dropped(self, reason: str, texts: int) -> None:
        self.dropped_texts.labels(reason).inc(texts)

    def queue_changed(self, texts: int, tokens: int) -> None:
        self.queue_texts.set(texts)
        self.queue_tokens.set(tokens)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[int, object]:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns (bound port, server to shut down)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port), server
