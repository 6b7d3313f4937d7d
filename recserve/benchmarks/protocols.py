"""The targets the harness loads, one per protocol, so that the same workloads, loops and reports measure
recserve and what users run today.

A target URL names its protocol:

- `grpc://HOST:PORT`, a bare `HOST:PORT`, or any target the recserve client takes (`dns:///NAME:PORT`,
  `ipv4:A:P,B:Q`): the recserve.v1 API, with every RPC and the server's own metrics;
- `openai+http://HOST:PORT[/PATH]`: OpenAI-compatible embeddings, `POST /v1/embeddings` (TEI, infinity and
  vLLM serve it);
- `tei+http://HOST:PORT[/PATH]`: text-embeddings-inference's own `POST /embed`;
- `kserve-v2://HOST:PORT`: the KServe v2 / Open Inference Protocol over gRPC (Triton's), a BYTES input
  `TEXT` in and an FP32 output `EMBEDDING` out.

`?model=NAME` names the model where the protocol carries one (`bench run --model` does the same): one of
the served models of a recserve server, an OpenAI or a KServe model. Only recserve has Score and user
histories; the others take Embed workloads.

A target checks itself before any load (`check`: TargetError, one line, saying what is wrong) and turns a
workload into prebuilt calls (`prepare`), sent by index: as workloads.py prebuilds the recserve messages,
the loop then only picks the next one, and the client spends its shared CPU on the protocol, not on
building requests. The other protocols live in peers.py, imported only when a URL names one, so a
recserve run never needs their client libraries.
"""

from __future__ import annotations

import abc
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

import grpc
import grpc.aio

from recserve.benchmarks.recorder import MISMATCH, OK
from recserve.benchmarks.results import PeerInfo
from recserve.benchmarks.targets import check_target, check_workload_fits, connected, resolve_metrics
from recserve.benchmarks.workloads import RPC_KINDS, RpcKind, Workload, WorkloadSpec
from recserve.client import AsyncClient, ServerInfo
from recserve.v1 import inference_pb2 as pb

# "in-process" is the suite's reference, the server's engine without gRPC (inprocess.py): no URL names it.
ProtocolName = Literal["recserve", "openai+http", "tei+http", "kserve-v2", "in-process"]
SCHEMES: dict[str, ProtocolName] = {
    "grpc": "recserve",
    "openai+http": "openai+http",
    "tei+http": "tei+http",
    "kserve-v2": "kserve-v2",
}
# What each protocol is, for reports and errors.
DESCRIPTIONS: dict[str, str] = {
    "recserve": "recserve.v1 gRPC",
    "openai+http": "OpenAI-compatible embeddings over HTTP",
    "tei+http": "text-embeddings-inference's /embed over HTTP",
    "kserve-v2": "KServe v2 / Open Inference Protocol gRPC",
    "in-process": "the server's engine in the benchmark's process, no gRPC",
}
RPCS: dict[ProtocolName, frozenset[RpcKind]] = {
    "recserve": frozenset(RPC_KINDS),
    "openai+http": frozenset({"embed"}),
    "tei+http": frozenset({"embed"}),
    "kserve-v2": frozenset({"embed"}),
    "in-process": frozenset({"embed"}),
}
DEFAULT_PATHS: dict[ProtocolName, str] = {"openai+http": "/v1/embeddings", "tei+http": "/embed"}
# Where a gRPC target string already names a resolver (client.channel_target takes these as they are).
_GRPC_RESOLVERS = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
# The pre-load checks' own calls: short, so an unreachable or silent target fails fast.
CHECK_DEADLINE_S = 5.0
# A probe call's text: every protocol is checked end to end with one real call before any load.
PROBE_TEXT = "a probe text"

TargetInfo: TypeAlias = ServerInfo | PeerInfo
# What one sent call came to: its status (recorder's codes) and the tokens the server counted, if it said.
Reply: TypeAlias = tuple[int, int | None]


class EndpointError(ValueError):
    """A target URL that names no known protocol or no address; the message says which forms exist."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed target URL: the protocol, where to connect, and (HTTP) the route and (some) the model."""

    protocol: ProtocolName
    address: str
    """HOST:PORT; for recserve any target its client takes."""
    path: str = ""
    """HTTP targets: the route the calls are posted to."""
    model: str | None = None

    @property
    def url(self) -> str:
        """The URL as a user would write it: a recserve target stays as given."""
        if self.protocol == "recserve":
            return self.address
        path = "" if self.path == DEFAULT_PATHS.get(self.protocol) else self.path
        query = f"?{urllib.parse.urlencode({'model': self.model})}" if self.model else ""
        return f"{self.protocol}://{self.address}{path}{query}"

    @property
    def rpcs(self) -> frozenset[RpcKind]:
        return RPCS[self.protocol]

    def check_rpcs(self, rpc: set[str] | frozenset[str], flag: str = "--rpc") -> None:
        """EndpointError unless this protocol carries every RPC of the workload."""
        missing = sorted(set(rpc) - self.rpcs)
        if missing:
            raise EndpointError(
                f"{self.url} speaks {DESCRIPTIONS[self.protocol]}, which has Embed only: {flag} "
                f"{','.join(missing)} needs the recserve API (grpc://HOST:PORT)"
            )


def parse_endpoint(text: str) -> Endpoint:
    """`grpc://HOST:PORT`, `openai+http://HOST:PORT[/PATH][?model=NAME]`, `tei+http://...`,
    `kserve-v2://HOST:PORT[?model=NAME]`, or a bare recserve target; EndpointError otherwise."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if not sep or scheme in _GRPC_RESOLVERS:  # dns:///NAME:PORT also holds "://"
        if ":" not in text:
            raise EndpointError(f"target {text!r}: expected HOST:PORT or a URL such as grpc://HOST:PORT")
        return Endpoint("recserve", text)
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise EndpointError(f"target {text!r}: unknown scheme {scheme!r}; use {known} or a bare HOST:PORT")
    protocol = SCHEMES[scheme]
    parts = urllib.parse.urlsplit(f"//{rest}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise EndpointError(f"target {text!r}: expected {scheme}://HOST:PORT")
    query = urllib.parse.parse_qs(parts.query)
    if set(query) - {"model"} or len(query.get("model", [])) > 1:
        raise EndpointError(f"target {text!r}: the only query a target takes is one ?model=NAME")
    model = query["model"][0] if "model" in query else None
    path = parts.path
    if path and protocol not in DEFAULT_PATHS:
        raise EndpointError(f"target {text!r}: a {scheme}:// target is HOST:PORT, with no path")
    if protocol == "tei+http" and model is not None:
        raise EndpointError(f"target {text!r}: TEI serves one model; ?model= does not apply")
    return Endpoint(protocol, parts.netloc, path or DEFAULT_PATHS.get(protocol, ""), model)


@dataclass(frozen=True)
class Access:
    """How to reach a target: TLS and a token (recserve and kserve-v2 take TLS; every protocol a token),
    and, for recserve only, where its metrics are ("auto": the default port if it answers)."""

    tls: bool = False
    root_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    metrics_url: str | None = "auto"


class Calls(Protocol):
    """A workload's calls, prebuilt for one target: `send(i, deadline_s)` sends call `i` of the ring.

    It returns (status, tokens): OK, MISMATCH (an answer with the wrong number or size of vectors), a gRPC
    status value, or recorder.HTTP_BASE + an HTTP status; and the tokens the server says it counted, or
    None. It never raises for what the target answered; a cancelled call raises CancelledError.
    """

    async def send(self, i: int, deadline_s: float) -> Reply: ...


class Target(abc.ABC):
    """One target of a run: checked once before any load, then loaded through prebuilt calls."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.metrics_url: str | None = None
        """The Prometheus endpoint to scrape around each step (recserve targets), found by `check`."""
        # By the workload's id, the workload held so that its id cannot be reused while it is here.
        self._prepared: dict[int, tuple[Workload, Calls]] = {}

    @property
    def name(self) -> str:
        return self.endpoint.url

    @abc.abstractmethod
    async def check(self, spec: WorkloadSpec, notes: list[str]) -> TargetInfo:
        """Reachable, speaks its protocol, ready, takes this workload: TargetError (one line) otherwise.
        Anything worth knowing about the measurement goes to `notes`."""

    @abc.abstractmethod
    def prepare(self, workload: Workload) -> Calls:
        """The workload's calls in this protocol, built once."""

    def calls(self, workload: Workload) -> Calls:
        """`prepare`d once per workload: a sweep and the suite's rounds send the same ring many times, and
        the rounds load one target with several workloads in turn."""
        held = self._prepared.get(id(workload))
        if held is None:
            held = self._prepared[id(workload)] = (workload, self.prepare(workload))
        return held[1]


# --- recserve ----------------------------------------------------------------------------------------------

# What each prebuilt call returns, to check the count cheaply: packed bytes, float vectors, or scores.
_PACKED, _FLOATS, _SCORES = 0, 1, 2
_PACKED_WIDTH = {pb.VECTOR_ENCODING_PACKED_F16: 2, pb.VECTOR_ENCODING_PACKED_F32: 4}


class RecserveCalls:
    """The workload's own messages through the v1 stub: Embed, Score, Score with a user history; naming
    `model` (a served model of a server with several) and carrying the client's token, if any."""

    def __init__(self, client: AsyncClient, workload: Workload, model: str = "") -> None:
        stub = client.stub
        methods = {"embed": stub.Embed, "score": stub.Score, "history": stub.Score}
        self.methods = [methods[k] for k in workload.kinds]
        self.messages = workload.messages
        if model:
            self.messages = [_naming(m, model) for m in workload.messages]
        # The client puts its bearer token on the calls it makes itself; these go through its stub.
        self.metadata = client.metadata
        self.check: list[tuple[int, int]] = []
        for kind, msg, n in zip(workload.kinds, workload.messages, workload.expect.tolist(), strict=True):
            if kind != "embed":
                self.check.append((_SCORES, n))
            elif isinstance(msg, pb.EmbedRequest) and msg.encoding in _PACKED_WIDTH:
                self.check.append((_PACKED, n * _PACKED_WIDTH[msg.encoding]))
            else:
                self.check.append((_FLOATS, n))

    async def send(self, i: int, deadline_s: float) -> Reply:
        try:
            resp = await self.methods[i](self.messages[i], timeout=deadline_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code().value[0], None
        kind, n = self.check[i]
        if kind == _SCORES:
            return (OK if len(resp.scores) == n else MISMATCH), None
        if kind == _PACKED:
            got = len(resp.packed) == n * resp.dimension and resp.dimension > 0
        else:
            got = len(resp.vectors) == n
        return (OK, sum(resp.token_counts)) if got else (MISMATCH, None)


def _naming(message: pb.EmbedRequest | pb.ScoreRequest, model: str) -> pb.EmbedRequest | pb.ScoreRequest:
    """A copy of a prebuilt message that names `model`."""
    named = type(message).FromString(message.SerializeToString())
    named.model = model
    return named


class RecserveTarget(Target):
    """A recserve server through an AsyncClient; its metrics endpoint, when found, gives the server view."""

    def __init__(
        self,
        endpoint: Endpoint,
        client: AsyncClient,
        *,
        metrics_url: str | None = None,
        find_metrics: str | None = None,
    ) -> None:
        """`metrics_url` where the caller already knows it; else `find_metrics` ("auto", a URL, or None)
        is resolved by `check`."""
        super().__init__(endpoint)
        self.client = client
        self.metrics_url = metrics_url
        self._find_metrics = find_metrics

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> ServerInfo:
        info = await check_target(self.client, self.name)
        check_workload_fits(spec, info, self.name)
        if self._find_metrics is not None:
            self.metrics_url = await resolve_metrics(self._find_metrics, self.endpoint.address, notes)
        return info

    def prepare(self, workload: Workload) -> Calls:
        return RecserveCalls(self.client, workload, self.endpoint.model or "")


def as_target(client: AsyncClient, metrics_url: str | None = None) -> RecserveTarget:
    """An already connected (and checked) recserve client as a target: what the commands that start their
    own servers, or load one client from several places, hand to the loops."""
    return RecserveTarget(Endpoint("recserve", client.target), client, metrics_url=metrics_url)


@contextlib.asynccontextmanager
async def open_target(endpoint: Endpoint, access: Access | None = None) -> AsyncIterator[Target]:
    """A connected target of `endpoint`'s protocol (not yet checked); closed on exit."""
    access = access or Access()
    if endpoint.protocol == "recserve":
        async with connected(
            endpoint.address,
            access.tls,
            access.root_cert,
            access.tls_cert,
            access.tls_key,
            access.token_file,
            endpoint.model or "",
        ) as client:
            yield RecserveTarget(endpoint, client, find_metrics=access.metrics_url)
        return
    # Their client libraries (aiohttp, tritonclient) are needed only when a URL names one of them.
    from recserve.benchmarks.peers import open_peer

    async with open_peer(endpoint, access) as peer:
        yield peer
