"""A recserve server without a model, on a loopback port in a background thread: the client's tests and the
harness's tests use it when they need a server that misbehaves on purpose (slow, not serving, not our API)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

SERVICE = "recserve.v1.Inference"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fake_vector(text: str, dim: int) -> list[float]:
    """A vector that names its text: [length, first char code, 0, ...]."""
    return [float(len(text)), float(ord(text[0]) if text else 0)] + [0.0] * (dim - 2)


class FakeInference(pb_grpc.InferenceServicer):
    """A recserve server without a model: deterministic vectors, optional delay, optional one-at-a-time.

    With `capacity` (texts/s) it is one worker that takes the calls in order, each costing its texts over
    `capacity` seconds: a queue forms under load. With `refuse` it admits by time, as the overload issue
    asks: a call that could not finish within its deadline, given the work queued before it, is refused
    at once with RESOURCE_EXHAUSTED. Without, it queues everything and works on for callers who left.
    """

    def __init__(
        self,
        *,
        dim: int = 8,
        limits: pb.Limits | None = None,
        delay_s: float = 0.0,
        serial: bool = False,
        capacity: float | None = None,
        refuse: bool = True,
    ) -> None:
        self.dim = dim
        self.limits = limits or pb.Limits(max_texts_per_call=2048, max_message_bytes=64 * 1024 * 1024)
        self.delay_s = delay_s
        self.serial = serial
        self.capacity = capacity
        self.refuse = refuse
        self.calls: Counter[str] = Counter()
        self.batches: list[int] = []
        self.refused = 0
        self._lock: asyncio.Lock | None = None
        self._free_at = 0.0  # loop time at which the worker has done all the work admitted so far

    async def _queue(self, texts: int, context: grpc.aio.ServicerContext) -> None:
        assert self.capacity is not None
        now = asyncio.get_running_loop().time()
        done_at = max(now, self._free_at) + texts / self.capacity
        remaining = context.time_remaining()
        if self.refuse and remaining is not None and done_at - now > remaining:
            self.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "cannot finish within the deadline")
        self._free_at = done_at
        await asyncio.sleep(done_at - now)

    async def _work(self, texts: int, context: grpc.aio.ServicerContext) -> None:
        if self.capacity is not None:
            await self._queue(texts, context)
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self.serial:
            async with self._lock:  # a server that can do one call at a time: a queue forms in front
                await asyncio.sleep(self.delay_s)
        elif self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def _check(self, texts: Any, context: grpc.aio.ServicerContext) -> None:
        if len(texts) > self.limits.max_texts_per_call:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(texts)} texts; the limit is ...")
        if "bad" in texts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"texts[{list(texts).index('bad')}] is bad")
        if "busy" in texts:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        self.calls["Info"] += 1
        return pb.InfoResponse(
            model_name="fake",
            weights_sha256="f" * 64,
            task="embedding",
            dimension=self.dim,
            max_tokens=128,
            precision="fp32",
            provider="none",
            pooling="mean",
            normalize=True,
            limits=self.limits,
            server_version="fake",
        )

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.calls["Embed"] += 1
        self.batches.append(len(request.texts))
        await self._check(request.texts, context)
        await self._work(len(request.texts), context)
        vectors = np.array([fake_vector(t, self.dim) for t in request.texts], dtype=np.float32).reshape(
            -1, self.dim
        )
        reply = pb.EmbedResponse(
            dimension=self.dim,
            encoding=request.encoding or pb.VECTOR_ENCODING_FLOAT,
            token_counts=[len(t.split()) + 2 for t in request.texts],
        )
        if request.encoding == pb.VECTOR_ENCODING_PACKED_F32:
            reply.packed = vectors.astype("<f4").tobytes()
        elif request.encoding == pb.VECTOR_ENCODING_PACKED_F16:
            reply.packed = vectors.astype("<f2").tobytes()
        else:
            reply.vectors.extend(pb.Vector(values=row) for row in vectors.tolist())
        return reply

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        self.calls["Score"] += 1
        fixed = (
            [request.query_text]
            if request.WhichOneof("query") == "query_text"
            else request.user_history.texts
        )
        self.batches.append(len(fixed) + len(request.candidates))
        await self._check([*fixed, *request.candidates], context)
        await self._work(len(fixed) + len(request.candidates), context)
        return pb.ScoreResponse(scores=[float(len(c)) for c in request.candidates])


class FakeServer:
    """A grpc.aio server in a background thread (its own event loop), like a remote deployment would be.

    `inference=None` serves no recserve API; `health=None` serves no health service; otherwise `health`
    maps service names to their status.
    """

    def __init__(self, inference: FakeInference | None, health_status: dict[str, int] | None) -> None:
        self.inference = inference
        self.health_status = health_status
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        if self.inference is not None:
            pb_grpc.add_InferenceServicer_to_server(self.inference, server)
        if self.health_status is not None:
            servicer = health.aio.HealthServicer()
            for name, status in self.health_status.items():
                await servicer.set(name, status)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        assert self._ready.wait(10), "the fake server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def fake_server(inference: FakeInference | None = None, serving: bool = True) -> FakeServer:
    status = SERVING if serving else NOT_SERVING
    return FakeServer(inference or FakeInference(), {"": status, SERVICE: status})
