"""The KServe v2 / Open Inference Protocol (inference.GRPCInferenceService): tensors <-> engine calls.

The second front door, beside recserve.v1 on the same port: its calls run through recserve.v1's call
handling (InferenceService._handle: model lookup, status mapping, request id, timings, metrics) and the
same engines and batchers, so a ModelInfer and an Embed can share a batch. docs/kserve.md has the mapping.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client.metrics import MetricWrapperBase

from recserve import __version__
from recserve.kserve import grpc_service_pb2 as kpb
from recserve.manifest import Manifest
from recserve.server import errors
from recserve.server.engine import Timings
from recserve.server.metrics import MODEL, Name, total
from recserve.server.registry import ServedModel
from recserve.server.service import InferenceService, Reply
from recserve.server.settings import ServerSettings
from recserve.tensors import FloatArray

SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
# What ModelMetadata and ModelConfig name as platform and backend.
PLATFORM = "recserve"
# Every model has one version: the repository it was loaded from.
VERSION = "1"
# Triton's names for the protocol extensions served here.
EXTENSIONS = ("model_configuration", "statistics", "parameters")
# RPCs that describe rather than run a model: ModelStatistics counts every other RPC of either front door.
_METADATA_RPCS = frozenset({"Info", *(m.name for m in SERVICE.methods if m.name != "ModelInfer")})

# The float outputs' wire forms, chosen by the request parameter `datatype`.
_FLOAT_TYPES: dict[str, np.dtype[np.floating]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
_CONFIG_TYPES = {"BYTES": kpb.TYPE_STRING, "FP32": kpb.TYPE_FP32}
# The request parameters served, and the InferParameter field each must use.
_PARAMETERS = {"normalize": "bool_param", "truncation": "string_param", "datatype": "string_param"}
_KINDS = {"bool_param": "bool", "string_param": "string"}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    # Without the batch dimension when the model batches; -1 for any size.
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """A model's tensors as the protocol shows them.

    `batched`: every tensor has a leading batch dimension (Triton's max_batch_size > 0), one element per
    text. A cross-encoder's one query and n candidates have no common batch dimension, so it has none.
    """

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    batched: bool

    def shape(self, tensor: Tensor) -> list[int]:
        """The tensor's full shape, as ModelMetadata gives it."""
        return [-1, *tensor.dims] if self.batched else list(tensor.dims)

    def describe(self, tensors: Sequence[Tensor]) -> str:
        return ", ".join(f"{t.name} ({t.datatype} {self.shape(t)})" for t in tensors)


def signature(manifest: Manifest) -> Signature:
    """TEXT -> EMBEDDING (embedding), TEXT -> PROBABILITIES (classifier, in the labels' order), QUERY and
    CANDIDATES -> SCORES (cross-encoder)."""
    text = Tensor("TEXT", "BYTES", (1,))
    if manifest.task == "embedding":
        return Signature((text,), (Tensor("EMBEDDING", "FP32", (manifest.output_dim,)),), batched=True)
    if manifest.task == "classifier":
        return Signature((text,), (Tensor("PROBABILITIES", "FP32", (len(manifest.labels),)),), batched=True)
    pair = (Tensor("QUERY", "BYTES", (1,)), Tensor("CANDIDATES", "BYTES", (-1,)))
    return Signature(pair, (Tensor("SCORES", "FP32", (-1,)),), batched=False)


@dataclass(frozen=True)
class Options:
    """What a ModelInfer's request parameters ask for."""

    normalize: bool | None = None
    strict: bool = False
    datatype: str = "FP32"


def options(parameters: Mapping[str, kpb.InferParameter], manifest: Manifest) -> Options:
    """The request parameters, checked: each known, of its type, with a value that applies to the model."""
    for key, parameter in parameters.items():
        kind = _PARAMETERS.get(key)
        if kind is None:
            raise errors.InvalidArgument(
                f"unknown parameter {key[:100]!r}: the parameters are {', '.join(sorted(_PARAMETERS))}"
            )
        if parameter.WhichOneof("parameter_choice") != kind:
            raise errors.InvalidArgument(f"parameter {key!r} must be a {_KINDS[kind]}")
    normalize = None
    if "normalize" in parameters:
        if manifest.task != "embedding":
            raise errors.InvalidArgument(
                f"parameter 'normalize' applies to embedding models; this model is a {manifest.task}"
            )
        normalize = parameters["normalize"].bool_param
    truncation = parameters["truncation"].string_param if "truncation" in parameters else "TRUNCATE"
    if truncation not in ("TRUNCATE", "STRICT"):
        raise errors.InvalidArgument(
            f"parameter 'truncation' is {truncation[:100]!r}: use TRUNCATE or STRICT"
        )
    datatype = parameters["datatype"].string_param if "datatype" in parameters else "FP32"
    if datatype not in _FLOAT_TYPES:
        raise errors.InvalidArgument(f"parameter 'datatype' is {datatype[:100]!r}: use FP32 or FP16")
    return Options(normalize, truncation == "STRICT", datatype)


def split_bytes(name: str, buffer: bytes, count: int) -> list[bytes]:
    """The `count` elements of a BYTES tensor's raw contents, each a 4-byte little-endian length and then
    that many bytes; InvalidArgument when the buffer holds anything but exactly that."""
    view = memoryview(buffer)
    size, offset = len(view), 0
    elements = []
    for index in range(count):
        if size - offset < 4:
            raise errors.InvalidArgument(
                f"raw_input_contents of {name} end after {index} of the {count} elements its shape declares"
            )
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if length > size - offset:
            raise errors.InvalidArgument(
                f"raw_input_contents of {name}: element {index} declares {length} bytes, "
                f"and {size - offset} remain"
            )
        elements.append(view[offset : offset + length].tobytes())
        offset += length
    if offset != size:
        raise errors.InvalidArgument(
            f"raw_input_contents of {name}: {size - offset} bytes are left after the {count} elements its "
            "shape declares"
        )
    return elements


def _count(tensor: kpb.ModelInferRequest.InferInputTensor, spec: Tensor, sig: Signature) -> int:
    """How many elements the tensor's shape declares: [n], or [n, 1] as Triton's batching clients send."""
    shape = list(tensor.shape)
    fixed = None if sig.batched or spec.dims[0] == -1 else spec.dims[0]
    if (
        len(shape) not in (1, 2)
        or shape[0] < 0
        or (len(shape) == 2 and shape[1] != 1)
        or (fixed is not None and shape[0] != fixed)
    ):
        forms = "" if fixed is not None else ": [n, 1] or [n] for n texts"
        raise errors.InvalidArgument(
            f"input {spec.name} has shape {shape}; it takes {sig.shape(spec)}{forms}"
        )
    return shape[0]


def _strings(
    tensor: kpb.ModelInferRequest.InferInputTensor, spec: Tensor, sig: Signature, raw: bytes | None
) -> list[str]:
    """One input's texts, from raw_input_contents or from contents.bytes_contents."""
    name = spec.name
    if tensor.datatype != spec.datatype:
        raise errors.InvalidArgument(
            f"input {name} is {tensor.datatype[:20] or 'without a datatype'}; it takes {spec.datatype}"
        )
    if tensor.parameters:
        key = next(iter(tensor.parameters))
        raise errors.InvalidArgument(
            f"input {name}: parameter {key[:100]!r} is not supported (no shared memory: send the data itself)"
        )
    count = _count(tensor, spec, sig)
    if raw is not None:
        if tensor.HasField("contents"):
            raise errors.InvalidArgument(f"input {name} has both contents and raw_input_contents: send one")
        elements = split_bytes(name, raw, count)
    else:
        for field, _ in tensor.contents.ListFields():
            if field.name != "bytes_contents":
                raise errors.InvalidArgument(f"input {name} is BYTES: send its elements in bytes_contents")
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise errors.InvalidArgument(
                f"input {name} has shape {list(tensor.shape)} but {len(elements)} elements in bytes_contents"
            )
    texts = []
    for index, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise errors.InvalidArgument(
                f"{name}[{index}] is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    return texts


def inputs(request: kpb.ModelInferRequest, sig: Signature) -> dict[str, list[str]]:
    """Each input's texts by name: every input the model takes, once, and nothing else."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise errors.InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: one per input, "
            "in the order of inputs (or none)"
        )
    specs = {spec.name: spec for spec in sig.inputs}
    texts: dict[str, list[str]] = {}
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise errors.InvalidArgument(
                f"no input named {tensor.name[:100]!r}; the model takes {sig.describe(sig.inputs)}"
            )
        if spec.name in texts:
            raise errors.InvalidArgument(f"input {spec.name} is given twice")
        texts[spec.name] = _strings(tensor, spec, sig, raw[index] if raw else None)
    for spec in sig.inputs:
        if spec.name not in texts:
            raise errors.InvalidArgument(
                f"input {spec.name} is missing; the model takes {sig.describe(sig.inputs)}"
            )
    return texts


def outputs(request: kpb.ModelInferRequest, sig: Signature) -> list[Tensor]:
    """The outputs asked for (all of them when none is named)."""
    if not request.outputs:
        return list(sig.outputs)
    specs = {spec.name: spec for spec in sig.outputs}
    chosen: list[Tensor] = []
    for wanted in request.outputs:
        spec = specs.get(wanted.name)
        if spec is None:
            raise errors.InvalidArgument(
                f"no output named {wanted.name[:100]!r}; the model gives {sig.describe(sig.outputs)}"
            )
        if wanted.parameters:
            key = next(iter(wanted.parameters))
            raise errors.InvalidArgument(
                f"output {spec.name}: parameter {key[:100]!r} is not supported; outputs take none (the "
                "request parameter 'datatype' chooses FP16)"
            )
        if spec in chosen:
            raise errors.InvalidArgument(f"output {spec.name} is asked for twice")
        chosen.append(spec)
    return chosen


@dataclass(frozen=True)
class Described:
    """What the metadata RPCs answer for one model, built once."""

    signature: Signature
    metadata: kpb.ModelMetadataResponse
    config: kpb.ModelConfigResponse


def describe(served: ServedModel, settings: ServerSettings) -> Described:
    manifest = served.model.manifest
    sig = signature(manifest)
    metadata = kpb.ModelMetadataResponse(name=served.name, versions=[VERSION], platform=PLATFORM)
    config = kpb.ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend=PLATFORM,
        # NOTE: a call's limit, not the batcher's: in Triton's terms it bounds one request's batch
        # dimension. The batches the server forms across calls are `texts_per_batch` (parameters).
        max_batch_size=settings.max_texts_per_call if sig.batched else 0,
        dynamic_batching=kpb.ModelDynamicBatching(
            max_queue_delay_microseconds=round(settings.max_delay_ms * 1000)
        ),
    )
    for tensor in sig.inputs:
        metadata.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=sig.shape(tensor))
        config.input.add(name=tensor.name, data_type=_CONFIG_TYPES[tensor.datatype], dims=tensor.dims)
    for tensor in sig.outputs:
        metadata.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=sig.shape(tensor))
        config.output.add(name=tensor.name, data_type=_CONFIG_TYPES[tensor.datatype], dims=tensor.dims)
    parameters = {
        "task": manifest.task,
        "max_tokens": str(manifest.max_length),
        "max_texts_per_call": str(settings.max_texts_per_call),
        "texts_per_batch": str(settings.max_batch_size),
    }
    if manifest.task == "embedding":
        parameters["normalize"] = json.dumps(manifest.normalize)
    if manifest.task == "classifier":
        parameters["labels"] = json.dumps(manifest.labels)
        parameters["multi_label"] = json.dumps(manifest.multi_label)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return Described(sig, metadata, kpb.ModelConfigResponse(config=config))


def _check_version(served: ServedModel, version: str) -> None:
    if version not in ("", VERSION):
        raise errors.NotFound(
            f"model {served.name!r} has no version {version[:100]!r}; its only version is {VERSION}"
        )


def _sum(
    metric: MetricWrapperBase, sample: str, model: str, keep: Callable[[dict[str, str]], bool] | None = None
) -> float:
    """The sum of one model's `sample` values of a metric family (those whose labels `keep` accepts)."""
    return float(
        sum(
            s.value
            for family in metric.collect()
            for s in family.samples
            if s.name == sample and s.labels.get(MODEL) == model and (keep is None or keep(s.labels))
        )
    )


def _duration(target: kpb.StatisticDuration, count: float, seconds: float) -> None:
    target.count = int(count)
    target.ns = max(0, round(seconds * 1e9))


class KServeService:
    """inference.GRPCInferenceService over the served models, registered by `add_to_server`."""

    def __init__(self, transport: InferenceService, settings: ServerSettings) -> None:
        self.models = transport.models
        self.metrics = transport.metrics
        # NOTE: recserve.v1's, not a copy: one place maps errors to statuses and counts every call.
        self._handle = transport._handle
        self._described = {served.name: describe(served, settings) for served in self.models}

    async def _answer(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[object, object],
        model: str,
        reply: Callable[[ServedModel], Reply],
    ) -> Reply:
        """A call that runs no model: `reply` of the model it names (the default one when it names none)."""

        async def call(served: ServedModel, deadline: float | None) -> tuple[Reply, Timings, int]:
            return reply(served), Timings(), 0

        return await self._handle(rpc, context, model, call)

    # --- health and metadata --------------------------------------------------------------------------
    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ServerLiveResponse:
        return await self._answer("ServerLive", context, "", lambda _: kpb.ServerLiveResponse(live=True))

    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ServerReadyResponse:
        def ready(_: ServedModel) -> kpb.ServerReadyResponse:
            # What grpc.health.v1 says of the whole server: every model warm, and none draining.
            return kpb.ServerReadyResponse(ready=all(served.engine.accepting for served in self.models))

        return await self._answer("ServerReady", context, "", ready)

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ModelReadyResponse:
        def ready(served: ServedModel) -> kpb.ModelReadyResponse:
            _check_version(served, request.version)
            return kpb.ModelReadyResponse(ready=served.engine.accepting)

        return await self._answer("ModelReady", context, request.name, ready)

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ServerMetadataResponse:
        about = kpb.ServerMetadataResponse(name=PLATFORM, version=__version__, extensions=EXTENSIONS)
        return await self._answer("ServerMetadata", context, "", lambda _: about)

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ModelMetadataResponse:
        def metadata(served: ServedModel) -> kpb.ModelMetadataResponse:
            _check_version(served, request.version)
            return self._described[served.name].metadata

        return await self._answer("ModelMetadata", context, request.name, metadata)

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ModelConfigResponse:
        def config(served: ServedModel) -> kpb.ModelConfigResponse:
            _check_version(served, request.version)
            return self._described[served.name].config

        return await self._answer("ModelConfig", context, request.name, config)

    async def RepositoryIndex(
        self, request: kpb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.RepositoryIndexResponse:
        def index(_: ServedModel) -> kpb.RepositoryIndexResponse:
            if request.repository_name:
                raise errors.NotFound(
                    f"no repository named {request.repository_name[:100]!r}: this server's models are in "
                    "one unnamed repository"
                )
            reply = kpb.RepositoryIndexResponse()
            for served in self.models:
                accepting = served.engine.accepting
                if accepting or not request.ready:
                    reply.models.add(
                        name=served.name,
                        version=VERSION,
                        state="READY" if accepting else "UNAVAILABLE",
                        reason="" if accepting else served.engine.refusal,
                    )
            return reply

        return await self._answer("RepositoryIndex", context, "", index)

    async def ModelStatistics(
        self, request: kpb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ModelStatisticsResponse:
        def statistics(served: ServedModel) -> kpb.ModelStatisticsResponse:
            _check_version(served, request.version)
            chosen = [served] if request.name else list(self.models)
            return kpb.ModelStatisticsResponse(model_stats=[self._statistics(s.name) for s in chosen])

        return await self._answer("ModelStatistics", context, request.name, statistics)

    def _statistics(self, model: str) -> kpb.ModelStatistics:
        """One model's cumulative figures, read from the Prometheus families (nothing is counted twice).

        success/fail: the calls of both front doors that run the model, and their whole durations; queue:
        each call's wait for its first batch; compute_input: tokenisation, per call; compute_infer: the
        model, per batch (execution_count batches). compute_output and last_inference are not measured.
        """
        m = self.metrics

        def inference(labels: dict[str, str]) -> bool:
            return labels["rpc"] not in _METADATA_RPCS

        def ok(labels: dict[str, str]) -> bool:
            return inference(labels) and labels["code"] == "OK"

        def failed(labels: dict[str, str]) -> bool:
            return inference(labels) and labels["code"] != "OK"

        def histogram(metric: MetricWrapperBase, name: str) -> tuple[float, float]:
            return _sum(metric, f"{name}_count", model), _sum(metric, f"{name}_sum", model)

        seconds = _sum(m.request_seconds, f"{Name.REQUEST_SECONDS}_sum", model, inference)
        failed_seconds = _sum(m.failed_seconds, total(Name.FAILED_SECONDS), model, inference)
        stats = kpb.ModelStatistics(
            name=model,
            version=VERSION,
            inference_count=int(_sum(m.texts, total(Name.TEXTS), model)),
            execution_count=int(_sum(m.batch_size, f"{Name.BATCH_SIZE}_count", model)),
        )
        figures = stats.inference_stats
        _duration(
            figures.success, _sum(m.requests, total(Name.REQUESTS), model, ok), seconds - failed_seconds
        )
        _duration(figures.fail, _sum(m.requests, total(Name.REQUESTS), model, failed), failed_seconds)
        _duration(figures.queue, *histogram(m.queue_wait_seconds, Name.QUEUE_WAIT_SECONDS))
        _duration(figures.compute_input, *histogram(m.tokenize_seconds, Name.TOKENIZE_SECONDS))
        _duration(figures.compute_infer, *histogram(m.inference_seconds, Name.INFERENCE_SECONDS))
        return stats

    # --- inference ------------------------------------------------------------------------------------
    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kpb.ModelInferResponse:
        async def call(
            served: ServedModel, deadline: float | None
        ) -> tuple[kpb.ModelInferResponse, Timings, int]:
            _check_version(served, request.model_version)
            manifest = served.model.manifest
            sig = self._described[served.name].signature
            wanted = options(request.parameters, manifest)
            chosen = outputs(request, sig)
            texts = inputs(request, sig)
            engine = served.engine
            values: FloatArray
            if manifest.task == "cross-encoder":
                (query,) = texts["QUERY"]
                scored = await engine.score(query, texts["CANDIDATES"], "cosine", wanted.strict, deadline)
                values, timings, count = scored.scores, scored.timings, scored.model_texts
            elif manifest.task == "classifier":
                labels = len(manifest.labels)
                classified = await engine.classify(texts["TEXT"], labels, wanted.strict, deadline)
                # Classify gives every label best first; the tensor has them in the labels' order.
                values = np.empty_like(classified.probabilities)
                np.put_along_axis(values, classified.indices, classified.probabilities, axis=1)
                timings, count = classified.timings, len(texts["TEXT"])
            else:
                embedded = await engine.embed(texts["TEXT"], wanted.normalize, wanted.strict, deadline)
                values, timings, count = embedded.vectors, embedded.timings, len(texts["TEXT"])
            response = kpb.ModelInferResponse(model_name=served.name, model_version=VERSION, id=request.id)
            dtype = _FLOAT_TYPES[wanted.datatype]
            for spec in chosen:
                response.outputs.add(name=spec.name, datatype=wanted.datatype, shape=values.shape)
                response.raw_output_contents.append(np.ascontiguousarray(values, dtype=dtype).tobytes())
            return response, timings, count

        return await self._handle("ModelInfer", context, request.model_name, call)
