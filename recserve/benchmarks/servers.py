"""Servers the benchmark starts itself (the suite, and the batching-off comparison): `recserve serve`, or the
bare gRPC baseline (bare.py), in a child process, so that the load generator and the server never share an
event loop or a GIL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import recserve
from recserve.client import AsyncClient, RecserveError

# The child must import this very package, installed or not.
_PACKAGE_ROOT = str(Path(recserve.__file__).resolve().parent.parent)
# The command users run; a child process, so load generator and server share neither event loop nor GIL.
SERVE_ENTRY = (sys.executable, "-m", "recserve.cli", "serve")
BARE_ENTRY = (sys.executable, "-m", "recserve.benchmarks.bare")
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


class ServerStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalServer:
    address: str
    metrics_url: str | None
    """None for the bare baseline, which has no metrics."""
    command: list[str]
    log_path: Path
    pid: int | None = None
    """The child's process id, for /proc readings (process.py)."""


def free_port() -> int:
    # NOTE: the port is free when asked, not reserved: another process could take it before the server binds.
    # The server then fails to start and says so, which is rare and loud enough for a benchmark tool.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(
    model_repo: Path, port: int, metrics_port: int, threads: int, extra: Sequence[str]
) -> list[str]:
    return [
        *SERVE_ENTRY,
        "--model-repo",
        str(model_repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--intra-op-threads",
        str(threads),
        "--grace-period-s",
        "5",
        "--log-level",
        "warning",
        *extra,
    ]


def bare_command(model_repo: Path, port: int, threads: int) -> list[str]:
    return [
        *BARE_ENTRY,
        "--model-repo",
        str(model_repo),
        "--port",
        str(port),
        "--intra-op-threads",
        str(threads),
    ]


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def local_server(
    model_repo: Path,
    *,
    threads: int,
    log_path: Path,
    extra: Sequence[str] = (),
    bare: bool = False,
    start_timeout: float = START_TIMEOUT_S,
) -> AsyncIterator[LocalServer]:
    """Starts `recserve serve` (`extra`: more flags), or with `bare` the bare gRPC baseline, on free loopback
    ports; yields once it reports SERVING and stops it on exit."""
    if bare and extra:
        raise ValueError("the bare baseline takes no server flags")
    port, metrics_port = free_port(), free_port()
    if bare:
        cmd, metrics_url = bare_command(model_repo, port, threads), None
    else:
        cmd = serve_command(model_repo, port, metrics_port, threads, extra)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    log = await asyncio.to_thread(_open_log, log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env
        )
    finally:
        log.close()  # the child holds its own descriptor
    server = LocalServer(f"127.0.0.1:{port}", metrics_url, cmd, log_path, pid=proc.pid)
    try:
        await _wait_serving(server, proc, start_timeout)
        yield server
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_serving(server: LocalServer, proc: asyncio.subprocess.Process, start_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + start_timeout
    exited = loop.create_task(proc.wait())
    try:
        async with AsyncClient(server.address, deadline=1.0) as client:
            # A start-up wait, bounded: the child loads the model and warms up before it says SERVING.
            while loop.time() < deadline:
                if exited.done():
                    raise ServerStartError(
                        f"the server exited with code {proc.returncode} while starting: "
                        + _tail(server.log_path)
                    )
                with contextlib.suppress(RecserveError):
                    if await client.health() == "SERVING":
                        return
                await asyncio.wait({exited}, timeout=0.2)
        raise ServerStartError(
            f"the server was not SERVING after {start_timeout:g} s: {_tail(server.log_path)}"
        )
    finally:
        exited.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exited
