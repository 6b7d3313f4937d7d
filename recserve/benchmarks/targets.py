"""Checks of a target before any load: it answers gRPC, serves our API and is SERVING, takes the workload,
and where its metrics are."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from recserve.benchmarks.scrape import ScrapeError, fetch_async
from recserve.benchmarks.workloads import WorkloadSpec
from recserve.client import (
    SERVICE_NAME,
    AsyncClient,
    DeadlineExceeded,
    NotFound,
    RecserveError,
    ServerInfo,
    Unavailable,
    Unimplemented,
)

DEFAULT_METRICS_PORT = 8000


class TargetError(RuntimeError):
    """The target cannot be load-tested: unreachable, not our API, or not SERVING."""


@contextlib.asynccontextmanager
async def connected(
    target: str,
    tls: bool = False,
    root_cert: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token_file: Path | None = None,
    model: str = "",
) -> AsyncIterator[AsyncClient]:
    """The client the harness loads `target` through: TLS with a CA, a client certificate, a token, and the
    served model its calls name ("" = the server's default)."""

    def read(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    roots, chain, key, token = await asyncio.to_thread(
        lambda: (read(root_cert), read(tls_cert), read(tls_key), read(token_file))
    )
    async with AsyncClient(
        target,
        tls=tls,
        root_certificates=roots,
        certificate_chain=chain,
        private_key=key,
        token=None if token is None else token.decode().strip(),
        model=model,
    ) as client:
        yield client


async def check_target(client: AsyncClient, target: str, deadline: float = 5.0) -> ServerInfo:
    """Health, then Info: raises TargetError saying what is wrong, before any load is sent."""
    try:
        status = await client.health(SERVICE_NAME, deadline=deadline)
    except Unavailable as exc:
        if "HTTP/2" in exc.details or "http1" in exc.details.lower():
            # Something listens there, but it does not speak HTTP/2 (e.g. the metrics port, a web server).
            raise TargetError(f"{target} is not a gRPC server ({exc.details})") from None
        raise TargetError(f"cannot reach {target}: {exc.details}") from None
    except DeadlineExceeded:
        raise TargetError(f"{target} did not answer a health check within {deadline:g} s") from None
    except Unimplemented:
        raise TargetError(f"{target} serves no grpc.health.v1 health: not a recserve server") from None
    except NotFound:
        raise TargetError(
            f"{target} has no health status for {SERVICE_NAME}: not a recserve server"
        ) from None
    except RecserveError as exc:
        raise TargetError(
            f"{target}: the health check failed ({exc}); is it a recserve gRPC server?"
        ) from None
    if status != "SERVING":
        raise TargetError(f"{target} reports {status} for {SERVICE_NAME}, not SERVING: no load sent")
    try:
        info = await client.info(deadline=deadline)
    except Unimplemented:
        raise TargetError(
            f"{target} does not implement {SERVICE_NAME}/Info: not the recserve v1 API"
        ) from None
    except RecserveError as exc:
        raise TargetError(f"{target}: Info failed ({exc})") from None
    if info.task not in ("embedding", "cross-encoder") or info.dimension < 1:
        raise TargetError(
            f"{target}: Info describes no usable model (task {info.task!r}, dimension {info.dimension})"
        )
    return info


def check_workload_fits(spec: WorkloadSpec, info: ServerInfo, target: str) -> None:
    """Combinations the target itself rules out, found from Info before any load."""
    if info.task == "cross-encoder" and {"embed", "history"} & set(spec.rpc):
        raise TargetError(
            f"{target} serves a cross-encoder: only --rpc score applies (no Embed, no user history)"
        )
    limit = info.limits.max_texts_per_call
    per_call = max(
        spec.texts_per_call if "embed" in spec.rpc else 0,
        1 + spec.candidates if "score" in spec.rpc else 0,
        spec.history + spec.candidates if "history" in spec.rpc else 0,
    )
    if limit and per_call > limit:
        raise TargetError(f"{target} takes at most {limit} texts per call; this workload sends {per_call}")


async def resolve_metrics(url: str | None, target: str, notes: list[str]) -> str | None:
    """The metrics URL to scrape, or None. An explicit URL must work; "auto" tries the default port."""
    if url is None:
        return None
    explicit = url != "auto"
    if not explicit:
        host = target.rsplit(":", 1)[0]
        url = f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"
    try:
        await fetch_async(url)
    except ScrapeError as exc:
        if explicit:
            raise TargetError(f"--metrics-url: {exc}") from None
        notes.append(f"no server metrics (tried {url}; pass --metrics-url): server-side figures are missing")
        return None
    return url
