"""The KServe v2 / Open Inference Protocol end to end: Triton's own client (tritonclient.grpc, unchanged)
against a real server on a loopback port. Fake models for statuses, readiness, batching and statistics
(tests/support/fake_model.py); a tiny exported model for the numbers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from recserve import __version__
from recserve.kserve import grpc_service_pb2 as kpb
from recserve.server.engine import probabilities_of
from recserve.server.metrics import Name, total
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_model import FAKE_LABELS, FakeModel, fake_model
from tests.support.serving import (
    TEXTS,
    MiB,
    ServerThread,
    embed,
    held_in_warm_up,
    serving,
    settings_for,
)
from tests.test_service import recorded, wait_until

FAKE = Path("fake")
SERVICE = "inference.GRPCInferenceService"
SETTINGS = {"metrics_port": None, "warmup": False, "max_texts_per_call": 64, "max_message_bytes": MiB}


@pytest.fixture(scope="module")
def models() -> dict[str, FakeModel]:
    """An embedder (the default), a reranker and a classifier: one of each signature."""
    return {
        "users": fake_model("embedding", dim=8),
        "rerank": fake_model("cross-encoder"),
        "interest": fake_model("classifier"),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, FakeModel]) -> Iterator[ServerThread]:
    thread = ServerThread(settings_for(FAKE, **SETTINGS), list(models.items())).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(server.address)
    yield triton
    triton.close()


def texts_input(texts: list[str], name: str = "TEXT", column: bool = True) -> grpcclient.InferInput:
    """A BYTES input as Triton's batching clients build it: shape [n, 1] (or [n] with column=False)."""
    array = np.array([text.encode() for text in texts], dtype=np.object_)
    if column:
        array = array.reshape(-1, 1)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def refused(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[str, str]:
    """The gRPC status name and message of a call tritonclient raised for."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return str(info.value.status()).removeprefix("StatusCode."), str(info.value.message())


def sample(server: ServerThread, name: str, /, **labels: str) -> float:
    """One series' value, read in-process (0 when the series does not exist yet)."""
    return server.registry.get_sample_value(name, labels) or 0.0


# --- the contract -------------------------------------------------------------------------------------------
def _messages(file: Any) -> Iterator[Any]:
    pending = list(file.message_types_by_name.values())
    while pending:
        message = pending.pop()
        pending.extend(message.nested_types)
        if not message.GetOptions().map_entry:
            yield message


def test_the_proto_is_a_wire_compatible_subset_of_tritons() -> None:
    """Every message, field, enum value and RPC of protos/recserve/kserve has Triton's name, number and
    type (tritonclient's own descriptors are the reference), so each side parses the other's bytes."""
    triton = descriptor_pool.Default()  # tritonclient's modules registered their files here
    for ours in _messages(kpb.DESCRIPTOR):
        theirs = triton.FindMessageTypeByName(ours.full_name)
        for field in ours.fields:
            match = theirs.fields_by_name[field.name]
            assert (field.number, field.type, field.is_repeated) == (
                match.number,
                match.type,
                match.is_repeated,
            ), field.full_name
            if field.message_type is not None:
                assert field.message_type.full_name == match.message_type.full_name, field.full_name
                if field.message_type.GetOptions().map_entry:
                    key, value = field.message_type.fields_by_name, match.message_type.fields_by_name
                    assert key["value"].type == value["value"].type, field.full_name
    for value in kpb.DESCRIPTOR.enum_types_by_name["DataType"].values:
        assert triton_config.DataType.Value(value.name) == value.number
    service = triton.FindServiceByName(SERVICE)
    for method in kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        match = service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            match.input_type.full_name,
            match.output_type.full_name,
        )
        assert not method.client_streaming and not method.server_streaming
    # tritonclient's modules and recserve's coexist: they sit in different pools.
    assert kpb.ModelInferRequest.DESCRIPTOR.file.pool is not triton


@pytest.mark.parametrize("first", ["recserve.kserve", "tritonclient.grpc"])
def test_the_server_and_tritonclient_import_in_either_order(first: str) -> None:
    """In a fresh interpreter, where the first import decides what protobuf's defaults bind to."""
    code = (
        f"import {first}; import recserve.server.app, tritonclient.grpc; "
        "from google.protobuf import descriptor_pool, symbol_database; "
        "assert symbol_database.Default().pool is descriptor_pool.Default()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- health and metadata ------------------------------------------------------------------------------------
def test_live_ready_and_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for name in ("users", "rerank", "interest"):
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    about = client.get_server_metadata()
    assert (about.name, about.version) == ("recserve", __version__)
    assert list(about.extensions) == ["model_configuration", "statistics", "parameters"]


def _tensors(tensors: Any) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, list(t.shape)) for t in tensors]


def test_model_metadata_gives_each_signature(client: grpcclient.InferenceServerClient) -> None:
    users = client.get_model_metadata("users")
    assert (users.name, list(users.versions), users.platform) == ("users", ["1"], "recserve")
    assert _tensors(users.inputs) == [("TEXT", "BYTES", [-1, 1])]
    assert _tensors(users.outputs) == [("EMBEDDING", "FP32", [-1, 8])]
    rerank = client.get_model_metadata("rerank", "1")
    assert _tensors(rerank.inputs) == [("QUERY", "BYTES", [1]), ("CANDIDATES", "BYTES", [-1])]
    assert _tensors(rerank.outputs) == [("SCORES", "FP32", [-1])]
    interest = client.get_model_metadata("interest")
    assert _tensors(interest.outputs) == [("PROBABILITIES", "FP32", [-1, len(FAKE_LABELS)])]


def test_model_config_says_how_the_server_batches(
    client: grpcclient.InferenceServerClient, server: ServerThread
) -> None:
    settings = server.settings
    config = client.get_model_config("users").config
    assert (config.name, config.platform, config.backend) == ("users", "recserve", "recserve")
    # One call's limit: a request's batch dimension may hold that many texts.
    assert config.max_batch_size == settings.max_texts_per_call == 64
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == round(settings.max_delay_ms * 1000)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("TEXT", triton_config.TYPE_STRING, [1])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("EMBEDDING", triton_config.TYPE_FP32, [8])
    ]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        "task": "embedding",
        "max_tokens": "32",
        "max_texts_per_call": "64",
        "texts_per_batch": str(settings.max_batch_size),
        "normalize": "true",
    }
    # One query and n candidates share no batch dimension.
    rerank = client.get_model_config("rerank").config
    assert rerank.max_batch_size == 0 and [list(i.dims) for i in rerank.input] == [[1], [-1]]
    interest = client.get_model_config("interest").config
    assert json.loads(interest.parameters["labels"].string_value) == list(FAKE_LABELS)
    assert interest.parameters["multi_label"].string_value == "false"


def test_the_repository_index_lists_every_model(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("users", "1", "READY", ""),
        ("rerank", "1", "READY", ""),
        ("interest", "1", "READY", ""),
    ]


def test_health_answers_for_the_kserve_service(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel())
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_rest_of_tritons_service_is_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    for call, args in (
        (client.get_system_shared_memory_status, ()),
        (client.get_cuda_shared_memory_status, ()),
        (client.load_model, ("users",)),
        (client.unload_model, ("users",)),
        (client.get_trace_settings, ()),
        (client.get_log_settings, ()),
    ):
        code, _ = refused(call, *args)
        assert code == "UNIMPLEMENTED", call
    assert client.is_server_ready()


# --- inference ----------------------------------------------------------------------------------------------
def test_infer_embeds_as_embed_does(
    client: grpcclient.InferenceServerClient, server: ServerThread, models: dict[str, FakeModel]
) -> None:
    stub = server.stub()
    expected = embed(stub, TEXTS, model="users")
    np.testing.assert_array_equal(expected, models["users"].expected(TEXTS))
    for column in (True, False):  # [n, 1] as Triton's batching clients send it, or [n]
        result = client.infer("users", [texts_input(TEXTS, column=column)], request_id="req-7")
        np.testing.assert_array_equal(result.as_numpy("EMBEDDING"), expected)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == ("users", "1", "req-7")
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            ("EMBEDDING", "FP32", [len(TEXTS), 8])
        ]
    named = client.infer(
        "users", [texts_input(TEXTS)], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")]
    )
    np.testing.assert_array_equal(named.as_numpy("EMBEDDING"), expected)

    raw = client.infer("users", [texts_input(TEXTS)], parameters={"normalize": False})
    np.testing.assert_array_equal(
        raw.as_numpy("EMBEDDING"), embed(stub, TEXTS, model="users", normalize=False)
    )
    half = client.infer("users", [texts_input(TEXTS)], parameters={"datatype": "FP16"})
    assert half.get_output("EMBEDDING").datatype == "FP16"
    assert half.as_numpy("EMBEDDING").dtype == np.float16
    np.testing.assert_allclose(half.as_numpy("EMBEDDING").astype(np.float32), expected, rtol=0, atol=2e-3)


def test_infer_takes_typed_bytes_contents_too(server: ServerThread, models: dict[str, FakeModel]) -> None:
    stub = tpb_grpc.GRPCInferenceServiceStub(server.channel())
    request = tpb.ModelInferRequest(model_name="users")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(TEXTS)])
    tensor.contents.bytes_contents.extend(text.encode() for text in TEXTS)
    reply = stub.ModelInfer(request, timeout=10)
    vectors = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(len(TEXTS), 8)
    np.testing.assert_array_equal(vectors, models["users"].expected(TEXTS))


def test_infer_on_a_cross_encoder_scores_as_score_does(
    client: grpcclient.InferenceServerClient, server: ServerThread
) -> None:
    query, candidates = "red running shoes", ["nike pegasus road shoe", "cast iron pan", ""]
    result = client.infer(
        "rerank", [texts_input([query], "QUERY", column=False), texts_input(candidates, "CANDIDATES", False)]
    )
    scores = server.stub().Score(pb.ScoreRequest(model="rerank", query_text=query, candidates=candidates))
    np.testing.assert_array_equal(result.as_numpy("SCORES"), np.asarray(scores.scores, np.float32))
    assert list(result.get_output("SCORES").shape) == [len(candidates)]


def test_infer_on_a_classifier_gives_every_labels_probability_in_order(
    client: grpcclient.InferenceServerClient, models: dict[str, FakeModel]
) -> None:
    texts = ["a book about machine learning", "jazz records", ""]
    result = client.infer("interest", [texts_input(texts)])
    model = models["interest"]
    logits = np.stack([model.backend.row(item) for item in model.tokenizer.encode(texts)])
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), probabilities_of(logits, False), rtol=1e-6)


def test_the_asyncio_client_works_the_same(server: ServerThread, models: dict[str, FakeModel]) -> None:
    async def main() -> tuple[bool, np.ndarray, int]:
        triton = aioclient.InferenceServerClient(server.address)
        try:
            ready = await triton.is_model_ready("users")
            tensor = aioclient.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_))
            results = await asyncio.gather(*(triton.infer("users", [tensor]) for _ in range(4)))
            stats = await triton.get_inference_statistics("users")
            return (
                ready,
                np.stack([r.as_numpy("EMBEDDING") for r in results]),
                stats.model_stats[0].inference_count,
            )
        finally:
            await triton.close()

    ready, vectors, inferences = asyncio.run(main())
    assert ready and inferences >= 4 * len(TEXTS)
    for got in vectors:
        np.testing.assert_array_equal(got, models["users"].expected(TEXTS))


def test_a_real_model_gives_embeds_numbers(tiny_repo: Path) -> None:
    with serving(tiny_repo, metrics_port=None) as server:
        stub = server.stub()
        expected = embed(stub, TEXTS)
        triton = grpcclient.InferenceServerClient(server.address)
        try:
            name = triton.get_model_repository_index().models[0].name
            dimension = triton.get_model_metadata(name).outputs[0].shape[1]
            got = triton.infer(name, [texts_input(TEXTS)]).as_numpy("EMBEDDING")
        finally:
            triton.close()
    assert dimension == expected.shape[1]
    # The same engine and batcher; only how the texts happened to be batched may differ. (No nearest-vector
    # check: TEXTS holds an empty and a blank text, whose vectors are equal.)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_statistics_count_both_front_doors_from_the_metrics(
    client: grpcclient.InferenceServerClient, server: ServerThread
) -> None:
    def stats() -> Any:
        return client.get_inference_statistics("users", "1").model_stats[0]

    before = stats()
    client.infer("users", [texts_input(["one", "two", "three"])])
    embed(server.stub(), ["four", "five"], model="users")
    refused(client.infer, "users", [texts_input([], "TEXT")])  # empty: refused before any work
    client.get_model_metadata("users")  # describes, runs nothing: not an inference
    after = stats()
    assert (after.name, after.version) == ("users", "1")

    def delta(field: str) -> int:
        got = after
        was = before
        for part in field.split("."):
            got, was = getattr(got, part), getattr(was, part)
        return int(got) - int(was)

    assert delta("inference_count") == 5
    assert delta("inference_stats.success.count") == 2
    assert delta("inference_stats.fail.count") == 1
    assert delta("inference_stats.success.ns") > 0 and delta("inference_stats.fail.ns") > 0
    assert delta("inference_stats.queue.count") == 2
    assert delta("inference_stats.compute_input.count") == 2
    assert delta("execution_count") == delta("inference_stats.compute_infer.count") >= 1
    # The very numbers Prometheus has.
    assert after.inference_count == recorded(server, total(Name.TEXTS), model="users")
    assert after.execution_count == sample(server, f"{Name.BATCH_SIZE}_count", model="users")
    every = client.get_inference_statistics().model_stats
    assert [s.name for s in every] == ["users", "rerank", "interest"]
    assert sample(server, total(Name.REQUESTS), model="users", rpc="ModelInfer", code="OK") >= 1


# --- errors -------------------------------------------------------------------------------------------------
def _request(
    model: str = "users", texts: list[bytes] | None = None, shape: list[int] | None = None, **fields: Any
) -> tpb.ModelInferRequest:
    """A ModelInferRequest with one raw BYTES input TEXT (unless `inputs=` says otherwise)."""
    request = tpb.ModelInferRequest(model_name=model, **fields)
    if "inputs" not in fields:
        elements = [b"a red shoe"] if texts is None else texts
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(elements)] if shape is None else shape)
        request.raw_input_contents.append(b"".join(len(e).to_bytes(4, "little") + e for e in elements))
    return request


def _typed(name: str, elements: list[bytes], shape: list[int], datatype: str = "BYTES") -> Any:
    tensor = tpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    tensor.contents.bytes_contents.extend(elements)
    return tensor


def _raw(request: tpb.ModelInferRequest, *buffers: bytes) -> tpb.ModelInferRequest:
    del request.raw_input_contents[:]
    request.raw_input_contents.extend(buffers)
    return request


def _with(
    request: tpb.ModelInferRequest, change: Callable[[tpb.ModelInferRequest], object]
) -> tpb.ModelInferRequest:
    change(request)
    return request


def _parameter(key: str, **value: Any) -> Callable[[tpb.ModelInferRequest], object]:
    return lambda request: request.parameters[key].MergeFrom(tpb.InferParameter(**value))


PAIR = [_typed("QUERY", [b"shoes"], [1]), _typed("CANDIDATES", [b"a", b"b"], [2])]

# (request, status, what the message says)
BAD_INFERS: dict[str, tuple[tpb.ModelInferRequest, str, str]] = {
    "unknown model": (_request("nope"), "NOT_FOUND", "no model named 'nope'"),
    "unknown version": (
        _request(model_version="2"),
        "NOT_FOUND",
        "has no version '2'; its only version is 1",
    ),
    "wrong input name": (
        _request(inputs=[_typed("TXT", [b"x"], [1])]),
        "INVALID_ARGUMENT",
        "no input named 'TXT'; the model takes TEXT (BYTES [-1, 1])",
    ),
    "wrong datatype": (
        _request(inputs=[_typed("TEXT", [b"x"], [1], "FP32")]),
        "INVALID_ARGUMENT",
        "input TEXT is FP32; it takes BYTES",
    ),
    "wrong shape": (
        _request(texts=[b"a", b"b", b"c", b"d"], shape=[2, 2]),
        "INVALID_ARGUMENT",
        "input TEXT has shape [2, 2]; it takes [-1, 1]: [n, 1] or [n]",
    ),
    "missing input": (_request(inputs=[]), "INVALID_ARGUMENT", "input TEXT is missing"),
    "an input twice": (
        _request(inputs=[_typed("TEXT", [b"x"], [1]), _typed("TEXT", [b"y"], [1])]),
        "INVALID_ARGUMENT",
        "input TEXT is given twice",
    ),
    "fewer raw elements than the shape": (
        _request(texts=[b"a", b"b"], shape=[3]),
        "INVALID_ARGUMENT",
        "raw_input_contents of TEXT end after 2 of the 3 elements its shape declares",
    ),
    "a length running past the end": (
        _raw(_request(), b"\x10\x00\x00\x00abc"),
        "INVALID_ARGUMENT",
        "element 0 declares 16 bytes, and 3 remain",
    ),
    "a cut length prefix": (
        _raw(_request(), b"\x01\x00"),
        "INVALID_ARGUMENT",
        "raw_input_contents of TEXT end after 0 of the 1 elements",
    ),
    "trailing bytes": (
        _raw(_request(), b"\x01\x00\x00\x00azz"),
        "INVALID_ARGUMENT",
        "2 bytes are left after the 1 elements its shape declares",
    ),
    "raw bytes that are not UTF-8": (
        _request(texts=[b"ok", b"\xff\xfe"]),
        "INVALID_ARGUMENT",
        "TEXT[1] is not UTF-8 text (invalid start byte at byte 0)",
    ),
    "typed bytes that are not UTF-8": (
        _request(inputs=[_typed("TEXT", [b"caf\xc3"], [1])]),
        "INVALID_ARGUMENT",
        "TEXT[0] is not UTF-8 text",
    ),
    "typed elements that miss the shape": (
        _request(inputs=[_typed("TEXT", [b"x"], [2])]),
        "INVALID_ARGUMENT",
        "input TEXT has shape [2] but 1 elements in bytes_contents",
    ),
    "typed elements in the wrong field": (
        _request(
            inputs=[
                tpb.ModelInferRequest.InferInputTensor(
                    name="TEXT",
                    datatype="BYTES",
                    shape=[1],
                    contents=tpb.InferTensorContents(fp32_contents=[1.0]),
                )
            ]
        ),
        "INVALID_ARGUMENT",
        "input TEXT is BYTES: send its elements in bytes_contents",
    ),
    "both raw and typed": (
        _raw(_request(inputs=[_typed("TEXT", [b"x"], [1])]), b"\x01\x00\x00\x00x"),
        "INVALID_ARGUMENT",
        "input TEXT has both contents and raw_input_contents",
    ),
    "more raw entries than inputs": (
        _raw(_request(), b"\x01\x00\x00\x00x", b"\x01\x00\x00\x00y"),
        "INVALID_ARGUMENT",
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    "an unknown output": (
        _request(outputs=[tpb.ModelInferRequest.InferRequestedOutputTensor(name="VECTORS")]),
        "INVALID_ARGUMENT",
        "no output named 'VECTORS'; the model gives EMBEDDING (FP32 [-1, 8])",
    ),
    "an output parameter": (
        _with(
            _request(),
            lambda r: (
                r.outputs.add(name="EMBEDDING")
                .parameters["classification"]
                .MergeFrom(
                    tpb.InferParameter(
                        int64_param=2
                    )  # what InferRequestedOutput("EMBEDDING", class_count=2) sends
                )
            ),
        ),
        "INVALID_ARGUMENT",
        "output EMBEDDING: parameter 'classification' is not supported",
    ),
    "an input parameter": (
        _with(
            _request(),
            lambda r: r.inputs[0].parameters["shared_memory_region"].MergeFrom(tpb.InferParameter()),
        ),
        "INVALID_ARGUMENT",
        "input TEXT: parameter 'shared_memory_region' is not supported",
    ),
    "an unknown parameter": (
        _with(_request(), _parameter("normalise", bool_param=False)),
        "INVALID_ARGUMENT",
        "unknown parameter 'normalise': the parameters are datatype, normalize, truncation",
    ),
    "a parameter of the wrong type": (
        _with(_request(), _parameter("normalize", string_param="no")),
        "INVALID_ARGUMENT",
        "parameter 'normalize' must be a bool",
    ),
    "an unknown datatype": (
        _with(_request(), _parameter("datatype", string_param="INT8")),
        "INVALID_ARGUMENT",
        "parameter 'datatype' is 'INT8': use FP32 or FP16",
    ),
    "an unknown truncation": (
        _with(_request(), _parameter("truncation", string_param="CUT")),
        "INVALID_ARGUMENT",
        "parameter 'truncation' is 'CUT': use TRUNCATE or STRICT",
    ),
    "an over-long text in strict mode": (
        _with(_request(texts=[b"word " * 100]), _parameter("truncation", string_param="STRICT")),
        "INVALID_ARGUMENT",
        "texts[0] is longer than the model's 32 tokens",
    ),
    "no texts": (_request(texts=[]), "INVALID_ARGUMENT", "texts is empty"),
    "too many texts": (
        _request(texts=[b"x"] * 65),
        "INVALID_ARGUMENT",
        "texts holds 65 texts; the limit is 64",
    ),
    "normalize on a cross-encoder": (
        _with(_request("rerank", inputs=PAIR), _parameter("normalize", bool_param=True)),
        "INVALID_ARGUMENT",
        "parameter 'normalize' applies to embedding models; this model is a cross-encoder",
    ),
    "two queries": (
        _request("rerank", inputs=[_typed("QUERY", [b"a", b"b"], [2]), PAIR[1]]),
        "INVALID_ARGUMENT",
        "input QUERY has shape [2]; it takes [1]",
    ),
    "no candidates input": (
        _request("rerank", inputs=PAIR[:1]),
        "INVALID_ARGUMENT",
        "input CANDIDATES is missing; the model takes QUERY (BYTES [1]), CANDIDATES (BYTES [-1])",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INFERS))
def test_a_bad_infer_gets_its_status_and_the_server_keeps_serving(
    server: ServerThread, client: grpcclient.InferenceServerClient, case: str
) -> None:
    request, code, message = BAD_INFERS[case]
    stub = tpb_grpc.GRPCInferenceServiceStub(server.channel())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code().name == code
    assert message in info.value.details(), info.value.details()
    assert client.infer("users", [texts_input(["still serving"])]).as_numpy("EMBEDDING").shape == (1, 8)


def test_metadata_of_an_unknown_model_or_version_is_not_found(
    client: grpcclient.InferenceServerClient,
) -> None:
    for call in (client.get_model_metadata, client.get_model_config, client.is_model_ready):
        code, message = refused(call, "nope")
        assert code == "NOT_FOUND" and "the models are: users, rerank, interest" in message
        code, message = refused(call, "users", "7")
        assert code == "NOT_FOUND" and "has no version '7'" in message
    code, _ = refused(client.get_inference_statistics, "nope")
    assert code == "NOT_FOUND"


# (rpc, bytes, what the details must say): protobuf's own reason, as recserve.v1 reports it.
MALFORMED = [
    ("ModelInfer", b"\xff\xff\xff", "inference.ModelInferRequest: Wire format was corrupt"),
    (
        "ModelInfer",
        b"\x0a\x02\xff\xfe",
        "inference.ModelInferRequest: String field had bad UTF-8",
    ),  # model_name
    ("ModelMetadata", b"\xff\xff\xff", "inference.ModelMetadataRequest: Wire format was corrupt"),
    ("ServerReady", b"\xff\xff\xff", "inference.ServerReadyRequest: Wire format was corrupt"),
]


def test_malformed_protobuf_bytes_are_invalid_argument_and_counted(server: ServerThread) -> None:
    before = sample(server, total(Name.REQUESTS), model="", rpc="ModelInfer", code="INVALID_ARGUMENT")
    with grpc.insecure_channel(server.address) as channel:
        for rpc, payload, detail in MALFORMED:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(f"/{SERVICE}/{rpc}")(payload, timeout=5)  # bytes in, bytes out
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, payload)
            assert info.value.details() == f"the request is not a valid {detail}"
        reply = tpb.ServerReadyResponse.FromString(
            channel.unary_unary(f"/{SERVICE}/ServerReady")(
                tpb.ServerReadyRequest().SerializeToString(), timeout=5
            )
        )
    assert reply.ready
    after = sample(server, total(Name.REQUESTS), model="", rpc="ModelInfer", code="INVALID_ARGUMENT")
    assert after - before == 2


# --- sharing the engine ------------------------------------------------------------------------------------
@contextlib.contextmanager
def held_server(
    **overrides: Any,
) -> Iterator[tuple[FakeModel, ServerThread, grpcclient.InferenceServerClient]]:
    """A fresh model and its server; its batches wait at the gate until the test opens it (or it ends)."""
    model = fake_model()
    model.backend.gate.clear()
    with serving(FAKE, model, **{**SETTINGS, **overrides}) as server:
        triton = grpcclient.InferenceServerClient(server.address)
        try:
            yield model, server, triton
        finally:
            model.backend.gate.set()  # before the drain, which would wait on a held batch
            triton.close()


def test_model_infer_and_embed_share_one_batch() -> None:
    with held_server() as (held, server, triton), ThreadPoolExecutor(1) as pool:
        stub = server.stub()
        blocker = stub.Embed.future(pb.EmbedRequest(texts=["the blocker"]))
        assert held.backend.wait_entered(1), "the blocker never reached the model"
        v2 = pool.submit(triton.infer, "fake", [texts_input(["from kserve"])])
        v1 = stub.Embed.future(pb.EmbedRequest(texts=["from v1"], encoding=pb.VECTOR_ENCODING_PACKED_F32))
        # Both queued behind the blocker, waiting for the model's one execution slot.
        assert wait_until(lambda: sample(server, Name.QUEUE_TEXTS, model="fake") == 2)
        held.backend.gate.set()
        assert blocker.result(timeout=10).dimension == 8
        kserve_vector = v2.result(timeout=10).as_numpy("EMBEDDING")
        v1_vector = np.frombuffer(v1.result(timeout=10).packed, dtype="<f4").reshape(1, 8)
    assert held.backend.batches == [1, 2]
    np.testing.assert_array_equal(kserve_vector, held.expected(["from kserve"]))
    np.testing.assert_array_equal(v1_vector, held.expected(["from v1"]))


def test_overload_is_resource_exhausted_before_any_work() -> None:
    with held_server(max_queue_texts=4) as (held, server, triton):
        stub = server.stub()
        calls = [stub.Embed.future(pb.EmbedRequest(texts=["the blocker"]))]
        assert held.backend.wait_entered(1), "the blocker never reached the model"
        calls.append(stub.Embed.future(pb.EmbedRequest(texts=["a", "b", "c"])))
        assert held.tokenizer.wait_encoded(4), "the call that fills the queue was not tokenised"
        code, message = refused(triton.infer, "fake", [texts_input(["c1", "c2"])])
        assert code == "RESOURCE_EXHAUSTED" and "the queue is full" in message
        assert held.tokenizer.texts_encoded == 4  # refused before tokenising
        assert (
            sample(server, total(Name.REQUESTS), model="fake", rpc="ModelInfer", code="RESOURCE_EXHAUSTED")
            == 1
        )
        held.backend.gate.set()
        assert [call.result(timeout=10).dimension for call in calls] == [8, 8]


def test_not_ready_while_warming_up() -> None:
    with held_in_warm_up(settings_for(FAKE, **SETTINGS), fake_model()) as (port, finish):
        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert triton.is_server_live()
        assert not triton.is_server_ready() and not triton.is_model_ready("fake")
        (entry,) = triton.get_model_repository_index().models
        assert (entry.state, entry.reason) == ("UNAVAILABLE", "the server is warming up")
        stub = tpb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert list(stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True), timeout=5).models) == []
        code, message = refused(triton.infer, "fake", [texts_input(["x"])])
        assert (code, message) == ("UNAVAILABLE", "the server is warming up")
        finish()
        assert triton.is_server_ready() and triton.is_model_ready("fake")
        assert triton.infer("fake", [texts_input(["x"])]).as_numpy("EMBEDDING").shape == (1, 8)
        triton.close()


def test_not_ready_while_draining() -> None:
    with held_server() as (held, server, triton):
        blocker = server.stub().Embed.future(pb.EmbedRequest(texts=["in flight"]))
        assert held.backend.wait_entered(1)
        stopper = threading.Thread(target=server.stop)
        stopper.start()  # the drain waits for the call in flight, up to the grace period
        try:
            assert wait_until(lambda: not triton.is_server_ready())
            assert triton.is_server_live() and not triton.is_model_ready("fake")
            code, message = refused(triton.infer, "fake", [texts_input(["x"])])
            assert code == "UNAVAILABLE" and "shutting down" in message
        finally:
            held.backend.gate.set()
            stopper.join(30)
        assert blocker.result(timeout=10).dimension == 8


def test_a_token_guards_the_kserve_service_as_it_does_recserve_v1() -> None:
    token = "s3cret-token"
    with serving(FAKE, fake_model(), **SETTINGS, auth_token=token) as server:
        triton = grpcclient.InferenceServerClient(server.address)
        try:
            code, message = refused(triton.infer, "fake", [texts_input(["x"])])
            assert code == "UNAUTHENTICATED" and "this server needs a token" in message
            assert (
                refused(triton.is_server_ready, headers={"authorization": "Bearer nope"})[0]
                == "UNAUTHENTICATED"
            )
            bearer = {"authorization": f"Bearer {token}"}
            assert triton.is_server_ready(headers=bearer)
            assert triton.infer("fake", [texts_input(["x"])], headers=bearer).as_numpy("EMBEDDING").shape == (
                1,
                8,
            )
        finally:
            triton.close()
        # Reflection, both versions, stays open: it only describes the API.
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for version in ("v1", "v1alpha"):
            (listed,) = _reflect(server.channel(), version, request)
            assert SERVICE in {s.name for s in listed.list_services_response.service}


# --- reflection ---------------------------------------------------------------------------------------------
def _reflect(
    channel: grpc.Channel, version: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[Any]:
    """Raw reflection calls on grpc.reflection.<version> (its messages are v1alpha's, field for field)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def _file(reply: Any) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(
        reply.file_descriptor_response.file_descriptor_proto[0]
    )


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha_describe_both_front_doors(server: ServerThread, version: str) -> None:
    request = reflection_pb2.ServerReflectionRequest
    listed, kserve, v1, itself = _reflect(
        server.channel(),
        version,
        request(list_services=""),
        request(file_containing_symbol=SERVICE),
        request(file_containing_symbol="recserve.v1.Inference"),
        request(file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        SERVICE,
        "recserve.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = _file(kserve)
    assert described.package == "inference"
    assert [m.name for m in described.service[0].method] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    ]
    assert _file(v1).package == "recserve.v1"
    reflected = _file(itself)
    assert reflected.package == f"grpc.reflection.{version}"
    assert reflected.service[0].method[0].input_type == f".grpc.reflection.{version}.ServerReflectionRequest"
