"""The gRPC transport: protobuf <-> engine calls, and ServeError -> status code (in one place).

It never imports onnxruntime; everything about models lives below the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from recserve import __version__
from recserve.catalog.search import Filter
from recserve.manifest import Manifest
from recserve.server import errors
from recserve.server.engine import Similarity, Timings, UserHistory
from recserve.server.metrics import Metrics
from recserve.server.recommend import HistoryQuery, Query, Recommender
from recserve.server.registry import ServedModel, ServedModels
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A cancellation this close to the call's deadline is the deadline passing, not the caller leaving.
DEADLINE_SLACK_S = 0.01

# Refusals that shed load (logged at debug): the caller did nothing wrong and should retry elsewhere.
_SHED = (errors.Overloaded, errors.DeadlineExceeded, errors.Unavailable)

# The wire form of vectors: None is repeated floats, a dtype is packed little-endian bytes.
_ENCODINGS: dict[int, np.dtype[np.floating] | None] = {
    pb.VECTOR_ENCODING_UNSPECIFIED: None,
    pb.VECTOR_ENCODING_FLOAT: None,
    pb.VECTOR_ENCODING_PACKED_F32: np.dtype("<f4"),
    pb.VECTOR_ENCODING_PACKED_F16: np.dtype("<f2"),
}
_SIMILARITY: dict[int, Similarity] = {
    pb.SIMILARITY_UNSPECIFIED: "cosine",
    pb.SIMILARITY_COSINE: "cosine",
    pb.SIMILARITY_DOT: "dot",
}

Reply = TypeVar("Reply")


def _strict(truncation: int) -> bool:
    if truncation not in pb.Truncation.values():
        raise errors.InvalidArgument(f"unknown truncation {truncation}: use TRUNCATE or STRICT")
    return truncation == pb.TRUNCATION_STRICT


def _deadline(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def status_code(error: BaseException) -> grpc.StatusCode:
    """The status a failure reaches the caller with: its class's code, INTERNAL for anything unexpected."""
    if isinstance(error, errors.ServeError):
        return grpc.StatusCode[error.code]
    return grpc.StatusCode.INTERNAL


def vector_encoding(encoding: int) -> int:
    """The caller's vector encoding, checked before any work is done for the call."""
    if encoding not in _ENCODINGS:
        raise errors.InvalidArgument(
            f"unknown vector encoding {encoding}: use FLOAT, PACKED_F32 or PACKED_F16"
        )
    return pb.VECTOR_ENCODING_FLOAT if encoding == pb.VECTOR_ENCODING_UNSPECIFIED else encoding


def encode_vectors(vectors: np.ndarray, encoding: int, response: pb.EmbedResponse) -> None:
    """Fills `response` with `vectors` [n, dim] in `encoding`, as vector_encoding returned it."""
    response.encoding = encoding  # type: ignore[assignment]
    dtype = _ENCODINGS[encoding]
    if dtype is None:
        response.vectors.extend(pb.Vector(values=row) for row in vectors.tolist())
    else:
        response.packed = np.ascontiguousarray(vectors, dtype=dtype).tobytes()


class Malformed:
    """A request whose bytes did not parse (not protobuf of its type, or a string that is not UTF-8).

    The lenient deserializer returns it instead of raising inside gRPC (an UNKNOWN status, uncounted, with
    a traceback in the log); the handler answers it with INVALID_ARGUMENT through `_handle`.
    """

    __slots__ = ("message",)

    def __init__(self, type_name: str, error: Exception) -> None:
        reason = str(error).rpartition(": ")[2] or type(error).__name__
        self.message = f"the request is not a valid {type_name}: {reason}"

    async def refuse(self, served: ServedModel, deadline: float | None) -> NoReturn:
        raise errors.InvalidArgument(self.message)


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # whatever parsing raises, the bytes are the caller's
            return Malformed(name, exc)

    return deserialize


class Servicer(Protocol):
    """What `add_to_server` registers: a method per RPC, and `_handle`, which every front door takes from
    InferenceService (recserve.v1 and KServe v2 share its status mapping, request ids and metrics)."""

    def _handle(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[object, object],
        model: str | None,
        call: Call[Reply],
    ) -> Awaitable[Reply]: ...


def add_to_server(
    servicer: Servicer,
    server: grpc.aio.Server,
    service: ServiceDescriptor = pb.DESCRIPTOR.services_by_name["Inference"],
) -> None:
    """Registers `servicer` for `service` (recserve.v1 unless told) as a generated add_*_to_server does,
    from the service's descriptor, except that a request that does not parse reaches `_handle` as
    Malformed."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} streams: register it with its own handler kind")
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(servicer, method.name),
            request_deserializer=_lenient(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


# A request id for calls that bring none: this process's random prefix and a counter, unique across a fleet
# without a uuid4 (a system call and a hash) on every call.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def _guarded(
    servicer: Servicer, rpc: str
) -> Callable[[Any, grpc.aio.ServicerContext[object, object]], Awaitable[Any]]:
    method = getattr(servicer, rpc)

    async def handler(request: Any, context: grpc.aio.ServicerContext[object, object]) -> Any:
        if isinstance(request, Malformed):
            return await servicer._handle(rpc, context, None, request.refuse)
        return await method(request, context)

    return handler


Call = Callable[[ServedModel, float | None], Awaitable[tuple[Reply, Timings, int]]]


_STAGES = {"retrieval": pb.STAGE_RETRIEVAL, "rerank": pb.STAGE_RERANK}


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, models: ServedModels, metrics: Metrics, recommender: Recommender) -> None:
        self.models = models
        self.metrics = metrics
        self.recommender = recommender

    async def _handle(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[object, object],
        model: str | None,
        call: Call[Reply],
    ) -> Reply:
        """Runs one call: the model it names, request id, timings in trailing metadata, metrics, and the
        status mapping.

        `call` gets the served model and the call's deadline on the event loop's clock (None without one).
        `model` is the request's model field; None for a request that did not parse, whose `call` refuses
        it before a model is looked up.
        """
        started = time.perf_counter()
        request_id = dict(context.invocation_metadata() or ()).get("x-request-id") or _new_request_id()
        deadline = _deadline(context)
        served: ServedModel | None = None
        failure: BaseException
        try:
            if model is None:  # the request did not parse: `call` refuses it, and it named no model
                await call(self.models.default, deadline)
            served = self.models.get(model or "")
            reply, timings, texts = await call(served, deadline)
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the client goes away and when its deadline passes (its
            # timer and this loop's clock may disagree by a hair, hence the slack).
            label = "" if served is None else served.name
            if deadline is not None and asyncio.get_running_loop().time() >= deadline - DEADLINE_SLACK_S:
                self._record(label, rpc, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", started, request_id)
            else:
                self._record(label, rpc, grpc.StatusCode.CANCELLED, "cancelled", started, request_id)
            raise
        except Exception as exc:
            failure = exc
        else:
            served.metrics.texts(rpc, texts)
            if texts:  # a call that ran no texts (Info, metadata) tokenised nothing
                served.metrics.tokenize_seconds.observe(timings.tokenize_s)
            context.set_trailing_metadata(
                (
                    ("x-request-id", request_id),
                    ("x-tokenize-ms", f"{timings.tokenize_s * 1e3:.3f}"),
                    ("x-queue-ms", f"{timings.queue_s * 1e3:.3f}"),
                    ("x-infer-ms", f"{timings.infer_s * 1e3:.3f}"),
                )
            )
            self._record(served.name, rpc, grpc.StatusCode.OK, None, started, request_id)
            return reply

        known = isinstance(failure, errors.ServeError) and not isinstance(failure, errors.Internal)
        code = status_code(failure)
        if known:
            # NOTE: shedding load is the normal case under overload, and one line per refused call would
            # turn it into a log storm that costs the loop more than the refusal; the metrics count them.
            level = logging.DEBUG if isinstance(failure, _SHED) else logging.INFO
            if log.isEnabledFor(level):
                where = {"request_id": request_id, "rpc": rpc, "code": code.name}
                log.log(level, "call refused", extra=where)
            message = str(failure)
        else:
            log.error("internal error", exc_info=failure, extra={"request_id": request_id, "rpc": rpc})
            message = f"internal error (request id {request_id}); the server log has the details"
        reason = failure.reason if isinstance(failure, errors.ServeError) else "internal"
        # NOTE: recorded before abort: the client has its status as soon as abort sends it.
        self._record("" if served is None else served.name, rpc, code, reason, started, request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    def _record(
        self,
        model: str,
        rpc: str,
        code: grpc.StatusCode,
        reason: str | None,
        started: float,
        request_id: str,
    ) -> None:
        """Counts one finished call, exactly once, before its status reaches the client."""
        seconds = time.perf_counter() - started
        self.metrics.call_finished(model, rpc, code.name, reason, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "call",
                extra={
                    "request_id": request_id,
                    "rpc": rpc,
                    "model": model,
                    "code": code.name,
                    "ms": round(1e3 * seconds, 3),
                },
            )

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedResponse:
        async def call(served: ServedModel, deadline: float | None) -> tuple[pb.EmbedResponse, Timings, int]:
            strict = _strict(request.truncation)
            encoding = vector_encoding(request.encoding)
            normalize = request.normalize if request.HasField("normalize") else None
            result = await served.engine.embed(request.texts, normalize, strict, deadline)
            response = pb.EmbedResponse(
                dimension=result.vectors.shape[1],
                truncated=result.truncated,
                token_counts=result.token_counts,
            )
            encode_vectors(result.vectors, encoding, response)
            return response, result.timings, len(request.texts)

        return await self._handle("Embed", context, request.model, call)

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ScoreResponse:
        async def call(served: ServedModel, deadline: float | None) -> tuple[pb.ScoreResponse, Timings, int]:
            strict = _strict(request.truncation)
            similarity = _SIMILARITY.get(request.similarity)
            if similarity is None:
                raise errors.InvalidArgument(f"unknown similarity {request.similarity}: use COSINE or DOT")
            query: str | UserHistory
            which = request.WhichOneof("query")
            if which == "query_text":
                query = request.query_text
            elif which == "user_history":
                query = UserHistory(request.user_history.texts, request.user_history.weights)
            else:
                raise errors.InvalidArgument("set the query: query_text or user_history")
            stored = None
            if request.candidate_ids:
                searcher = self.recommender.catalog(request.catalog)
                self.recommender.check_built_by(searcher, served)
                stored = self.recommender.stored_vectors(
                    searcher.catalog, request.candidate_ids, "candidate_ids"
                )
            result = await served.engine.score(
                query, request.candidates, similarity, strict, deadline, candidate_vectors=stored
            )
            response = pb.ScoreResponse(scores=result.scores.tolist(), truncated=result.truncated)
            return response, result.timings, result.model_texts

        return await self._handle("Score", context, request.model, call)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ClassifyResponse:
        async def call(
            served: ServedModel, deadline: float | None
        ) -> tuple[pb.ClassifyResponse, Timings, int]:
            strict = _strict(request.truncation)
            result = await served.engine.classify(request.texts, request.top_k or 1, strict, deadline)
            labels = served.engine.manifest.labels
            response = pb.ClassifyResponse(truncated=result.truncated)
            for indices, probabilities in zip(
                result.indices.tolist(), result.probabilities.tolist(), strict=True
            ):
                response.results.add(
                    labels=[
                        pb.LabelScore(label=labels[i], probability=p, index=i)
                        for i, p in zip(indices, probabilities, strict=True)
                    ]
                )
            return response, result.timings, len(request.texts)

        return await self._handle("Classify", context, request.model, call)

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecommendResponse:
        async def call(
            served: ServedModel, deadline: float | None
        ) -> tuple[pb.RecommendResponse, Timings, int]:
            strict = _strict(request.truncation)
            query: Query
            which = request.WhichOneof("query")
            if which == "query_text":
                query = request.query_text
            elif which == "user_history":
                history = request.user_history
                query = HistoryQuery(history.texts, history.item_ids, history.weights)
            elif which == "query_vector":
                query = np.asarray(request.query_vector.values, dtype=np.float32)
            else:
                raise errors.InvalidArgument("set the query: query_text, user_history or query_vector")
            filters = [
                Filter(
                    f.attribute,
                    tuple(f.values),
                    f.min if f.HasField("min") else None,
                    f.max if f.HasField("max") else None,
                )
                for f in request.filters
            ]
            result = await self.recommender.recommend(
                request.model,
                request.catalog,
                query,
                request.k,
                request.exclude_ids,
                filters,
                request.approximate,
                request.rerank_model,
                request.rerank_k,
                strict,
                deadline,
            )
            response = pb.RecommendResponse(
                catalog=request.catalog or self.recommender.names[0],
                retrieve_ms=result.retrieve_s * 1e3,
                rerank_ms=result.rerank_s * 1e3,
            )
            for item_id, score, stage, retrieval in zip(
                result.ids,
                result.scores.tolist(),
                result.stages,
                result.retrieval_scores.tolist(),
                strict=True,
            ):
                response.items.add(id=item_id, score=score, stage=_STAGES[stage], retrieval_score=retrieval)
            return response, Timings(), result.model_texts

        return await self._handle("Recommend", context, request.model, call)

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.InfoResponse:
        async def call(served: ServedModel, deadline: float | None) -> tuple[pb.InfoResponse, Timings, int]:
            return served.info, Timings(), 0

        return await self._handle("Info", context, request.model, call)


def build_info(
    name: str,
    manifest: Manifest,
    precision: str,
    provider: str,
    limits: pb.Limits,
    verified_sha256: str | None = None,
) -> pb.InfoResponse:
    """What Info answers: the model, the runtime in use and the limits a caller must keep to.

    `verified_sha256` is the served file's hash as computed at start (None: not verified); the manifest's
    own claims are never reported as verified.
    """
    return pb.InfoResponse(
        name=name,
        labels=manifest.labels,
        multi_label=manifest.multi_label,
        model_name=manifest.model_name,
        weights_sha256=manifest.source.weights_sha256,
        task=manifest.task,
        dimension=manifest.output_dim,
        max_tokens=manifest.max_length,
        precision=precision,
        provider=provider,
        pooling=manifest.pooling or "",
        normalize=manifest.normalize,
        limits=limits,
        server_version=__version__,
        variant_sha256=verified_sha256 or "",
        verified=verified_sha256 is not None,
    )


def list_models(models: ServedModels) -> None:
    """Adds the list of every served model, the default first, to each model's Info."""
    order = [models.default, *(served for served in models if served is not models.default)]
    summary = [
        pb.ServedModel(
            name=served.name,
            task=served.info.task,
            dimension=served.info.dimension,
            precision=served.info.precision,
            default=served is models.default,
        )
        for served in order
    ]
    for served in models:
        del served.info.models[:]
        served.info.models.extend(summary)
