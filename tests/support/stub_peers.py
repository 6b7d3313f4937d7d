"""Small servers of the other protocols the harness loads (recserve/benchmarks/protocols.py), each on a
loopback port in a background thread with its own event loop, like a remote deployment:

- `OpenAIStub`: `POST /v1/embeddings`, `GET /v1/models` and `GET /openapi.json` (aiohttp), as TEI, infinity
  and vLLM serve them;
- `TeiStub`: TEI's `POST /embed` and `GET /info`;
- `KServeStub`: the KServe v2 / Open Inference Protocol over gRPC (tritonclient's generated servicer), one
  or more models with a BYTES input TEXT and an FP32 output EMBEDDING.

Their vectors are fake_server.fake_vector's (a text's length and first character). Each can fail on purpose:
every `fail_every`-th call answers an error; with `short`, every call after the first (the harness's probe)
answers one vector too few.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor

from tests.support.fake_server import fake_vector


class _Background:
    """Runs `start()` (returns the port) in a thread with its own loop until `close()`."""

    def __init__(self) -> None:
        self.port = 0
        self.calls: Counter[str] = Counter()
        self.bodies: list[Any] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def start(self) -> tuple[int, Callable[[], Awaitable[None]]]:
        raise NotImplementedError

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.port, stop = await self.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Any:
        self._thread.start()
        assert self._ready.wait(10), "the stub did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _vectors(texts: list[str], dim: int) -> list[list[float]]:
    return [fake_vector(t, dim) for t in texts]


class _HttpStub(_Background):
    def __init__(
        self, *, dim: int = 8, delay_s: float = 0.0, fail_every: int = 0, short: bool = False
    ) -> None:
        super().__init__()
        self.dim = dim
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.short = short

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    async def start(self) -> tuple[int, Callable[[], Awaitable[None]]]:
        app = web.Application()
        app.add_routes(self.routes())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # port 0: never a fixed port
        await web.SockSite(runner, sock).start()
        return int(sock.getsockname()[1]), runner.cleanup

    async def take(self, request: web.Request, field: str) -> tuple[dict[str, Any], list[str]] | web.Response:
        """The call's body and texts, after the stub's delay; or the error it is due to answer."""
        self.calls[request.path] += 1
        body = await request.json()
        self.bodies.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_every and self.calls[request.path] % self.fail_every == 0:
            return web.json_response({"error": "overloaded"}, status=503)
        texts = body[field]
        return body, texts[:-1] if self.short and self.calls[request.path] > 1 else texts


class OpenAIStub(_HttpStub):
    """An OpenAI-compatible embeddings server; a call naming a model it does not serve gets a 404."""

    def __init__(
        self, *, models: tuple[str, ...] = ("stub-model",), title: str = "stub-openai", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.models = models
        self.title = title

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.list_models),
            web.get("/openapi.json", self.openapi),
        ]

    async def openapi(self, request: web.Request) -> web.Response:
        """What FastAPI serves (infinity, vLLM): its `info` names the server, or is FastAPI's default."""
        return web.json_response({"openapi": "3.1.0", "info": {"title": self.title, "version": "9.9"}})

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        taken = await self.take(request, "input")
        if isinstance(taken, web.Response):
            return taken
        body, texts = taken
        model = body.get("model")
        if model is not None and model not in self.models:
            return web.json_response({"error": f"model {model} not found"}, status=404)
        data = [
            {"object": "embedding", "index": i, "embedding": v}
            for i, v in enumerate(_vectors(texts, self.dim))
        ]
        tokens = sum(len(t.split()) + 2 for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": model or "", "usage": usage})


class TeiStub(_HttpStub):
    """text-embeddings-inference's own routes; it counts tokens in a header, as TEI does."""

    def __init__(self, *, max_client_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_client_batch_size = max_client_batch_size

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/embed", self.embed), web.get("/info", self.info)]

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_id": "stub/tei-model",
                "version": "1.5.0",
                "max_client_batch_size": self.max_client_batch_size,
                "max_batch_tokens": 16384,
            }
        )

    async def embed(self, request: web.Request) -> web.Response:
        taken = await self.take(request, "inputs")
        if isinstance(taken, web.Response):
            return taken
        _, texts = taken
        tokens = sum(len(t.split()) + 2 for t in texts)
        return web.Response(
            body=json.dumps(_vectors(texts, self.dim)),
            content_type="application/json",
            headers={"x-compute-tokens": str(tokens)},
        )


class _KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, stub: KServeStub) -> None:
        self.stub = stub

    async def ServerLive(self, request: Any, context: Any) -> Any:
        self.stub.calls["ServerLive"] += 1
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        self.stub.calls["ServerReady"] += 1
        return service_pb2.ServerReadyResponse(ready=self.stub.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(name="kserve-stub", version="0.1")

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        self.stub.calls["RepositoryIndex"] += 1
        models = [
            service_pb2.RepositoryIndexResponse.ModelIndex(name=m, version="1", state="READY")
            for m in self.stub.models
        ]
        return service_pb2.RepositoryIndexResponse(models=models)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        if request.name not in self.stub.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="stub",
            inputs=[tensor(name=self.stub.input_name, datatype=self.stub.input_type, shape=[-1])],
            outputs=[tensor(name="EMBEDDING", datatype="FP32", shape=[-1, self.stub.dim])],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        stub = self.stub
        stub.calls["ModelInfer"] += 1
        if request.model_name not in stub.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name}")
        if stub.delay_s:
            await asyncio.sleep(stub.delay_s)
        if stub.fail_every and stub.calls["ModelInfer"] % stub.fail_every == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        texts = [t.decode() for t in deserialize_bytes_tensor(request.raw_input_contents[0])]
        stub.bodies.append(texts)
        if stub.short and stub.calls["ModelInfer"] > 1:
            texts = texts[:-1]
        vectors = np.array(_vectors(texts, stub.dim), dtype="<f4").reshape(len(texts), stub.dim)
        out = service_pb2.ModelInferResponse.InferOutputTensor(
            name="EMBEDDING", datatype="FP32", shape=[len(texts), stub.dim]
        )
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            outputs=[out],
            raw_output_contents=[vectors.tobytes()],
        )


class KServeStub(_Background):
    """A KServe v2 gRPC server of `models`, each TEXT (BYTES) -> EMBEDDING (FP32 [n, dim])."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("stub-encoder",),
        dim: int = 8,
        ready: bool = True,
        input_name: str = "TEXT",
        input_type: str = "BYTES",
        delay_s: float = 0.0,
        fail_every: int = 0,
        short: bool = False,
    ) -> None:
        super().__init__()
        self.models = models
        self.dim = dim
        self.ready = ready
        self.input_name = input_name
        self.input_type = input_type
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.short = short

    async def start(self) -> tuple[int, Callable[[], Awaitable[None]]]:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_KServeServicer(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        async def stop() -> None:
            await server.stop(0)

        return port, stop
