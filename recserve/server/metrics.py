"""Prometheus metrics, declared once: prefix `recserve_`, base units, explicit buckets, registry passed in.

The family names are module constants (`Name.*`) so that the benchmark's scraper reads the very names the
server writes; a counter's exposed sample carries `_total`, a histogram's `_sum`, `_count` and `_bucket`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

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
    FAILED_SECONDS: Final = f"{PREFIX}_failed_request_seconds"
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


# Every family but the model info carries this label: the served model's name, or "" for a call that named
# no served model (an unknown name, bytes that did not parse, a refused token). Only served names become
# label values, so a caller cannot grow the series by sending made-up names.
MODEL = "model"


class Metrics:
    """Every metric family of the server; `for_model` gives one model's view (and batcher observer)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, (MODEL, *labels), buckets=buckets, registry=r)

        self.requests = Counter(
            Name.REQUESTS, "Calls by model, RPC and gRPC status code", (MODEL, "rpc", "code"), registry=r
        )
        self.texts = Counter(
            Name.TEXTS,
            "Texts (or pairs) run through the model for calls that succeeded",
            (MODEL, "rpc"),
            registry=r,
        )
        self.failures = Counter(
            Name.FAILURES, "Failed calls by reason (one per call)", (MODEL, "reason"), registry=r
        )
        self.dropped_texts = Counter(
            Name.DROPPED_TEXTS,
            "Queued texts the batcher dropped before inference, by reason (deadline, cancelled)",
            (MODEL, "reason"),
            registry=r,
        )
        self.request_seconds = histogram(Name.REQUEST_SECONDS, "Whole call", DURATION_BUCKETS, ("rpc",))
        # So that a success's time is known apart from a failure's (KServe's ModelStatistics reports both)
        # without a second histogram, or a status label on the first.
        self.failed_seconds = Counter(
            Name.FAILED_SECONDS,
            "Seconds spent in calls that failed (their part of request_duration_seconds)",
            (MODEL, "rpc"),
            registry=r,
        )
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
        self.batch_real_tokens = Counter(
            Name.BATCH_REAL_TOKENS, "Real (unpadded) tokens run", (MODEL,), registry=r
        )
        self.padding_ratio = histogram(
            Name.PADDING_RATIO, "Padded tokens / real tokens per batch", PADDING_BUCKETS
        )
        self.queue_texts = Gauge(Name.QUEUE_TEXTS, "Texts waiting for a batch", (MODEL,), registry=r)
        self.queue_tokens = Gauge(Name.QUEUE_TOKENS, "Tokens waiting for a batch", (MODEL,), registry=r)
        self.in_flight = Gauge(Name.IN_FLIGHT, "Calls being handled that run the model", (MODEL,), registry=r)
        self.backlog_seconds = Gauge(
            Name.BACKLOG_SECONDS,
            "Queued tokens / recent tokens per second: seconds of work waiting (an autoscaling signal)",
            (MODEL,),
            registry=r,
        )
        self.model_info = Gauge(
            Name.MODEL_INFO,
            "The models served (value 1)",
            (MODEL, "task", "sha256", "precision", "provider"),
            registry=r,
        )

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def call_finished(
        self, model: str, rpc: str, code: str, reason: str | None, seconds: float | None = None
    ) -> None:
        """Counts one finished call, and its failure reason when it failed."""
        self.requests.labels(model, rpc, code).inc()
        if seconds is not None:
            self.request_seconds.labels(model, rpc).observe(seconds)
        if reason is not None:
            self.failures.labels(model, reason).inc()
            if seconds is not None:
                self.failed_seconds.labels(model, rpc).inc(seconds)


class ModelMetrics:
    """The families bound to one model's label: what its engine and batcher report into."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self.tokenize_seconds = metrics.tokenize_seconds.labels(name)
        self._metrics = metrics
        self._queue_wait = metrics.queue_wait_seconds.labels(name)
        self._inference = metrics.inference_seconds.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._batch_tokens = metrics.batch_tokens.labels(name)
        self._real_tokens = metrics.batch_real_tokens.labels(name)
        self._padding = metrics.padding_ratio.labels(name)
        self._queue_texts = metrics.queue_texts.labels(name)
        self._queue_tokens = metrics.queue_tokens.labels(name)

    def set_info(self, task: str, sha256: str, precision: str, provider: str) -> None:
        self._metrics.model_info.labels(self.name, task, sha256, precision, provider).set(1)

    def watch(self, backlog_seconds: Callable[[], float], in_flight: Callable[[], int]) -> None:
        """These gauges read the batcher's estimate and the engine's count at scrape time, so neither
        number is kept twice."""
        self._metrics.backlog_seconds.labels(self.name).set_function(backlog_seconds)
        self._metrics.in_flight.labels(self.name).set_function(in_flight)

    def texts(self, rpc: str, count: int) -> None:
        self._metrics.texts.labels(self.name, rpc).inc(count)

    # --- batcher observer -------------------------------------------------------------------------
    def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        self._batch_size.observe(size)
        self._batch_tokens.observe(padded_tokens)
        self._real_tokens.inc(real_tokens)
        self._padding.observe(padded_tokens / max(real_tokens, 1))

    def batch_finished(self, size: int, seconds: float, ok: bool) -> None:
        self._inference.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def dropped(self, reason: str, texts: int) -> None:
        self._metrics.dropped_texts.labels(self.name, reason).inc(texts)

    def queue_changed(self, texts: int, tokens: int) -> None:
        self._queue_texts.set(texts)
        self._queue_tokens.set(tokens)


# The /metrics endpoint: a request head larger than this is refused, and a connection that sends nothing
# for this long is closed, so an idle or slow client costs one socket, never a thread.
_MAX_HEAD_BYTES = 8192
_IDLE_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 256


class MetricsServer:
    """Prometheus /metrics over HTTP/1.1 on the event loop: one small task per connection, no threads.

    NOTE: the scrape itself (`generate_latest`) runs on the loop too: it takes about a millisecond, and the
    gauges it reads (queue, backlog) belong to the loop.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port, limit=_MAX_HEAD_BYTES)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stops listening and closes every connection, idle or not, at once."""
        if self._server is None:
            return
        self._closed = True
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self._closed or len(self._connections) > _MAX_CONNECTIONS:
                return
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT_S)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                response, keep_alive = self._answer(head)
                writer.write(response)
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            self._connections.discard(task)
            writer.close()

    def _answer(self, head: bytes) -> tuple[bytes, bool]:
        """The whole response to one request head, and whether the connection stays open."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"bad request\n"), False
        method, target, version = parts
        # A body is never expected; rather than read it, answer and close.
        keep_alive = (
            version == "HTTP/1.1"
            and headers.get("connection", "").lower() != "close"
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET /metrics\n", keep_alive), keep_alive
        if target.split("?", 1)[0] != "/metrics":
            return _response("404 Not Found", b"only /metrics is served here\n", keep_alive), keep_alive
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        return _response("200 OK", body, keep_alive, content_type, head_only=method == "HEAD"), keep_alive


def _response(
    status: str,
    body: bytes,
    keep_alive: bool = False,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + (b"" if head_only else body)


async def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Starts the /metrics endpoint on the running loop; `close()` it on the way out."""
    server = MetricsServer(metrics.registry)
    await server.start(host, port)
    return server
