"""The Python client: limits-aware splitting, decoding, status -> exception, against a fake and a real server.

The fake recserve server here (`FakeServer`) is also what the harness tests use when they need a server that
misbehaves on purpose (slow, not serving, not our API).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from recserve.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    ProtocolError,
    RecserveError,
    ResourceExhausted,
    Unavailable,
    decode_vectors,
    plan_chunks,
)
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

SERVICE = "recserve.v1.Inference"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fake_vector(text: str, dim: int) -> list[float]:
    """A vector that names its text: [length, first char code, 0, ...]."""
    return [float(len(text)), float(ord(text[0]) if text else 0)] + [0.0] * (dim - 2)


class FakeInference(pb_grpc.InferenceServicer):
    """A recserve server without a model: deterministic vectors, optional delay, optional one-at-a-time."""

    def __init__(
        self, *, dim: int = 8, limits: pb.Limits | None = None, delay_s: float = 0.0, serial: bool = False
    ) -> None:
        self.dim = dim
        self.limits = limits or pb.Limits(max_texts_per_call=2048, max_message_bytes=64 * 1024 * 1024)
        self.delay_s = delay_s
        self.serial = serial
        self.calls: Counter[str] = Counter()
        self.batches: list[int] = []
        self._lock: asyncio.Lock | None = None

    async def _work(self) -> None:
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
        await self._work()
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
        await self._work()
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


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    limits = pb.Limits(max_texts_per_call=3, max_message_bytes=64 * 1024 * 1024)
    with fake_server(FakeInference(limits=limits)) as server:
        yield server


TEXTS = [f"{chr(97 + i)} text number {i}" + "!" * i for i in range(10)]
EXPECTED = np.array([fake_vector(t, 8) for t in TEXTS], dtype=np.float32)


# --- planning and decoding, no server ------------------------------------------------------------------


def test_chunks_respect_count_and_bytes_and_keep_order() -> None:
    texts = ["x" * 10] * 7
    assert plan_chunks(texts, max_texts=3, budget_bytes=10_000) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    # 12 bytes a text on the wire (tag + length + 10): a 30-byte budget fits two.
    assert [s.stop - s.start for s in plan_chunks(texts, max_texts=100, budget_bytes=30)] == [2, 2, 2, 1]
    # The reply counts too: 100 bytes of vector per text and a 250-byte budget allow two per call.
    sizes = [
        s.stop - s.start
        for s in plan_chunks(texts, max_texts=100, budget_bytes=250, response_bytes_per_text=100)
    ]
    assert sizes == [2, 2, 2, 1]
    # A text too big for any call still goes alone (the server then says what is wrong), never dropped.
    assert plan_chunks(["y" * 100, "z"], max_texts=10, budget_bytes=50) == [slice(0, 1), slice(1, 2)]
    assert plan_chunks([], max_texts=3, budget_bytes=100) == [slice(0, 0)]


def test_decode_checks_sizes() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    reply = pb.EmbedResponse(
        dimension=3, encoding=pb.VECTOR_ENCODING_PACKED_F16, packed=vectors.astype("<f2").tobytes()
    )
    np.testing.assert_array_equal(decode_vectors(reply, 2), vectors)
    with pytest.raises(ProtocolError, match="expected 3 x 3"):
        decode_vectors(reply, 3)


# --- against the fake server -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["f32", "f16", "float"])
def test_sync_embed_splits_to_the_advertised_limit_and_reassembles(fake: FakeServer, encoding: str) -> None:
    with Client(fake.address) as client:
        got = client.embed(TEXTS, encoding=encoding)  # type: ignore[arg-type]
        assert client.health() == "SERVING"
    np.testing.assert_array_equal(got, EXPECTED)
    assert fake.inference is not None
    assert fake.inference.batches == [3, 3, 3, 1]  # max_texts_per_call=3
    assert fake.inference.calls["Info"] == 1  # limits are fetched once


async def test_async_embed_and_score_split_and_keep_order(fake: FakeServer) -> None:
    async with AsyncClient(fake.address) as client:
        got = await client.embed(TEXTS)
        scores = await client.score(TEXTS, query="q")
        hist = await client.score(TEXTS, history=["h1", "h2"], weights=[1.0, 0.5])
    np.testing.assert_array_equal(got, EXPECTED)
    expected_scores = np.array([len(t) for t in TEXTS], dtype=np.float32)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(hist, expected_scores)
    assert fake.inference is not None
    # The query (or the history) counts against max_texts_per_call=3 in every chunk: 5 chunks of 1 + 2,
    # then 10 of 2 + 1.
    assert sorted(fake.inference.batches[:4]) == [1, 3, 3, 3]
    assert fake.inference.batches[4:] == [3] * 15


def test_status_codes_become_exceptions_with_code_and_details(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        with pytest.raises(InvalidArgument) as bad:
            client.embed(["ok", "bad"])
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details == "texts[1] is bad"
        with pytest.raises(ResourceExhausted, match="queue is full"):
            client.embed(["busy"])
        with pytest.raises(NotFound):
            client.health("no.such.Service")
        with pytest.raises(ValueError, match="exactly one of query= and history="):
            client.score(["c"])
    with Client("127.0.0.1:1", deadline=2) as nowhere, pytest.raises(Unavailable) as down:
        nowhere.info()
    assert isinstance(down.value, RecserveError)


# --- against the real server ------------------------------------------------------------------------------


def test_client_against_the_real_server(tiny_repo: Path) -> None:
    from tests.support.serving import serving

    with serving(tiny_repo, max_texts_per_call=4) as server, Client(server.address) as client:
        info = client.info()
        assert info.limits.max_texts_per_call == 4
        assert client.health() == "SERVING"
        texts = [f"item {i} " + "word " * i for i in range(11)]
        together = client.embed(texts)  # three calls under the limit, reassembled
        alone = np.concatenate([client.embed([t]) for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-5)
        assert together.shape == (11, info.dimension)
        np.testing.assert_allclose(client.embed(texts, encoding="f16"), together, atol=2e-3)
        scores = client.score(texts[1:], query=texts[0])
        np.testing.assert_allclose(scores, together[1:] @ together[0], atol=1e-5)
        with pytest.raises(InvalidArgument):
            client.embed([])
