"""Server lifecycle: bind -> warm up -> SERVING -> (signal) -> NOT_SERVING -> drain -> exit.

`running_server` is the composition root that tests and `recserve serve` share: it takes the model (the
seam of server/model.py), so tests can serve a fake one. `serve` loads the real model and adds signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from recserve.server.batcher import Batcher, BatcherConfig
from recserve.server.engine import Engine, Limits
from recserve.server.metrics import Metrics, MetricsServer, serve_metrics
from recserve.server.model import Backend, Model
from recserve.server.security import Security
from recserve.server.service import SERVICE_NAME, InferenceService, add_to_server, build_info
from recserve.server.settings import ServerSettings
from recserve.tensors import Encoded
from recserve.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

# Health is reported for the whole server ("") and for the inference service by name.
_HEALTH_SERVICES = ("", SERVICE_NAME)


@dataclass
class RunningServer:
    """Handles to a started server (ports bound, SERVING)."""

    settings: ServerSettings
    port: int
    metrics_port: int | None
    engine: Engine
    model: Model
    metrics: Metrics
    health: health.aio.HealthServicer
    grpc_server: grpc.aio.Server
    metrics_server: MetricsServer | None = None
    security: Security | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Let clients keep connections alive through idle periods without being GOAWAY'd.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.max_connection_age_s > 0:
        # gRPC keeps a connection for ever, so a replica added by a scale-up would get no traffic from the
        # clients already connected; a GOAWAY after this age makes them reconnect, and calls in flight get
        # the drain grace to finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
        ]
    return options


def warmup_batches(max_batch_size: int, max_batch_tokens: int, max_length: int) -> list[list[Encoded]]:
    """A batch of each size class the batcher forms: powers of two up to the largest batch, each at the
    longest length the token budget allows (capped at max_length), plus one batch-1 run per length class."""
    batches = []
    size = 1
    while True:
        length = max(2, min(max_length, max_batch_tokens // size))
        batches.append([_dummy(length)] * size)
        if size >= max_batch_size:
            break
        size = min(size * 2, max_batch_size)
    length = 8
    while length < max_length:
        batches.append([_dummy(length)])
        length *= 2
    return batches


def _dummy(length: int) -> Encoded:
    ids = np.full(length, 1000, dtype=np.int64)
    return Encoded(ids=ids, type_ids=np.zeros(length, dtype=np.int64))


async def _warm_up(
    backend: Backend, max_length: int, settings: ServerSettings, executor: ThreadPoolExecutor
) -> None:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    batches = warmup_batches(settings.max_batch_size, settings.max_batch_tokens, max_length)
    for batch in batches:
        await loop.run_in_executor(executor, backend.warm_up, batch)
    log.info(
        "warm-up done", extra={"batches": len(batches), "seconds": round(time.perf_counter() - started, 3)}
    )


@contextlib.asynccontextmanager
async def running_server(
    settings: ServerSettings,
    model: Model,
    registry: CollectorRegistry | None = None,
    *,
    before_ready: Callable[[RunningServer], Awaitable[None]] | None = None,
) -> AsyncIterator[RunningServer]:
    """Binds, warms `model` up and yields a SERVING server; drains on exit.

    Health answers NOT_SERVING from the moment the port is bound until warm-up (and `before_ready`, a hook
    for tests) is done, and again from the start of the drain.
    """
    manifest, backend = model.manifest, model.backend
    loop = asyncio.get_running_loop()
    security = Security.from_settings(settings)
    metrics = Metrics(registry)
    metrics.set_model(
        manifest.model_name, manifest.source.weights_sha256, backend.precision, backend.provider
    )
    tokenize_executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
    model_executor = ThreadPoolExecutor(max_workers=backend.concurrent_batches, thread_name_prefix="model")
    health_servicer = health.aio.HealthServicer()
    grpc_server = grpc.aio.server(options=grpc_options(settings), interceptors=security.interceptors(metrics))

    def on_fatal(exc: BaseException) -> None:
        # The batch loop died: every later call would hang, so refuse them and tell the probes.
        log.critical("batch loop died; serving stops", exc_info=exc)
        engine.close("the server's batch loop failed; it is not serving (see its log)")
        task = loop.create_task(_set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING))
        background.add(task)
        task.add_done_callback(background.discard)

    background: set[asyncio.Task[None]] = set()
    batcher = Batcher(
        backend.run,
        BatcherConfig.from_settings(settings, backend.concurrent_batches),
        model_executor,
        observer=metrics,
        on_fatal=on_fatal,
    )
    engine = Engine(
        manifest,
        model.tokenizer,
        tokenize_executor,
        batcher,
        Limits(settings.max_texts_per_call, settings.max_text_bytes),
    )
    metrics.watch(backlog_seconds=lambda: batcher.stats.backlog_seconds, in_flight=lambda: engine.in_flight)
    limits = pb.Limits(
        max_texts_per_call=settings.max_texts_per_call,
        max_text_bytes=settings.max_text_bytes,
        max_message_bytes=settings.max_message_bytes,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_size=settings.max_batch_size,
        max_queue_texts=settings.max_queue_texts,
    )
    info = build_info(manifest, backend.precision, backend.provider, limits, backend.verified_sha256)
    servicer = InferenceService(engine, metrics, info)
    add_to_server(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server,
    )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = security.add_port(grpc_server, f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind gRPC to {settings.host}:{settings.port}")
    if security.token is not None and security.tls is None:
        log.warning("token auth without TLS: the token crosses the network in plain text")
    metrics_server = None
    if settings.metrics and settings.metrics_port is not None:
        metrics_server = await serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
    metrics_address = None
    if metrics_server is not None:
        metrics_address = "{}:{}".format(*metrics_server.address)
    await grpc_server.start()
    log.info(
        "listening",
        extra={"address": f"{settings.host}:{port}", "metrics": metrics_address, **security.describe()},
    )
    running = RunningServer(
        settings,
        port,
        None if metrics_server is None else metrics_server.address[1],
        engine,
        model,
        metrics,
        health_servicer,
        grpc_server,
        metrics_server,
        security,
    )
    try:
        await batcher.start()
        if settings.warmup:
            await _warm_up(backend, manifest.max_length, settings, model_executor)
        if before_ready is not None:
            await before_ready(running)
        engine.open()
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "model": manifest.model_name,
                "precision": backend.precision,
                "provider": backend.provider,
            },
        )
        yield running
    finally:
        log.info("draining", extra={"grace_s": settings.grace_period_s})
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        engine.close("the server is shutting down: retry on another replica")
        # NOTE: the gRPC server keeps accepting calls while the in-flight ones finish, so that health
        # probes still get their NOT_SERVING answer (and new inference calls a clear UNAVAILABLE) during
        # the drain instead of a refused connection.
        drained = await engine.wait_idle(settings.grace_period_s)
        if not drained:
            log.warning("grace period over with calls in flight; they are cut off")
            engine.cut_off()  # each caller still gets its answer: UNAVAILABLE
        await batcher.stop(drain=drained, timeout=1.0)
        if not drained:
            # The batches still running have nobody waiting for them; a long one takes seconds on a CPU.
            backend.stop_running()
            await engine.wait_idle(1.0)
        await grpc_server.stop(0 if not drained else 1.0)
        tokenize_executor.shutdown(wait=True, cancel_futures=True)
        model_executor.shutdown(wait=True, cancel_futures=True)
        if metrics_server is not None:
            await metrics_server.close()
        log.info("stopped")


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in _HEALTH_SERVICES:
        await servicer.set(name, status)


async def serve(settings: ServerSettings) -> int:
    """Runs until SIGTERM or SIGINT, then drains within the grace period; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Imported here: the composition root above never needs onnxruntime, the real model does.
    from recserve.server.runtime import load_model

    # Fails on an unusable TLS or token file before the model loads (running_server reads them again).
    Security.from_settings(settings)
    model = await loop.run_in_executor(None, load_model, settings)
    async with running_server(settings, model) as running:
        assert running.security is not None
        loop.add_signal_handler(signal.SIGHUP, running.security.reload)
        await stop.wait()
        log.info("signal received, shutting down")
    return 0
