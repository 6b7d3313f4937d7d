"""A real recserve server on a loopback port, run in a background thread with its own event loop, serving
an exported model repository or a fake model (tests/support/fake_model.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from recserve.catalog.store import Catalog
from recserve.server.app import RunningServer, running_server
from recserve.server.model import Model
from recserve.server.settings import ServerSettings
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

MiB = 1024 * 1024
# Texts the end-to-end tests send: empty, blank, non-Latin, emoji, long; and many for concurrency tests.
TEXTS = [
    "a red running shoe",
    "wireless noise-cancelling headphones with a long battery life",
    "",
    "   ",
    "日本語のテキスト",
    "emoji 🎧🔥 and more",
    "the quick brown fox jumps over the lazy dog " * 3,
]
MANY_TEXTS = [f"item {i}: " + "token " * (i % 37) for i in range(500)]


def settings_for(repo: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "model_repo": repo,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "intra_op_threads": 1,
        "tokenizer_threads": 1,
        "grace_period_s": 5.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return ServerSettings(**values)


class ServerThread:
    """Starts `running_server` in a thread; `stop()` drains it like a SIGTERM would.

    Without `model` (one, or (name, model) pairs), it loads the real ones the settings name, as `recserve
    serve` does.
    """

    def __init__(
        self,
        settings: ServerSettings,
        model: Model | Sequence[tuple[str, Model]] | None = None,
        before_ready: Callable[[RunningServer], Awaitable[None]] | None = None,
        catalogs: Sequence[tuple[str, Catalog]] = (),
    ) -> None:
        self.settings = settings
        self.model = model
        self.catalogs = catalogs
        self.registry = CollectorRegistry()
        self._before_ready = before_ready
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: RunningServer | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            if self.model is None:
                from recserve.server.runtime import load_model

                self.model = [
                    (name, await self.loop.run_in_executor(None, load_model, self.settings, repo))
                    for name, repo in self.settings.served_models()
                ]
            async with running_server(
                self.settings,
                self.model,
                self.registry,
                catalogs=self.catalogs,
                before_ready=self._before_ready,
            ) as server:
                self.server = server
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # surfaced to the test thread by start()
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not become ready")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", 256 * MiB),
                ("grpc.max_send_message_length", 256 * MiB),
            ],
        )

    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.channel())


@contextmanager
def serving(
    repo: Path, model: Model | Sequence[tuple[str, Model]] | None = None, **overrides: Any
) -> Iterator[ServerThread]:
    """A started server of `repo` (or of `model`, a fake, with `repo` only naming it); stopped on exit."""
    thread = ServerThread(settings_for(repo, **overrides), model).start()
    try:
        yield thread
    finally:
        thread.stop()


@contextmanager
def held_in_warm_up(settings: ServerSettings, model: Model) -> Iterator[tuple[int, Callable[[], None]]]:
    """A server bound to its port but held before it turns ready: yields the port and `finish`, which lets
    it finish starting and returns once it has (or after 30 s)."""
    bound: list[int] = []
    is_bound, release = threading.Event(), threading.Event()

    async def hold(server: RunningServer) -> None:
        bound.append(server.port)
        is_bound.set()
        await asyncio.to_thread(release.wait, 30)

    thread = ServerThread(settings, model, before_ready=hold)
    starter = threading.Thread(target=thread.start)

    def finish() -> None:
        release.set()
        starter.join(30)

    starter.start()
    try:
        assert is_bound.wait(30)
        yield bound[0], finish
    finally:
        finish()
        thread.stop()


# --- calls, shared by the tests on the fake model and on real ones ----------------------------------------
def embed(stub: pb_grpc.InferenceStub, texts: list[str], **fields: Any) -> np.ndarray:
    """Embed `texts` in PACKED_F32; the vectors as a [len(texts), dimension] array."""
    reply = stub.Embed(pb.EmbedRequest(texts=texts, encoding=pb.VECTOR_ENCODING_PACKED_F32, **fields))
    return np.frombuffer(reply.packed, dtype="<f4").reshape(len(texts), reply.dimension)


def concurrent_single_text_calls(address: str, texts: list[str]) -> np.ndarray:
    """One Embed call per text, all at once over one aio channel; the vectors in the order of `texts`."""

    async def main() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(address) as channel:
            aio_stub = pb_grpc.InferenceStub(channel)

            async def one(text: str) -> np.ndarray:
                reply = await aio_stub.Embed(
                    pb.EmbedRequest(texts=[text], encoding=pb.VECTOR_ENCODING_PACKED_F32)
                )
                return np.frombuffer(reply.packed, dtype="<f4")

            return await asyncio.gather(*(one(t) for t in texts))

    return np.stack(asyncio.run(main()))


def assert_each_is_its_own(got: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> None:
    """Each answer is its own text's vector: nothing lost, nothing swapped, the nearest reference itself."""
    assert got.shape == expected.shape
    nearest = np.argmax(got @ expected.T, axis=1)
    assert (nearest == np.arange(len(expected))).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
