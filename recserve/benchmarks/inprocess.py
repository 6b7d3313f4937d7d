"""The server without gRPC: its engine (validation, admission, tokeniser threads, batcher, model threads) in
the benchmark's own process, loaded by the same loops as any target.

What an open loop's tail would be if the transport cost nothing: the same Poisson schedule, texts, windows
and latency from the scheduled send, into `Engine.embed` on the suite's event loop, with the server's own
settings (`ServerSettings` defaults, the suite's thread count) composed as `recserve serve` composes them
(registry.compose). Set beside the served open loop, it tells how much of a missed bound is gRPC, protobuf
and the client, and how much the engine and the model on this machine. It is a reference, not a limit: the
load generator shares this process's interpreter with the engine, where a served server has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from recserve import __version__, threads
from recserve.benchmarks.protocols import Endpoint, Reply, Target
from recserve.benchmarks.recorder import MISMATCH, OK
from recserve.benchmarks.results import WEIGHTS_SHA256, PeerInfo
from recserve.benchmarks.workloads import Workload, WorkloadSpec
from recserve.server.errors import ServeError
from recserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from recserve.server.engine import Engine
    from recserve.server.registry import ServedModel

NAME = "in process"
# Status values by the ServeError code names the engine raises (service.py maps them the same way).
_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


class InProcessCalls:
    """Each Embed call of the workload as `Engine.embed` of its texts, with the call's deadline."""

    def __init__(self, engine: Engine, workload: Workload) -> None:
        if set(workload.kinds) != {"embed"}:
            raise ValueError(f"the engine in process takes Embed workloads only, not {set(workload.kinds)}")
        self._engine = engine
        self._texts = [list(m.texts) for m in workload.messages if isinstance(m, pb.EmbedRequest)]
        self._expect = workload.expect.tolist()

    async def send(self, i: int, deadline_s: float) -> Reply:
        deadline = asyncio.get_running_loop().time() + deadline_s
        try:
            result = await self._engine.embed(self._texts[i], None, False, deadline)
        except ServeError as exc:
            return _CODES[exc.code], None
        if result.vectors.shape[0] != self._expect[i]:
            return MISMATCH, None
        return OK, sum(result.token_counts)


class InProcessTarget(Target):
    """The served model's engine in this process, as a target of the loops."""

    def __init__(self, served: ServedModel, threads_: int) -> None:
        super().__init__(Endpoint("in-process", NAME))
        self._served = served
        self._threads = threads_

    @property
    def name(self) -> str:
        return NAME

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> PeerInfo:
        backend = self._served.model.backend
        return PeerInfo(
            protocol=self.endpoint.protocol,
            model_name=self._served.name,
            dimension=self._served.model.manifest.output_dim,
            server=f"recserve {__version__} engine",
            max_texts_per_call=None,
            details={
                "precision": backend.precision,
                "provider": backend.provider,
                "threads": str(self._threads),
                "concurrent batches": str(backend.concurrent_batches),
                WEIGHTS_SHA256: self._served.model.manifest.source.weights_sha256,
            },
        )

    def prepare(self, workload: Workload) -> InProcessCalls:
        return InProcessCalls(self._served.engine, workload)


@contextlib.asynccontextmanager
async def in_process(repo: Path, threads_: int) -> AsyncIterator[InProcessTarget]:
    """The engine of `repo` under the server's default settings and `threads_` model threads, warmed up and
    accepting calls on the running loop; its batcher drained and its threads ended on exit."""
    # Imported here: the server's runtime (onnxruntime) is heavy, and only the suite needs it.
    from prometheus_client import CollectorRegistry

    from recserve.server.app import warm_up
    from recserve.server.engine import Limits
    from recserve.server.metrics import Metrics, MetricsServer
    from recserve.server.registry import compose
    from recserve.server.runtime import load_model
    from recserve.server.settings import ServerSettings

    values: dict[str, object] = {"model_repo": repo, "intra_op_threads": threads_, "metrics_port": None}
    settings = ServerSettings(**values)  # type: ignore[arg-type]

    registry = CollectorRegistry()

    def load() -> ServedModel:
        # Opened under the model threads' name, as the server does, so that ORT's pool threads carry it.
        with threads.named(threads.MODEL):
            model = load_model(settings, repo)
        limits = Limits(settings.max_texts_per_call, settings.max_text_bytes)
        return compose(repo.name, model, settings, limits, Metrics(registry).for_model(repo.name))

    served = await asyncio.to_thread(load)
    # The batcher's metrics on a loopback port, so that the sweep reads batch sizes and padding as a
    # served server's (the shares of a call's time need the transport's request timer: none here).
    metrics = MetricsServer(registry)
    try:
        await metrics.start("127.0.0.1", 0)
        await warm_up(served, settings)
        await served.batcher.start()
        served.engine.open()
        target = InProcessTarget(served, threads_)
        host, port = metrics.address
        target.metrics_url = f"http://{host}:{port}/metrics"
        yield target
    finally:
        served.engine.close("the benchmark is done with the engine")
        await served.batcher.stop()
        served.shutdown()
        await metrics.close()
