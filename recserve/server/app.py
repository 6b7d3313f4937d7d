"""Server lifecycle: bind -> warm up -> SERVING -> (signal) -> NOT_SERVING -> drain -> exit.

`running_server` is the composition root that tests and `recserve serve` share: it takes the model (the
seam of server/model.py), so tests can serve a fake one. `serve` loads the real model and adds signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from recserve import threads
from recserve.catalog.errors import ModelMismatch
from recserve.catalog.store import Catalog
from recserve.server.engine import Engine, Limits
from recserve.server.kserve import SERVICE as KSERVE_SERVICE
from recserve.server.kserve import KServeService
from recserve.server.metrics import Metrics, MetricsServer, serve_metrics
from recserve.server.model import Model
from recserve.server.recommend import CatalogSearcher, Recommender
from recserve.server.reflection import enable_reflection
from recserve.server.registry import SERVICE_NAME, ServedModel, ServedModels, compose
from recserve.server.security import Security
from recserve.server.service import InferenceService, add_to_server, build_info, list_models
from recserve.server.settings import ServerSettings
from recserve.tensors import Encoded
from recserve.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

# Health is reported for the whole server ("") and for each inference service (recserve.v1, KServe v2).
_HEALTH_SERVICES = ("", SERVICE_NAME, KSERVE_SERVICE.full_name)


@dataclass
class RunningServer:
    """Handles to a started server (ports bound, SERVING)."""

    settings: ServerSettings
    port: int
    metrics_port: int | None
    models: ServedModels
    metrics: Metrics
    health: health.aio.HealthServicer
    grpc_server: grpc.aio.Server
    recommender: Recommender
    metrics_server: MetricsServer | None = None
    security: Security | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def engine(self) -> Engine:
        """The default model's engine (the only one, for a single-model server)."""
        return self.models.default.engine

    @property
    def model(self) -> Model:
        return self.models.default.model


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


def warmup_batches(
    max_batch_size: int, max_batch_tokens: int, max_length: int, token_id: int = 0
) -> list[list[Encoded]]:
    """A batch of each size class the batcher forms: powers of two up to the largest batch, each at the
    longest length the token budget allows (capped at max_length), plus one batch-1 run per length class.

    Every token is `token_id`: the model's pad id, the one id every vocabulary has (a small one, such as a
    Chinese character vocabulary, may hold no id 1000)."""
    batches = []
    size = 1
    while True:
        length = max(2, min(max_length, max_batch_tokens // size))
        batches.append([_dummy(length, token_id)] * size)
        if size >= max_batch_size:
            break
        size = min(size * 2, max_batch_size)
    length = 8
    while length < max_length:
        batches.append([_dummy(length, token_id)])
        length *= 2
    return batches


def _dummy(length: int, token_id: int) -> Encoded:
    ids = np.full(length, token_id, dtype=np.int64)
    return Encoded(ids=ids, type_ids=np.zeros(length, dtype=np.int64))


async def warm_up(served: ServedModel, settings: ServerSettings) -> None:
    """Runs a batch of each size and length class the batcher forms on the model threads (warmup_batches),
    so that the first calls do not pay for ORT's first runs of each shape."""
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    manifest = served.model.manifest
    batches = warmup_batches(
        settings.max_batch_size, settings.max_batch_tokens, manifest.max_length, manifest.pad_token_id
    )
    for batch in batches:
        await loop.run_in_executor(served.model_executor, served.model.backend.warm_up, batch)
    log.info(
        "warm-up done",
        extra={
            "model": served.name,
            "batches": len(batches),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


def _limits(settings: ServerSettings) -> pb.Limits:
    return pb.Limits(
        max_texts_per_call=settings.max_texts_per_call,
        max_text_bytes=settings.max_text_bytes,
        max_message_bytes=settings.max_message_bytes,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_size=settings.max_batch_size,
        max_queue_texts=settings.max_queue_texts,
    )


def _named(settings: ServerSettings, models: Model | Sequence[tuple[str, Model]]) -> list[tuple[str, Model]]:
    if isinstance(models, Model):
        # One model: it takes the name of the first repository the settings serve.
        return [(settings.served_models()[0][0], models)]
    return list(models)


@contextlib.asynccontextmanager
async def running_server(
    settings: ServerSettings,
    models: Model | Sequence[tuple[str, Model]],
    registry: CollectorRegistry | None = None,
    *,
    catalogs: Sequence[tuple[str, Catalog]] = (),
    before_ready: Callable[[RunningServer], Awaitable[None]] | None = None,
) -> AsyncIterator[RunningServer]:
    """Binds, warms the models up and yields a SERVING server; drains on exit.

    `models` is one model or (name, model) pairs, the default first unless the settings name another;
    `catalogs` are the opened item catalogs Recommend searches (each checked by `check_catalogs`).
    Health answers NOT_SERVING from the moment the port is bound until warm-up (and `before_ready`, a hook
    for tests) is done, and again from the start of the drain.
    """
    named = _named(settings, models)
    loop = asyncio.get_running_loop()
    security = Security.from_settings(settings)
    metrics = Metrics(registry)
    health_servicer = health.aio.HealthServicer()
    grpc_server = grpc.aio.server(options=grpc_options(settings), interceptors=security.interceptors(metrics))
    background: set[asyncio.Task[None]] = set()

    def on_fatal(name: str, exc: BaseException) -> None:
        # A batch loop died: every later call to it would hang, so refuse them and tell the probes (the
        # whole server: a replica with a dead model should be replaced, not half-used).
        log.critical("batch loop died; serving stops", exc_info=exc, extra={"model": name})
        for served in served_models:
            served.engine.close("the server's batch loop failed; it is not serving (see its log)")
        task = loop.create_task(
            _set_health(health_servicer, served_models, health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        background.add(task)
        task.add_done_callback(background.discard)

    limits = _limits(settings)
    served_list = []
    for name, model in named:
        manifest, backend = model.manifest, model.backend
        model_metrics = metrics.for_model(name)
        model_metrics.set_info(
            manifest.task, manifest.source.weights_sha256, backend.precision, backend.provider
        )
        served = compose(
            name,
            model,
            settings,
            Limits(settings.max_texts_per_call, settings.max_text_bytes),
            model_metrics,
            functools.partial(on_fatal, name),
        )
        served.info = build_info(
            name, manifest, backend.precision, backend.provider, limits, backend.verified_sha256
        )
        served_list.append(served)
    served_models = ServedModels(served_list, settings.default_model)
    list_models(served_models)
    searchers = [CatalogSearcher(name, catalog) for name, catalog in catalogs]
    recommender = Recommender(served_models, searchers)
    servicer = InferenceService(served_models, metrics, recommender)
    add_to_server(servicer, grpc_server)
    # The KServe v2 front door: the same models and engines, through the same call handling.
    add_to_server(KServeService(servicer, settings), grpc_server, KSERVE_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    enable_reflection(
        (
            pb.DESCRIPTOR.services_by_name["Inference"],
            KSERVE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        ),
        grpc_server,
    )
    await _set_health(health_servicer, served_models, health_pb2.HealthCheckResponse.NOT_SERVING)
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
    # gRPC's poller thread by its role (recserve/threads.py), for per-thread CPU from outside.
    threads.name_grpc_poller()
    log.info(
        "listening",
        extra={"address": f"{settings.host}:{port}", "metrics": metrics_address, **security.describe()},
    )
    running = RunningServer(
        settings,
        port,
        None if metrics_server is None else metrics_server.address[1],
        served_models,
        metrics,
        health_servicer,
        grpc_server,
        recommender,
        metrics_server,
        security,
    )
    engines = [served.engine for served in served_models]
    try:
        for served in served_models:
            await served.batcher.start()
        if settings.warmup:
            for served in served_models:
                await warm_up(served, settings)
        if before_ready is not None:
            await before_ready(running)
        for engine in engines:
            engine.open()
        # What start-up made (models, tokenizers, protobuf descriptors) lives as long as the server: frozen,
        # the collector stops walking it, and a full collection under load pauses the loop (every call on
        # it) for a few milliseconds instead of tens.
        gc.collect()
        gc.freeze()
        await _set_health(health_servicer, served_models, health_pb2.HealthCheckResponse.SERVING)
        for served in served_models:
            log.info(
                "serving",
                extra={
                    "model": served.name,
                    "task": served.model.manifest.task,
                    "precision": served.model.backend.precision,
                    "provider": served.model.backend.provider,
                    "default": served is served_models.default,
                },
            )
        yield running
    finally:
        log.info("draining", extra={"grace_s": settings.grace_period_s})
        await _set_health(health_servicer, served_models, health_pb2.HealthCheckResponse.NOT_SERVING)
        for engine in engines:
            engine.close("the server is shutting down: retry on another replica")
        # NOTE: the gRPC server keeps accepting calls while the in-flight ones finish, so that health
        # probes still get their NOT_SERVING answer (and new inference calls a clear UNAVAILABLE) during
        # the drain instead of a refused connection.
        drained = await _wait_idle(engines, settings.grace_period_s)
        if not drained:
            log.warning("grace period over with calls in flight; they are cut off")
            for engine in engines:
                engine.cut_off()  # each caller still gets its answer: UNAVAILABLE
        for served in served_models:
            await served.batcher.stop(drain=drained, timeout=1.0)
        if not drained:
            # The batches still running have nobody waiting for them; a long one takes seconds on a CPU.
            for served in served_models:
                served.model.backend.stop_running()
            await _wait_idle(engines, 1.0)
        await grpc_server.stop(0 if not drained else 1.0)
        # NOTE: the model's threads run below the loop's priority (model_threads_nice), and the process's
        # exit waits for each of them to run once more: beside two busy loops that took 0.25 s more (1.07-1.12
        # against 1.27-1.33 s from SIGTERM with a 1 s grace). Raising it back needs CAP_SYS_NICE.
        threads.restore_priority(threads.MODEL)
        for served in served_models:
            # NOTE: a stopped batch ends at its next operator, which on a slow or busy CPU (and at the
            # model threads' lower priority) took up to 0.5 s after the grace: nobody waits for it.
            served.shutdown(wait_for_model=drained)
        for searcher in searchers:
            searcher.close()
        if metrics_server is not None:
            await metrics_server.close()
        log.info("stopped")


async def _wait_idle(engines: Sequence[Engine], within_s: float) -> bool:
    """Whether every engine went idle within `within_s` seconds (one deadline for all of them)."""
    results = await asyncio.gather(*(engine.wait_idle(within_s) for engine in engines))
    return all(results)


async def _set_health(servicer: health.aio.HealthServicer, models: ServedModels, status: int) -> None:
    """The whole server ("" and the inference service) and each model by its own name."""
    for name in (*_HEALTH_SERVICES, *(served.health_name for served in models)):
        await servicer.set(name, status)


async def serve(settings: ServerSettings) -> int:
    """Runs until SIGTERM or SIGINT, then drains within the grace period; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Imported here: the composition root above never needs onnxruntime, the real model does.
    from recserve.server.runtime import load_model

    # NOTE: the tokeniser threads are the parallelism; the tokenizers library's own pool (rayon, one
    # thread per core) would spread each gathered chunk over every core, beside the model's threads, at
    # a cost (decision 0008). Before the first encode: the pool starts on first use.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # Fails on an unusable TLS or token file before the model loads (running_server reads them again).
    Security.from_settings(settings)
    models = []
    for name, repo in settings.served_models():
        before = resident_mib()
        model = await loop.run_in_executor(None, load_model, settings, repo)
        after = resident_mib()
        log.info(
            "model loaded",
            extra={
                "model": name,
                "repository": str(repo),
                "rss_before_mib": before,
                "rss_after_mib": after,
                "rss_added_mib": None if before is None or after is None else after - before,
            },
        )
        models.append((name, model))
    catalogs = []
    for name, directory in settings.catalogs():
        catalog = await loop.run_in_executor(None, Catalog.open, directory)
        check_catalog(catalog, [model for _, model in models])
        log.info(
            "catalog loaded",
            extra={
                "catalog": name,
                "items": len(catalog),
                "dimension": catalog.dimension,
                "model": catalog.model_name,
            },
        )
        catalogs.append((name, catalog))
    async with running_server(settings, models, catalogs=catalogs) as running:
        assert running.security is not None
        loop.add_signal_handler(signal.SIGHUP, running.security.reload)
        await stop.wait()
        log.info("signal received, shutting down")
    return 0


def check_catalog(catalog: Catalog, models: Sequence[Model]) -> None:
    """A catalog must have been built by one of the served embedding models (ModelMismatch, one line,
    naming both hashes, otherwise): another model's vectors live in another space."""
    embedders = [m for m in models if m.manifest.task == "embedding"]
    if any(m.manifest.source.weights_sha256 == catalog.weights_sha256 for m in embedders):
        return
    if not embedders:
        raise ModelMismatch(f"catalog {catalog.path} needs an embedding model; none is served")
    catalog.check_model(embedders[0].manifest.source.weights_sha256)


def resident_mib() -> int | None:
    """This process's resident memory in MiB (Linux /proc), for the per-model load figures."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
