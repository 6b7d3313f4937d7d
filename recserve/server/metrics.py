"""Prometheus metrics, declared once: prefix `recserve_`, base units, explicit buckets, registry passed in."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "recserve"
# Geometric, 0.25 ms .. ~16 s: the encoder's latency spans 4+ orders of magnitude between batch 1 on a GPU
# and a long batch on a small CPU.
DURATION_BUCKETS = tuple(0.00025 * 2**k for k in range(17))
BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024 texts
TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 18))  # 16 .. 131072 padded tokens
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0, 8.0)


class Metrics:
    """Every metric family of the server; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            f"{PREFIX}_requests", "Calls by RPC and gRPC status code", ("rpc", "code"), registry=r
        )
        self.texts = Counter(
            f"{PREFIX}_texts",
            "Texts (or pairs) run through the model for calls that succeeded",
            ("rpc",),
            registry=r,
        )
        self.failures = Counter(
            f"{PREFIX}_failures", "Failed calls or dropped texts by reason", ("reason",), registry=r
        )
        self.request_seconds = histogram("request_duration_seconds", "Whole call", DURATION_BUCKETS, ("rpc",))
        self.tokenize_seconds = histogram("tokenize_seconds", "Tokenisation of one call", DURATION_BUCKETS)
        self.queue_wait_seconds = histogram(
            "queue_wait_seconds", "From enqueue to the call's first batch starting", DURATION_BUCKETS
        )
        self.inference_seconds = histogram(
            "inference_seconds", "One batch through the model", DURATION_BUCKETS
        )
        self.batch_size = histogram("batch_size", "Texts per batch", BATCH_SIZE_BUCKETS)
        self.batch_tokens = histogram(
            "batch_tokens", "Padded tokens per batch (longest x count)", TOKEN_BUCKETS
        )
        self.batch_real_tokens = Counter(
            f"{PREFIX}_batch_real_tokens", "Real (unpadded) tokens run", registry=r
        )
        self.padding_ratio = histogram(
            "padding_ratio", "Padded tokens / real tokens per batch", PADDING_BUCKETS
        )
        self.queue_texts = Gauge(f"{PREFIX}_queue_texts", "Texts waiting for a batch", registry=r)
        self.queue_tokens = Gauge(f"{PREFIX}_queue_tokens", "Tokens waiting for a batch", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight", "Calls being handled", registry=r)
        self.backlog_seconds = Gauge(
            f"{PREFIX}_backlog_seconds",
            "Queued tokens / recent tokens per second: seconds of work waiting (an autoscaling signal)",
            registry=r,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The model served (value 1)",
            ("name", "sha256", "precision", "provider"),
            registry=r,
        )

    def set_model(self, name: str, sha256: str, precision: str, provider: str) -> None:
        self.model_info.labels(name, sha256, precision, provider).set(1)

    def watch_backlog(self, backlog_seconds: Callable[[], float]) -> None:
        """The backlog gauge reads the batcher's own estimate at scrape time."""
        self.backlog_seconds.set_function(backlog_seconds)

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
        self.failures.labels(reason).inc(texts)

    def queue_changed(self, texts: int, tokens: int) -> None:
        self.queue_texts.set(texts)
        self.queue_tokens.set(tokens)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[int, object]:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns (bound port, server to shut down)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port), server
