"""End to end over a real grpc.aio server on a loopback port with the fake model: status codes and details,
lifecycle, admission and metrics, without torch or an exported model (tests/support/fake_model.py)."""

from __future__ import annotations

import contextlib
import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recserve.server import batcher as batcher_module
from recserve.server import errors
from recserve.server.metrics import Name, total
from recserve.server.registry import SERVICE_NAME
from recserve.server.service import status_code
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.fake_model import FakeBackend, FakeModel, fake_model
from tests.support.serving import (
    MANY_TEXTS,
    TEXTS,
    MiB,
    ServerThread,
    assert_each_is_its_own,
    concurrent_single_text_calls,
    embed,
    held_in_warm_up,
    serving,
    settings_for,
)

# The fake model has no repository: the path only names it in the settings.
FAKE = Path("fake")
# For servers whose tests read no scrape: no metrics port to bind.
NO_HTTP = {"metrics_port": None}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def model() -> FakeModel:
    """The module server's model; tests that hold its gate or make it fail start their own server."""
    return fake_model()


@pytest.fixture(scope="module")
def server(model: FakeModel) -> Iterator[ServerThread]:
    with serving(FAKE, model, max_texts_per_call=64, max_text_bytes=4096, max_message_bytes=MiB) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> pb_grpc.InferenceStub:
    return server.stub()


@contextlib.contextmanager
def held_server(**overrides: object) -> Iterator[tuple[FakeModel, ServerThread]]:
    """A fresh model and its server; its batches wait at the gate until the test opens it (or it ends)."""
    model = fake_model()
    model.backend.gate.clear()
    with serving(FAKE, model, **overrides) as server:
        try:
            yield model, server
        finally:
            # Before the drain, which would otherwise wait on a batch held at the gate.
            model.backend.gate.set()


def status_of(call: Callable[..., object], request: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kwargs)
    return info.value.code(), info.value.details()


def f32_request(texts: list[str]) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=texts, encoding=pb.VECTOR_ENCODING_PACKED_F32)


def packed(reply: pb.EmbedResponse, count: int) -> np.ndarray:
    return np.frombuffer(reply.packed, dtype="<f4").reshape(count, reply.dimension)


# --- the API --------------------------------------------------------------------------------------------
def test_info_reports_model_runtime_and_limits(stub: pb_grpc.InferenceStub, server: ServerThread) -> None:
    info = stub.Info(pb.InfoRequest())
    assert (info.model_name, info.task, info.dimension, info.max_tokens) == (
        "fake-embedding",
        "embedding",
        8,
        32,
    )
    assert (info.precision, info.provider) == ("fp32", FakeBackend.provider)
    assert (info.weights_sha256, info.pooling, info.normalize) == ("0" * 64, "mean", True)
    assert info.limits.max_texts_per_call == 64
    assert info.limits.max_text_bytes == 4096
    assert info.limits.max_message_bytes == MiB
    assert info.limits.max_batch_size == server.settings.max_batch_size
    assert info.limits.max_queue_texts == server.settings.max_queue_texts


def test_encodings_decode_to_the_same_vectors(stub: pb_grpc.InferenceStub, model: FakeModel) -> None:
    expected = model.expected(TEXTS)
    floats = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_FLOAT))
    default = stub.Embed(pb.EmbedRequest(texts=TEXTS))
    f32 = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_PACKED_F32))
    f16 = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_PACKED_F16))
    assert (floats.encoding, default.encoding) == (pb.VECTOR_ENCODING_FLOAT, pb.VECTOR_ENCODING_FLOAT)
    assert (f32.encoding, f16.encoding) == (pb.VECTOR_ENCODING_PACKED_F32, pb.VECTOR_ENCODING_PACKED_F16)
    assert not floats.packed and not f32.vectors
    for reply in (floats, default):
        np.testing.assert_array_equal(np.array([list(v.values) for v in reply.vectors], np.float32), expected)
    np.testing.assert_array_equal(packed(f32, len(TEXTS)), expected)
    as_f16 = np.frombuffer(f16.packed, dtype="<f2").reshape(len(TEXTS), f16.dimension).astype(np.float32)
    np.testing.assert_allclose(as_f16, expected, rtol=0, atol=2e-3)
    assert list(floats.token_counts)[2:4] == [2, 2]  # an empty or blank text is [CLS] [SEP]


def test_normalisation_is_the_default_and_can_be_turned_off(
    stub: pb_grpc.InferenceStub, model: FakeModel
) -> None:
    normalised = embed(stub, TEXTS)
    raw = embed(stub, TEXTS, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(normalised, model.expected(TEXTS))
    np.testing.assert_array_equal(raw, model.expected(TEXTS, normalize=False))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_array_equal(embed(stub, TEXTS, normalize=True), normalised)


def test_truncation_is_reported_and_strict_mode_rejects(
    stub: pb_grpc.InferenceStub, model: FakeModel
) -> None:
    long_text = "word " * 600
    reply = stub.Embed(pb.EmbedRequest(texts=["short", long_text], encoding=pb.VECTOR_ENCODING_PACKED_F32))
    info = stub.Info(pb.InfoRequest())
    assert list(reply.truncated) == [1]
    assert list(reply.token_counts) == [3, info.max_tokens]
    np.testing.assert_array_equal(packed(reply, 2), model.expected(["short", long_text]))
    code, details = status_of(
        stub.Embed, pb.EmbedRequest(texts=["short", long_text], truncation=pb.TRUNCATION_STRICT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] is longer than the model's 32 tokens" in details and "STRICT" in details


def test_timings_and_request_id_travel_in_trailing_metadata(stub: pb_grpc.InferenceStub) -> None:
    _, call = stub.Embed.with_call(pb.EmbedRequest(texts=TEXTS), metadata=(("x-request-id", "abc123"),))
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "abc123"
    for key in ("x-tokenize-ms", "x-queue-ms", "x-infer-ms"):
        assert float(trailing[key]) >= 0.0
    # Without one, the server makes one up, so that a log line can still be found from the reply.
    _, call = stub.Embed.with_call(pb.EmbedRequest(texts=["x"]))
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 16 and int(generated, 16) >= 0


def test_concurrent_calls_each_get_their_own_vector(server: ServerThread, model: FakeModel) -> None:
    got = concurrent_single_text_calls(server.address, MANY_TEXTS)
    assert_each_is_its_own(got, model.expected(MANY_TEXTS), atol=0)


def test_score_is_cosine_of_embed_and_user_vector_follows_the_formula(stub: pb_grpc.InferenceStub) -> None:
    candidates = TEXTS[:5]
    vectors = embed(stub, ["a running shoe", *candidates], normalize=False)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    reply = stub.Score(pb.ScoreRequest(query_text="a running shoe", candidates=candidates))
    np.testing.assert_allclose(reply.scores, unit[1:] @ unit[0], atol=1e-6)

    dot = stub.Score(
        pb.ScoreRequest(query_text="a running shoe", candidates=candidates, similarity=pb.SIMILARITY_DOT)
    )
    # The model normalises, so Embed's vectors are unit vectors and their dot product is the cosine.
    np.testing.assert_allclose(dot.scores, unit[1:] @ unit[0], atol=1e-6)

    history, weights = ["hiking boots", "trail socks", "rain jacket"], [0.5, 1.0, 2.0]
    hist = embed(stub, history, normalize=False)
    e = hist / np.linalg.norm(hist, axis=1, keepdims=True)
    user = (np.asarray(weights)[:, None] * e).sum(axis=0)
    user /= np.linalg.norm(user)
    reply = stub.Score(
        pb.ScoreRequest(user_history=pb.UserHistory(texts=history, weights=weights), candidates=candidates)
    )
    np.testing.assert_allclose(reply.scores, unit[1:] @ user, atol=1e-6)
    unweighted = stub.Score(
        pb.ScoreRequest(user_history=pb.UserHistory(texts=history), candidates=candidates)
    )
    user1 = e.sum(axis=0) / np.linalg.norm(e.sum(axis=0))
    np.testing.assert_allclose(unweighted.scores, unit[1:] @ user1, atol=1e-6)


def test_score_on_a_cross_encoder_is_its_logit_per_pair_and_embed_is_refused() -> None:
    model = fake_model("cross-encoder")
    query, candidates = (
        "red running shoes",
        ["nike pegasus road shoe", "cast iron pan", "", "trail runner " * 80],
    )
    logits = np.array(
        [model.backend.row(item)[-1] for item in model.tokenizer.encode_pairs(query, candidates)]
    )
    with serving(FAKE, model, **NO_HTTP) as server:
        stub = server.stub()
        assert stub.Info(pb.InfoRequest()).task == "cross-encoder"
        reply = stub.Score(pb.ScoreRequest(query_text=query, candidates=candidates))
        # Reversed, each candidate still gets its own pair's logit: nothing is matched up by position alone.
        backwards = stub.Score(pb.ScoreRequest(query_text=query, candidates=candidates[::-1]))
        embed_code, embed_details = status_of(stub.Embed, pb.EmbedRequest(texts=["x"]))
        history_code, history_details = status_of(stub.Score, _history(["a"], []))
    np.testing.assert_array_equal(np.asarray(reply.scores, np.float32), logits.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(backwards.scores, np.float32), logits[::-1].astype(np.float32))
    assert list(reply.truncated) == [3]
    assert embed_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Embed does not apply to this model, a cross-encoder: call Score" in embed_details
    assert history_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "a user history needs an embedding model" in history_details


BAD_EMBEDS = {
    "empty text list": (pb.EmbedRequest(texts=[]), "texts is empty"),
    "too many texts": (pb.EmbedRequest(texts=["x"] * 65), "texts holds 65 texts; the limit is 64"),
    "text over the byte limit": (pb.EmbedRequest(texts=["ok", "é" * 3000]), "texts[1] is 6000 bytes"),
    "unknown encoding": (pb.EmbedRequest(texts=["x"], encoding=99), "unknown vector encoding 99"),  # type: ignore[arg-type]
    "unknown truncation": (pb.EmbedRequest(texts=["x"], truncation=7), "unknown truncation 7"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(BAD_EMBEDS))
def test_bad_embed_calls_get_invalid_argument(stub: pb_grpc.InferenceStub, case: str) -> None:
    request, message = BAD_EMBEDS[case]
    code, details = status_of(stub.Embed, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert embed(stub, ["still serving"]).shape[0] == 1


def _history(texts: list[str], weights: list[float]) -> pb.ScoreRequest:
    return pb.ScoreRequest(user_history=pb.UserHistory(texts=texts, weights=weights), candidates=["c"])


BAD_SCORES = {
    "no candidates": (pb.ScoreRequest(query_text="q"), "candidates is empty"),
    "no query": (pb.ScoreRequest(candidates=["c"]), "set the query"),
    "negative weight": (_history(["a", "b"], [1.0, -1.0]), "weights[1] is -1.0"),
    "NaN weight": (_history(["a", "b"], [math.nan, 1.0]), "weights[0] is nan"),
    "infinite weight": (_history(["a", "b"], [1.0, math.inf]), "weights[1] is inf"),
    "wrong weight count": (_history(["a", "b"], [1.0]), "2 items but 1 weights"),
    "all-zero weights": (_history(["a", "b"], [0.0, 0.0]), "all zero"),
    "empty history": (_history([], []), "user_history.texts is empty"),
    "query over the byte limit": (
        pb.ScoreRequest(query_text="é" * 3000, candidates=["c"]),
        "query_text[0] is 6000",
    ),
    "over-long query in strict mode": (
        pb.ScoreRequest(query_text="word " * 600, candidates=["c"], truncation=pb.TRUNCATION_STRICT),
        "query_text[0] is longer than",
    ),
    "unknown similarity": (
        pb.ScoreRequest(query_text="q", candidates=["c"], similarity=5),  # type: ignore[arg-type]
        "unknown similarity 5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_bad_score_calls_get_invalid_argument(stub: pb_grpc.InferenceStub, case: str) -> None:
    request, message = BAD_SCORES[case]
    code, details = status_of(stub.Score, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert len(stub.Score(pb.ScoreRequest(query_text="q", candidates=["c", "d"])).scores) == 2


def test_message_over_the_size_limit_is_resource_exhausted(stub: pb_grpc.InferenceStub) -> None:
    code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["x" * 4000] * 300))  # ~1.2 MB > 1 MiB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details and str(MiB) in details
    assert embed(stub, ["still serving"]).shape[0] == 1


def test_deadline_already_short_gets_deadline_exceeded(stub: pb_grpc.InferenceStub) -> None:
    code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["x"] * 64), timeout=0.000_001)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's own timer, or the server's refusal to queue work for a caller already gone.
    assert details == "Deadline Exceeded" or details.startswith(
        ("the deadline passed", "the call's deadline")
    ), details
    assert embed(stub, ["still serving"]).shape[0] == 1


def test_health_and_reflection(server: ServerThread) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING
    code, _ = status_of(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert code == grpc.StatusCode.NOT_FOUND

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# --- metrics --------------------------------------------------------------------------------------------
Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: Samples, family: str, /, **labels: str) -> float:
    return sum(
        v for n, got, v in samples if n == family and all(got.get(k) == want for k, want in labels.items())
    )


def test_metrics_families_and_consistency(server: ServerThread, stub: pb_grpc.InferenceStub) -> None:
    before = scrape(server.metrics_url)
    embed(stub, TEXTS)
    stub.Score(pb.ScoreRequest(query_text="q", candidates=["c", "d"]))
    status_of(stub.Embed, pb.EmbedRequest(texts=[]))
    after = scrape(server.metrics_url)

    for family in (
        total(Name.REQUESTS),
        total(Name.TEXTS),
        total(Name.FAILURES),
        total(Name.BATCH_REAL_TOKENS),
        f"{Name.REQUEST_SECONDS}_count",
        f"{Name.TOKENIZE_SECONDS}_count",
        f"{Name.QUEUE_WAIT_SECONDS}_count",
        f"{Name.INFERENCE_SECONDS}_count",
        f"{Name.BATCH_SIZE}_count",
        f"{Name.BATCH_TOKENS}_count",
        f"{Name.PADDING_RATIO}_count",
        Name.QUEUE_TEXTS,
        Name.QUEUE_TOKENS,
        Name.IN_FLIGHT,
        Name.BACKLOG_SECONDS,
        Name.MODEL_INFO,
    ):
        assert any(name == family for name, _, _ in after), family

    def delta(name: str, /, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Every text that reached the model was answered, and each call was counted once with its code.
    assert delta(f"{Name.BATCH_SIZE}_sum") == delta(total(Name.TEXTS)) == len(TEXTS) + 3
    assert delta(total(Name.TEXTS), rpc="Score") == 3
    assert delta(total(Name.REQUESTS), rpc="Embed", code="OK") == 1
    assert delta(total(Name.REQUESTS), rpc="Score", code="OK") == 1
    assert delta(total(Name.REQUESTS), rpc="Embed", code="INVALID_ARGUMENT") == 1
    assert delta(total(Name.FAILURES)) == delta(total(Name.FAILURES), reason="invalid") == 1
    assert value(after, Name.IN_FLIGHT) == 0
    assert value(after, Name.QUEUE_TEXTS) == 0
    assert value(after, Name.MODEL_INFO, model="fake", precision="fp32", provider=FakeBackend.provider) == 1


def recorded(server: ServerThread, name: str, /, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, read in-process without a scrape (0
    when no such label set was used)."""
    return sum(
        sample.value
        for family in server.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == want for k, want in labels.items())
    )


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """NOTE: a last resort, for a state the server reaches on its own clock with nothing to await."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.005)
    return True


def test_a_call_that_expires_in_the_queue_is_one_failure_and_its_texts_are_dropped() -> None:
    texts = ["one", "two", "three"]
    with held_server() as (held, server):
        stub = server.stub()
        before = scrape(server.metrics_url)
        blocker = stub.Embed.future(pb.EmbedRequest(texts=["the blocker"]))
        assert held.backend.wait_entered(1), "the blocker never reached the model"
        code, details = status_of(stub.Embed, pb.EmbedRequest(texts=texts), timeout=0.3)
        # The batcher expires the call on its own clock, while the model is still busy; its answer and
        # the client's own timer race to the caller.
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert details in ("Deadline Exceeded", "the deadline passed while the request was queued")
        assert wait_until(lambda: recorded(server, total(Name.FAILURES), reason="deadline") == 1)
        held.backend.gate.set()
        assert blocker.result(timeout=10).dimension == 8
        # Queued behind the expired texts, this call's batch is cut only after they were dropped.
        np.testing.assert_array_equal(embed(stub, ["after"]), held.expected(["after"]))
        after = scrape(server.metrics_url)

    def delta(name: str, /, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(total(Name.REQUESTS), rpc="Embed", code="DEADLINE_EXCEEDED") == 1
    assert delta(total(Name.FAILURES)) == delta(total(Name.FAILURES), reason="deadline") == 1
    assert delta(total(Name.DROPPED_TEXTS)) == delta(total(Name.DROPPED_TEXTS), reason="deadline") == 3
    assert held.backend.batches == [1, 1]  # the blocker and the last call: the expired texts never ran
    assert value(after, Name.QUEUE_TEXTS) == 0


def test_admission_refuses_a_call_the_queue_has_no_room_for_before_tokenising() -> None:
    with held_server(max_queue_texts=4, **NO_HTTP) as (held, server):
        stub = server.stub()
        admitted = [["the blocker"], ["a1", "a2"], ["b1", "b2"]]
        calls = [stub.Embed.future(f32_request(admitted[0]))]
        assert held.backend.wait_entered(1), "the blocker never reached the model"
        calls += [stub.Embed.future(f32_request(texts)) for texts in admitted[1:]]
        # Tokenised means admitted: each call holds its room in the queue from before tokenising.
        assert held.tokenizer.wait_encoded(5), "the calls that fill the queue were not tokenised"
        encoded = held.tokenizer.texts_encoded
        code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["c1", "c2"]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the queue is full" in details and "of 4; this call has 2" in details
        assert held.tokenizer.texts_encoded == encoded  # refused without being tokenised
        assert recorded(server, total(Name.FAILURES), reason="overloaded") == 1
        held.backend.gate.set()
        replies = [call.result(timeout=10) for call in calls]
    for texts, reply in zip(admitted, replies, strict=True):
        np.testing.assert_array_equal(packed(reply, len(texts)), held.expected(texts))


# --- errors ---------------------------------------------------------------------------------------------
def _subclasses(cls: type[errors.ServeError]) -> list[type[errors.ServeError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


def test_every_serve_error_has_a_status_code_and_a_new_subclass_inherits_its_parents() -> None:
    expected = {
        errors.ServeError: grpc.StatusCode.INTERNAL,
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.Internal: grpc.StatusCode.INTERNAL,
    }
    every = _subclasses(errors.ServeError)
    assert set(expected) <= set(every)
    for cls in every:
        assert cls.code in grpc.StatusCode.__members__, cls
        assert status_code(cls("x")) is grpc.StatusCode[cls.code]
    assert {cls: status_code(cls("x")) for cls in expected} == expected

    class Quota(errors.Overloaded):
        """A kind of refusal added later, with no code of its own."""

    assert status_code(Quota("over quota")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert Quota.reason == "overloaded"
    for unexpected in (RuntimeError("a bug"), KeyError("k"), ValueError("v")):
        assert status_code(unexpected) is grpc.StatusCode.INTERNAL


def _break_the_runtime(model: FakeModel) -> Callable[[], None]:
    model.backend.fail = lambda batch: True  # the batcher turns it into errors.Internal
    return lambda: setattr(model.backend, "fail", lambda batch: False)


def _break_the_tokenizer(model: FakeModel) -> Callable[[], None]:
    def encode(texts: object) -> list[object]:
        raise ValueError("a tokenizer bug")  # not a ServeError: it reaches the transport as it is

    model.tokenizer.encode = encode  # type: ignore[method-assign,assignment]
    return lambda: delattr(model.tokenizer, "encode")


@pytest.mark.parametrize("breaks", [_break_the_runtime, _break_the_tokenizer], ids=["runtime", "tokenizer"])
def test_an_unexpected_failure_reaches_the_caller_as_internal_with_only_the_request_id(
    breaks: Callable[[FakeModel], Callable[[], None]],
) -> None:
    model = fake_model()
    repair = breaks(model)
    with serving(FAKE, model, **NO_HTTP) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(texts=["boom"]), metadata=(("x-request-id", "req-42"),))
        assert recorded(server, total(Name.FAILURES), reason="internal") == 1
        repair()
        np.testing.assert_array_equal(embed(stub, ["still serving"]), model.expected(["still serving"]))
    error = info.value
    assert error.code() == grpc.StatusCode.INTERNAL
    # Generic: what broke stays in the server's log, found there by the request id.
    assert error.details() == "internal error (request id req-42); the server log has the details"
    assert dict(error.trailing_metadata())["x-request-id"] == "req-42"  # type: ignore[attr-defined]


# --- lifecycle ------------------------------------------------------------------------------------------
def test_not_serving_until_warm_up_ends() -> None:
    with held_in_warm_up(settings_for(FAKE, **NO_HTTP), fake_model()) as (port, finish):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == NOT_SERVING
        code, details = status_of(pb_grpc.InferenceStub(channel).Embed, pb.EmbedRequest(texts=["x"]))
        assert code == grpc.StatusCode.UNAVAILABLE and details == "the server is warming up"
        finish()
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
        assert embed(pb_grpc.InferenceStub(channel), ["x"]).shape == (1, 8)


def test_a_dead_batch_loop_turns_the_server_not_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_model()
    with serving(FAKE, model, **NO_HTTP) as server:
        stub, health = server.stub(), health_pb2_grpc.HealthStub(server.channel())
        assert embed(stub, ["before"]).shape[0] == 1
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        try:
            assert next(watch).status == SERVING

            def bug(*args: object) -> tuple[int, int, bool]:
                raise RuntimeError("a bug in batch assembly")

            monkeypatch.setattr(batcher_module, "cut_batch", bug)  # the loop's next batch kills it
            code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["the call that meets the bug"]))
            assert code == grpc.StatusCode.UNAVAILABLE  # answered, not left hanging
            assert details == "the batcher stopped working"
            # The probes are told: the watch sees NOT_SERVING (or fails with DEADLINE_EXCEEDED, never hangs).
            statuses = (reply.status for reply in watch)
            assert next(status for status in statuses if status != SERVING) == NOT_SERVING
        finally:
            watch.cancel()
        code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["later"]))
        assert code == grpc.StatusCode.UNAVAILABLE and "not serving" in details
        assert health.Check(health_pb2.HealthCheckRequest()).status == NOT_SERVING
    assert model.backend.batches == [1]  # only the call before the bug reached the model
