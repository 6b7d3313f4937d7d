"""A typed Python client of the recserve API, sync (`Client`) and async (`AsyncClient`).

Both split big calls so that each stays under the limits the server advertises in Info (texts per call and
message bytes), decode packed vectors into numpy arrays, and raise one exception class per gRPC status code.
The planning and decoding are plain functions shared by both; the classes only add the transport.

A target may name several replicas (`dns:///NAME:PORT`, a list of addresses, or `ipv4:A:P,B:Q`): the channel
then balances calls round robin over them, skips replicas whose health says NOT_SERVING, and retries the
idempotent RPCs on UNAVAILABLE (`service_config`), so a draining replica's calls move to the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

FloatArray = npt.NDArray[np.float32]
Encoding = Literal["f32", "f16", "float"]
TruncationMode = Literal["truncate", "strict"]
SimilarityMode = Literal["cosine", "dot"]

SERVICE_NAME = "recserve.v1.Inference"
MiB = 1024 * 1024
# NOTE: gRPC's default receive limit is 4 MiB, which a few thousand 384-d float vectors exceed; the server's
# own default is 64 MiB, so the client accepts as much and still splits calls to what Info advertises.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
# Fixed bytes of a request or response beside the per-text fields (enum, flags, dimension, framing).
_MESSAGE_SLACK = 1024

ENCODINGS: dict[str, pb.VectorEncoding] = {
    "f32": pb.VECTOR_ENCODING_PACKED_F32,
    "f16": pb.VECTOR_ENCODING_PACKED_F16,
    "float": pb.VECTOR_ENCODING_FLOAT,
}
TRUNCATIONS: dict[str, pb.Truncation] = {"truncate": pb.TRUNCATION_TRUNCATE, "strict": pb.TRUNCATION_STRICT}
SIMILARITIES: dict[str, pb.Similarity] = {"cosine": pb.SIMILARITY_COSINE, "dot": pb.SIMILARITY_DOT}


# --- errors -----------------------------------------------------------------------------------------------


class RecserveError(Exception):
    """A failed call: `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RecserveError):
    """The request is wrong (empty, too many texts, a text too long in strict mode, bad weights...)."""


class NotFound(RecserveError):
    pass


class ResourceExhausted(RecserveError):
    """The server's queue is full, or a message is over the size limit: back off or go elsewhere."""


class Unavailable(RecserveError):
    """Unreachable, not yet warm, or draining: retry later or on another replica."""


class DeadlineExceeded(RecserveError):
    pass


class Unimplemented(RecserveError):
    """The target does not serve this RPC: it is probably not a recserve server."""


class Internal(RecserveError):
    pass


class Unauthenticated(RecserveError):
    """The server wants a bearer token (`token=`), or another one."""


class ProtocolError(RecserveError):
    """The server answered, but the answer does not match the request (wrong count or size)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNKNOWN, details)


_ERRORS: dict[grpc.StatusCode, type[RecserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_rpc(exc: grpc.RpcError) -> RecserveError:
    """The exception class for the call's status code (RecserveError itself for the rarer ones)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    return _ERRORS.get(code, RecserveError)(code, details)


# --- Info -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    max_texts_per_call: int
    max_text_bytes: int
    max_message_bytes: int
    max_batch_tokens: int
    max_batch_size: int
    max_queue_texts: int


@dataclass(frozen=True, slots=True)
class ServerInfo:
    model_name: str
    weights_sha256: str
    task: str
    dimension: int
    max_tokens: int
    precision: str
    provider: str
    pooling: str
    normalize: bool
    limits: Limits
    server_version: str
    # The served name of this model (what `model=` picks), and every model the server serves.
    name: str = ""
    models: tuple[str, ...] = ()
    # A classifier's labels, in the order of its logits.
    labels: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: pb.InfoResponse) -> ServerInfo:
        lim = msg.limits
        return cls(
            model_name=msg.model_name,
            weights_sha256=msg.weights_sha256,
            task=msg.task,
            dimension=msg.dimension,
            max_tokens=msg.max_tokens,
            precision=msg.precision,
            provider=msg.provider,
            pooling=msg.pooling,
            normalize=msg.normalize,
            limits=Limits(
                max_texts_per_call=lim.max_texts_per_call,
                max_text_bytes=lim.max_text_bytes,
                max_message_bytes=lim.max_message_bytes,
                max_batch_tokens=lim.max_batch_tokens,
                max_batch_size=lim.max_batch_size,
                max_queue_texts=lim.max_queue_texts,
            ),
            server_version=msg.server_version,
            name=msg.name,
            models=tuple(m.name for m in msg.models),
            labels=tuple(msg.labels),
        )


# --- planning, requests and decoding (shared by both clients) ---------------------------------------------


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _text_field_bytes(text: str) -> int:
    size = len(text.encode("utf-8"))
    return 1 + _varint_len(size) + size


def _vector_bytes(dimension: int, encoding: Encoding) -> int:
    """Upper bound of the response bytes one text adds: its vector, token count and truncation index."""
    if encoding == "float":
        payload = 4 * dimension
        value = 1 + _varint_len(payload + 1 + _varint_len(payload)) + 1 + _varint_len(payload) + payload
    else:
        value = (2 if encoding == "f16" else 4) * dimension
    return value + 2 * 5


def plan_chunks(
    texts: Sequence[str], *, max_texts: int, budget_bytes: int, response_bytes_per_text: int = 0
) -> list[slice]:
    """Consecutive slices of `texts`, each within `max_texts` and within `budget_bytes` both ways.

    A single text over the budget still gets a slice of its own, so the server answers it with a clear
    status instead of the client failing silently.
    """
    n = len(texts)
    max_texts = max(1, max_texts)
    # Cheap path: UTF-8 takes at most 4 bytes a character, so most calls need no per-text encoding. An empty
    # list still makes one call, so that the server's own answer to it reaches the caller.
    upper = sum(len(t) for t in texts) * 4 + n * 6 + n * response_bytes_per_text
    if n <= max_texts and upper <= budget_bytes:
        return [slice(0, n)]
    chunks: list[slice] = []
    start = 0
    req = resp = 0
    for i, text in enumerate(texts):
        cost = _text_field_bytes(text)
        fits = i - start < max_texts and req + cost <= budget_bytes
        fits = fits and resp + response_bytes_per_text <= budget_bytes
        if i > start and not fits:
            chunks.append(slice(start, i))
            start, req, resp = i, 0, 0
        req += cost
        resp += response_bytes_per_text
    chunks.append(slice(start, n))
    return chunks


def embed_request(
    texts: Sequence[str],
    *,
    encoding: Encoding,
    normalize: bool | None,
    truncation: TruncationMode,
    model: str = "",
) -> pb.EmbedRequest:
    """The EmbedRequest for `texts`; raises ValueError on an unknown encoding or truncation mode."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
    req = pb.EmbedRequest(
        texts=texts, encoding=ENCODINGS[encoding], truncation=TRUNCATIONS[truncation], model=model
    )
    if normalize is not None:
        req.normalize = normalize
    return req


def score_request(
    candidates: Sequence[str],
    *,
    query: str | None,
    history: Sequence[str] | None,
    weights: Sequence[float] | None,
    similarity: SimilarityMode,
    truncation: TruncationMode,
    model: str = "",
) -> pb.ScoreRequest:
    """The ScoreRequest for a text query or a user history (exactly one of them)."""
    if (query is None) == (history is None):
        raise ValueError("pass exactly one of query= and history=")
    if weights is not None and history is None:
        raise ValueError("weights= goes with history=")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
    req = pb.ScoreRequest(
        candidates=candidates,
        similarity=SIMILARITIES[similarity],
        truncation=TRUNCATIONS[truncation],
        model=model,
    )
    if query is not None:
        req.query_text = query
    else:
        req.user_history.SetInParent()  # an empty history is still a history (and the server says so)
        req.user_history.texts.extend(history or ())
        req.user_history.weights.extend(weights or ())
    return req


def decode_vectors(resp: pb.EmbedResponse, count: int) -> FloatArray:
    """[count, dimension] float32 from any encoding; ProtocolError when the sizes do not add up."""
    dim = resp.dimension
    if resp.encoding in (pb.VECTOR_ENCODING_PACKED_F32, pb.VECTOR_ENCODING_PACKED_F16):
        dtype = "<f4" if resp.encoding == pb.VECTOR_ENCODING_PACKED_F32 else "<f2"
        flat = np.frombuffer(resp.packed, dtype=dtype)
        if flat.size != count * dim:
            raise ProtocolError(f"packed vectors hold {flat.size} values, expected {count} x {dim}")
        return flat.astype(np.float32).reshape(count, dim)
    if len(resp.vectors) != count or any(len(v.values) != dim for v in resp.vectors):
        raise ProtocolError(f"response has {len(resp.vectors)} vectors, expected {count} of dimension {dim}")
    out = np.empty((count, dim), dtype=np.float32)
    for row, vec in zip(out, resp.vectors, strict=True):
        row[:] = vec.values
    return out


Labels = list[list[tuple[str, float]]]


def decode_labels(resp: pb.ClassifyResponse, count: int) -> Labels:
    """Each text's (label, probability) pairs, best first; ProtocolError when the count is wrong."""
    if len(resp.results) != count:
        raise ProtocolError(f"server returned {len(resp.results)} classifications for {count} texts")
    return [[(label.label, label.probability) for label in result.labels] for result in resp.results]


def decode_scores(resp: pb.ScoreResponse, count: int) -> FloatArray:
    if len(resp.scores) != count:
        raise ProtocolError(f"response has {len(resp.scores)} scores, expected {count}")
    return np.fromiter(resp.scores, dtype=np.float32, count=count)


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# --- targets and the service config (several replicas behind one channel) -------------------------------

Target = str | Sequence[str]
# Embed, Score and Info change nothing on the server, so a call refused by a draining or unreachable
# replica can be sent again to another one.
RETRIED_METHODS = ("Embed", "Score", "Info")
# gRPC caps maxAttempts at 5 (the first attempt included).
MAX_ATTEMPTS_LIMIT = 5
DEFAULT_MAX_ATTEMPTS = 4
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _ip_address(address: str) -> tuple[int, str]:
    """(IP version, "IP:PORT" as gRPC wants it) of one `IP:PORT` or `[IPv6]:PORT`; ValueError otherwise."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not IP:PORT")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(
            f"{address!r}: a list of replicas takes IP:PORT addresses; for a name use dns:///{address}"
        ) from None
    return ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def channel_target(target: Target) -> str:
    """The gRPC target for `target`.

    A string with a scheme (`dns:///NAME:PORT`, `ipv4:A:P,B:Q`, `ipv6:[A]:P,...`, `unix:PATH`) or a plain
    `HOST:PORT` goes to gRPC as it is. A list of `IP:PORT` addresses, or the same comma-separated without a
    scheme, becomes one static `ipv4:` (or `ipv6:`) target; ValueError on a name or on mixed IP versions.
    """
    if isinstance(target, str):
        if target.startswith(_SCHEMES) or "," not in target:
            if not target.strip():
                raise ValueError("empty target")
            return target
        target = target.split(",")
    parsed = [_ip_address(a) for a in target if a.strip()]
    if not parsed:
        raise ValueError("no address in the target list")
    versions = {v for v, _ in parsed}
    if len(versions) > 1:
        raise ValueError("a list of replicas takes IPv4 or IPv6 addresses, not both (gRPC's ipv4:/ipv6:)")
    return f"ipv{versions.pop()}:" + ",".join(a for _, a in parsed)


def names_a_fleet(target: Target) -> bool:
    """Whether `target` may stand for several replicas: anything but a plain HOST:PORT."""
    return not isinstance(target, str) or target.startswith(_SCHEMES) or "," in target


def service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS, health_check: bool = True) -> dict[str, Any]:
    """The channel's service config: round robin over every address the target resolves to, retries of
    Embed, Score and Info on UNAVAILABLE (`max_attempts` in all, 1: none) with jittered exponential backoff,
    and with `health_check` gRPC's client-side health checking of SERVICE_NAME (a NOT_SERVING replica is
    taken out of the rotation until it says SERVING again)."""
    if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"max_attempts must be in 1..{MAX_ATTEMPTS_LIMIT} (gRPC's cap), got {max_attempts}")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        # NOTE: only UNAVAILABLE (draining, not warm yet, unreachable): RESOURCE_EXHAUSTED means the fleet is
        # full, and a retry would add load where there is no room. No retryThrottling: the count per call is
        # bounded, and a drain makes a burst of UNAVAILABLE that a token bucket would turn into failures.
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME, "method": m} for m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    return config


@dataclass(frozen=True, slots=True)
class _Transport:
    """How a client reaches the server: channel credentials, channel options and per-call metadata."""

    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata: tuple[tuple[str, str], ...] | None


def _transport(
    max_message_bytes: int,
    tls: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    server_name: str | None,
    token: str | None,
    config: dict[str, Any],
) -> _Transport:
    """TLS when asked or when any TLS material is given; ValueError on half a client certificate."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("pass both certificate_chain= and private_key= (mutual TLS), or neither")
    options = channel_options(max_message_bytes)
    options.append(("grpc.service_config", json.dumps(config)))
    # The config above, not one a DNS TXT record might carry.
    options.append(("grpc.service_config_disable_resolution", 1))
    secure = tls or root_certificates is not None or certificate_chain is not None
    credentials = None
    if secure:
        # None roots means the system's trust store.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
        if server_name is not None:
            # Check the server's certificate against this name instead of the target's host (an IP, a proxy).
            options.append(("grpc.ssl_target_name_override", server_name))
    elif server_name is not None:
        raise ValueError("server_name= applies to TLS only: pass tls=True or root_certificates=")
    metadata = None
    if token is not None:
        if not token.strip():
            raise ValueError("token= is empty")
        metadata = (("authorization", f"Bearer {token.strip()}"),)
    return _Transport(credentials, options, metadata)


_HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


class _Base:
    """What both clients share: settings, the cached Info, and the planning that needs it."""

    def __init__(
        self, max_message_bytes: int, deadline: float | None, transport: _Transport, model: str
    ) -> None:
        # The served model every call names ("" = the server's default).
        self.model = model
        self.max_message_bytes = max_message_bytes
        self.deadline = deadline
        self._info: ServerInfo | None = None
        # Sent with every call (the bearer token), health checks included.
        self._metadata = transport.metadata

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call of this client sends (the bearer token), for callers that build their own calls
        on its channel (the benchmark harness)."""
        return self._metadata

    def _budget(self, info: ServerInfo) -> int:
        limit = min(info.limits.max_message_bytes or self.max_message_bytes, self.max_message_bytes)
        return max(1, limit - _MESSAGE_SLACK)

    def _embed_requests(
        self,
        info: ServerInfo,
        texts: Sequence[str],
        encoding: Encoding,
        normalize: bool | None,
        truncation: TruncationMode,
    ) -> list[pb.EmbedRequest]:
        chunks = plan_chunks(
            texts,
            max_texts=info.limits.max_texts_per_call or len(texts),
            budget_bytes=self._budget(info),
            response_bytes_per_text=_vector_bytes(info.dimension, encoding),
        )
        return [
            embed_request(
                texts[c], encoding=encoding, normalize=normalize, truncation=truncation, model=self.model
            )
            for c in chunks
        ]

    def _score_requests(
        self,
        info: ServerInfo,
        candidates: Sequence[str],
        query: str | None,
        history: Sequence[str] | None,
        weights: Sequence[float] | None,
        similarity: SimilarityMode,
        truncation: TruncationMode,
    ) -> list[pb.ScoreRequest]:
        # The query (or history) travels in every chunk, so it takes its share of each chunk's limits.
        fixed = list(history or ()) if query is None else [query]
        max_texts = (info.limits.max_texts_per_call or len(candidates) + len(fixed)) - len(fixed)
        fixed_bytes = sum(_text_field_bytes(t) for t in fixed) + 5 * len(fixed)
        chunks = plan_chunks(
            candidates, max_texts=max_texts, budget_bytes=max(1, self._budget(info) - fixed_bytes)
        )
        return [
            score_request(
                candidates[c],
                query=query,
                history=history,
                weights=weights,
                similarity=similarity,
                truncation=truncation,
                model=self.model,
            )
            for c in chunks
        ]

    def _classify_requests(
        self, info: ServerInfo, texts: Sequence[str], top_k: int, truncation: TruncationMode
    ) -> list[pb.ClassifyRequest]:
        if truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
        per_text = (top_k or 1) * (16 + max((len(label) for label in info.labels), default=0))
        chunks = plan_chunks(
            texts,
            max_texts=info.limits.max_texts_per_call or len(texts),
            budget_bytes=self._budget(info),
            response_bytes_per_text=per_text,
        )
        return [
            pb.ClassifyRequest(
                texts=texts[c], top_k=top_k, truncation=TRUNCATIONS[truncation], model=self.model
            )
            for c in chunks
        ]

    def _deadline(self, deadline: float | None) -> float | None:
        # A gRPC deadline, not a local wait: it travels to the server, which drops the call once it passes.
        return self.deadline if deadline is None else deadline


class Client(_Base):
    """Blocking client. `with Client("127.0.0.1:50051") as c: c.embed(["a text"])`.

    `target`: `HOST:PORT`, or several replicas: `dns:///NAME:PORT` (every address NAME resolves to), a list
    of `IP:PORT`, or `ipv4:A:P,B:Q` (see `channel_target`). Calls go round robin; Embed, Score and Info are
    retried on UNAVAILABLE, `max_attempts` attempts in all (1: no retry). `health_check` (default: on for
    several replicas, off for a plain HOST:PORT) takes NOT_SERVING replicas out of the rotation.

    TLS: `tls=True` (system roots) or `root_certificates=` (a CA bundle, PEM); mutual TLS adds
    `certificate_chain=` and `private_key=`; `server_name=` checks the server's certificate against that
    name instead of the target's host. `token=` is sent as `authorization: Bearer <token>` on every call.
    `model=` names the served model every call uses ("" = the server's default).
    """

    def __init__(
        self,
        target: Target = "127.0.0.1:50051",
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        deadline: float | None = 30.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        health_check: bool | None = None,
        model: str = "",
    ) -> None:
        self.target = channel_target(target)
        config = service_config(max_attempts, names_a_fleet(target) if health_check is None else health_check)
        transport = _transport(
            max_message_bytes,
            tls,
            root_certificates,
            certificate_chain,
            private_key,
            server_name,
            token,
            config,
        )
        super().__init__(max_message_bytes, deadline, transport, model)
        creds, opts = transport.credentials, transport.options
        self.channel: grpc.Channel = (
            grpc.insecure_channel(self.target, options=opts)
            if creds is None
            else grpc.secure_channel(self.target, creds, options=opts)
        )
        self.stub = pb_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, deadline: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(deadline), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def info(self, *, refresh: bool = False, deadline: float | None = None) -> ServerInfo:
        """What is served and the server's limits (cached after the first call)."""
        if self._info is None or refresh:
            self._info = ServerInfo.from_proto(
                self._call(self.stub.Info, pb.InfoRequest(model=self.model), deadline)
            )
        return self._info

    def health(self, service: str = SERVICE_NAME, *, deadline: float | None = None) -> str:
        """The grpc.health.v1 status name, e.g. SERVING or NOT_SERVING; service "" is the whole server."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), deadline)
        return str(_HEALTH_NAMES.get(resp.status, "UNKNOWN"))

    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        encoding: Encoding = "f32",
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> FloatArray:
        """One float32 row per text, in order, however many calls it takes."""
        reqs = self._embed_requests(self.info(), texts, encoding, normalize, truncation)
        return np.concatenate(
            [decode_vectors(self._call(self.stub.Embed, r, deadline), len(r.texts)) for r in reqs]
        )

    def score(
        self,
        candidates: Sequence[str],
        *,
        query: str | None = None,
        history: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        similarity: SimilarityMode = "cosine",
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> FloatArray:
        """One score per candidate, in order, against a text `query` or a user `history` (with `weights`)."""
        info = self.info()
        reqs = self._score_requests(info, candidates, query, history, weights, similarity, truncation)
        return np.concatenate(
            [decode_scores(self._call(self.stub.Score, r, deadline), len(r.candidates)) for r in reqs]
        )

    def classify(
        self,
        texts: Sequence[str],
        *,
        top_k: int = 1,
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> Labels:
        """Each text's `top_k` (label, probability) pairs, best first, in order (classifier models)."""
        reqs = self._classify_requests(self.info(), texts, top_k, truncation)
        return [
            row
            for r in reqs
            for row in decode_labels(self._call(self.stub.Classify, r, deadline), len(r.texts))
        ]


class AsyncClient(_Base):
    """asyncio client over grpc.aio. `async with AsyncClient(target) as c: await c.embed([...])`.

    It takes the same targets (one replica or several), retry, health-check, TLS and token arguments as
    `Client`.

    The chunks of one big call run concurrently, at most `max_concurrent_chunks` at a time, so the server
    can batch them together.
    """

    def __init__(
        self,
        target: Target = "127.0.0.1:50051",
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        deadline: float | None = 30.0,
        max_concurrent_chunks: int = 4,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        health_check: bool | None = None,
        model: str = "",
    ) -> None:
        self.target = channel_target(target)
        config = service_config(max_attempts, names_a_fleet(target) if health_check is None else health_check)
        transport = _transport(
            max_message_bytes,
            tls,
            root_certificates,
            certificate_chain,
            private_key,
            server_name,
            token,
            config,
        )
        super().__init__(max_message_bytes, deadline, transport, model)
        creds, opts = transport.credentials, transport.options
        self.channel: grpc.aio.Channel = (
            grpc.aio.insecure_channel(self.target, options=opts)
            if creds is None
            else grpc.aio.secure_channel(self.target, creds, options=opts)
        )
        self.stub = pb_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._max_concurrent_chunks = max(1, max_concurrent_chunks)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any, deadline: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(deadline), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def _gather(self, calls: Iterator[Any]) -> list[Any]:
        sem = asyncio.Semaphore(self._max_concurrent_chunks)

        async def bounded(coro: Any) -> Any:
            async with sem:
                return await coro

        return list(await asyncio.gather(*(bounded(c) for c in calls)))

    async def info(self, *, refresh: bool = False, deadline: float | None = None) -> ServerInfo:
        """What is served and the server's limits (cached after the first call)."""
        if self._info is None or refresh:
            self._info = ServerInfo.from_proto(
                await self._call(self.stub.Info, pb.InfoRequest(model=self.model), deadline)
            )
        return self._info

    async def health(self, service: str = SERVICE_NAME, *, deadline: float | None = None) -> str:
        """The grpc.health.v1 status name, e.g. SERVING or NOT_SERVING; service "" is the whole server."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = await self._call(self._health.Check, req, deadline)
        return str(_HEALTH_NAMES.get(resp.status, "UNKNOWN"))

    async def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        encoding: Encoding = "f32",
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> FloatArray:
        """One float32 row per text, in order, however many calls it takes."""
        reqs = self._embed_requests(await self.info(), texts, encoding, normalize, truncation)
        resps = await self._gather(self._call(self.stub.Embed, r, deadline) for r in reqs)
        return np.concatenate(
            [decode_vectors(resp, len(r.texts)) for r, resp in zip(reqs, resps, strict=True)]
        )

    async def score(
        self,
        candidates: Sequence[str],
        *,
        query: str | None = None,
        history: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        similarity: SimilarityMode = "cosine",
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> FloatArray:
        """One score per candidate, in order, against a text `query` or a user `history` (with `weights`)."""
        info = await self.info()
        reqs = self._score_requests(info, candidates, query, history, weights, similarity, truncation)
        resps = await self._gather(self._call(self.stub.Score, r, deadline) for r in reqs)
        return np.concatenate(
            [decode_scores(resp, len(r.candidates)) for r, resp in zip(reqs, resps, strict=True)]
        )

    async def classify(
        self,
        texts: Sequence[str],
        *,
        top_k: int = 1,
        truncation: TruncationMode = "truncate",
        deadline: float | None = None,
    ) -> Labels:
        """Each text's `top_k` (label, probability) pairs, best first, in order (classifier models)."""
        reqs = self._classify_requests(await self.info(), texts, top_k, truncation)
        resps = await self._gather(self._call(self.stub.Classify, r, deadline) for r in reqs)
        return [row for r, resp in zip(reqs, resps, strict=True) for row in decode_labels(resp, len(r.texts))]
