"""The bare gRPC baseline: the least a lone call can cost through Python gRPC on this machine.

A grpc.aio server of the same v1 API that does nothing but the model's work: Embed runs the raw model
(baseline.RawModel: tokenise, run, normalise) in one executor hop. No validation, batcher, metrics, logs or
trailing metadata. A lone call to it, minus the raw single inference, is what gRPC, the client and the
kernel's thread wake-ups add before any server logic; the served lone-call overhead can only be judged
against it. The suite starts it as a child process:
`python -m recserve.benchmarks.bare --model-repo DIR --port N --intra-op-threads T`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from recserve import threads
from recserve.benchmarks.baseline import RawModel
from recserve.server.registry import SERVICE_NAME
from recserve.server.service import build_info, encode_vectors, vector_encoding
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

# Advertised so the harness's checks pass; the bare server enforces none of them.
_LIMIT = 1 << 20
_WARM_UP_CALLS = 20


class BareInference(pb_grpc.InferenceServicer):
    """Embed and Info only; Score stays UNIMPLEMENTED."""

    def __init__(self, model: RawModel, repo_name: str) -> None:
        self._model = model
        manifest, backend = model.manifest, model.backend
        # One thread: the model runs one call at a time, on all of its intra-op threads.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="bare-model",
            initializer=threads.name_thread,
            initargs=(threads.MODEL,),
        )
        limits = pb.Limits(
            max_texts_per_call=_LIMIT,
            max_text_bytes=_LIMIT,
            max_message_bytes=_LIMIT,
            max_batch_tokens=_LIMIT,
            max_queue_texts=_LIMIT,
        )
        self._info = build_info(repo_name, manifest, backend.precision, backend.provider, limits)
        self._info.server_version = "bare"

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedResponse:
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._model.run, list(request.texts))
        response = pb.EmbedResponse(dimension=rows.shape[1])
        encode_vectors(rows, vector_encoding(request.encoding), response)
        return response

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.InfoResponse:
        return self._info


async def serve_bare(repo: Path, host: str, port: int, intra_op_threads: int) -> None:
    """Serves until SIGTERM or SIGINT; health says SERVING once the model is warm."""
    model = RawModel(repo, threads=intra_op_threads)
    if model.manifest.task != "embedding":
        raise SystemExit(f"the bare baseline serves Embed only; {repo} holds a {model.manifest.task}")
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(BareInference(model, repo.name), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    threads.name_grpc_poller()
    for _ in range(_WARM_UP_CALLS):
        model.run(["a text to warm the model up"])
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recserve.benchmarks.bare", description=__doc__)
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--intra-op-threads", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve_bare(args.model_repo, args.host, args.port, args.intra_op_threads))


if __name__ == "__main__":
    main()
