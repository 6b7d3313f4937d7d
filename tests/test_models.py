"""Several models in one server, and Classify: names, defaults, isolation of batches, health and metrics.

Fake models behind the server's seam (tests/support/fake_model.py); the numerics of real classifiers are
tested where they are exported (tests/test_export*.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.client import Client, NotFound
from recserve.server.engine import probabilities_of
from recserve.server.metrics import Name, total
from recserve.server.registry import health_name
from recserve.server.settings import ServerSettings
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_model import FAKE_LABELS, FakeModel, fake_model
from tests.support.serving import ServerThread, embed, settings_for

FAKE = Path("/nonexistent/fake-repo")
NO_HTTP = {"metrics_port": None, "warmup": False}


def status_of(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def three_models() -> dict[str, FakeModel]:
    return {
        "users": fake_model("embedding", dim=8),
        "rerank": fake_model("cross-encoder"),
        "interest": fake_model("classifier"),
    }


@pytest.fixture(scope="module")
def models() -> dict[str, FakeModel]:
    return three_models()


@pytest.fixture(scope="module")
def server(models: dict[str, FakeModel]):  # type: ignore[no-untyped-def]
    thread = ServerThread(settings_for(FAKE, metrics_port=0, warmup=False), list(models.items())).start()
    yield thread
    thread.stop()


def test_each_call_reaches_the_model_it_names_and_empty_is_the_default(
    server: ServerThread, models: dict[str, FakeModel]
) -> None:
    stub = server.stub()
    texts = ["a red running shoe", "noise-cancelling headphones"]
    np.testing.assert_allclose(embed(stub, texts, model="users"), models["users"].expected(texts), atol=1e-6)
    # The first model given is the default.
    np.testing.assert_allclose(embed(stub, texts), models["users"].expected(texts), atol=1e-6)
    reply = stub.Score(pb.ScoreRequest(model="rerank", query_text="shoes", candidates=texts))
    logits = [
        models["rerank"].backend.row(i)[-1] for i in models["rerank"].tokenizer.encode_pairs("shoes", texts)
    ]
    np.testing.assert_allclose(reply.scores, logits, rtol=1e-6)


def test_an_unknown_model_is_not_found_listing_the_served_names(server: ServerThread) -> None:
    stub = server.stub()
    code, details = status_of(stub.Embed, pb.EmbedRequest(model="nope", texts=["a"]))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in details and "users, rerank, interest" in details
    code, _ = status_of(stub.Info, pb.InfoRequest(model="x" * 10_000))
    assert code == grpc.StatusCode.NOT_FOUND
    # The made-up names are not label values: the failure is counted under model="".
    assert server.registry.get_sample_value(total(Name.FAILURES), {"model": "", "reason": "not_found"}) == 2


def test_info_describes_the_named_model_and_lists_them_all(server: ServerThread) -> None:
    stub = server.stub()
    default = stub.Info(pb.InfoRequest())
    interest = stub.Info(pb.InfoRequest(model="interest"))
    assert default.name == "users" and default.task == "embedding"
    assert interest.name == "interest" and interest.task == "classifier"
    assert list(interest.labels) == list(FAKE_LABELS) and not interest.multi_label
    listed = [(m.name, m.task, m.default) for m in default.models]
    assert listed == [
        ("users", "embedding", True),
        ("rerank", "cross-encoder", False),
        ("interest", "classifier", False),
    ]
    assert list(interest.models) == list(default.models)


def test_health_answers_for_each_model_by_name(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel())
    for name in ("", "recserve.v1.Inference", *(health_name(m) for m in ("users", "rerank", "interest"))):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service=health_name("nope")), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_carry_the_model_label(server: ServerThread) -> None:
    stub = server.stub()
    embed(stub, ["one", "two", "three"], model="users")
    stub.Classify(pb.ClassifyRequest(model="interest", texts=["a book about machine learning"]))
    sample = server.registry.get_sample_value
    assert (sample(total(Name.TEXTS), {"model": "users", "rpc": "Embed"}) or 0) >= 3
    assert (sample(total(Name.TEXTS), {"model": "interest", "rpc": "Classify"}) or 0) >= 1
    assert (sample(f"{Name.BATCH_SIZE}_count", {"model": "interest"}) or 0) >= 1
    tasks = {
        labels["model"]: labels["task"]
        for family in server.registry.collect()
        if family.name == Name.MODEL_INFO
        for labels in (s.labels for s in family.samples)
    }
    assert tasks == {"users": "embedding", "rerank": "cross-encoder", "interest": "classifier"}


def test_an_rpc_that_does_not_fit_the_task_names_the_one_that_does(server: ServerThread) -> None:
    stub = server.stub()
    code, details = status_of(stub.Embed, pb.EmbedRequest(model="interest", texts=["a"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "call Classify" in details
    code, details = status_of(stub.Classify, pb.ClassifyRequest(model="users", texts=["a"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "call Embed" in details
    code, details = status_of(stub.Score, pb.ScoreRequest(model="interest", query_text="q", candidates=["a"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "call Classify" in details
    code, details = status_of(stub.Classify, pb.ClassifyRequest(model="interest", texts=["a"], top_k=9))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4 labels" in details


def test_classify_gives_the_top_labels_of_each_text_in_order(
    server: ServerThread, models: dict[str, FakeModel]
) -> None:
    texts = ["I want a book about machine learning", "", "jazz records", "a trip to the alps " * 20]
    reply = server.stub().Classify(pb.ClassifyRequest(model="interest", texts=texts, top_k=2))
    model = models["interest"]
    logits = np.stack([model.backend.row(item) for item in model.tokenizer.encode(texts)])
    expected = probabilities_of(logits, multi_label=False)
    assert len(reply.results) == len(texts)
    for result, row in zip(reply.results, expected, strict=True):
        best = np.argsort(-row, kind="stable")[:2]
        assert [label.index for label in result.labels] == best.tolist()
        assert [label.label for label in result.labels] == [FAKE_LABELS[i] for i in best]
        np.testing.assert_allclose([label.probability for label in result.labels], row[best], rtol=1e-6)
    assert list(reply.truncated) == [3]


def test_the_client_names_its_model_and_classifies(
    server: ServerThread, models: dict[str, FakeModel]
) -> None:
    with Client(server.address, model="interest", deadline=10) as client:
        info = client.info()
        assert (info.name, info.labels, info.models) == (
            "interest",
            FAKE_LABELS,
            ("users", "rerank", "interest"),
        )
        got = client.classify(["jazz records", "hiking boots"], top_k=3)
    assert [len(row) for row in got] == [3, 3]
    assert all(label in FAKE_LABELS and 0 <= p <= 1 for row in got for label, p in row)
    with Client(server.address, model="users", deadline=10) as client:
        np.testing.assert_allclose(client.embed(["a"]), models["users"].expected(["a"]), atol=1e-6)
    with Client(server.address, model="gone", deadline=10) as client, pytest.raises(NotFound, match="users"):
        client.info()


def test_probabilities_are_softmax_or_independent_sigmoids_without_overflow() -> None:
    logits = np.array([[0.0, 0.0, np.log(2.0)], [1000.0, -1000.0, 0.0]], dtype=np.float32)
    single = probabilities_of(logits, multi_label=False)
    np.testing.assert_allclose(single[0], [0.25, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_allclose(single.sum(axis=1), 1.0, rtol=1e-6)
    multi = probabilities_of(logits, multi_label=True)
    np.testing.assert_allclose(multi[0], [0.5, 0.5, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(multi[1], [1.0, 0.0, 0.5], atol=1e-7)
    assert np.isfinite(multi).all()


def test_a_model_that_is_stuck_does_not_hold_the_other_models_calls() -> None:
    """Each model has its own batcher: with every batch of one model held at its gate, the other still
    answers (they share the model threads, and one is left free: 2 threads, 1 batch at a time each)."""
    models = three_models()
    stuck = models["rerank"]
    stuck.backend.gate.clear()
    thread = ServerThread(settings_for(FAKE, **NO_HTTP), list(models.items())).start()
    try:
        results: list[object] = []

        def held() -> None:
            try:
                results.append(
                    thread.stub().Score(pb.ScoreRequest(model="rerank", query_text="q", candidates=["a"]))
                )
            except grpc.RpcError as exc:
                results.append(exc.code())

        caller = threading.Thread(target=held)
        caller.start()
        assert stuck.backend.wait_entered(1)
        texts = ["still served"]
        got = embed(thread.stub(), texts, model="users")
        np.testing.assert_allclose(got, models["users"].expected(texts), atol=1e-6)
        stuck.backend.gate.set()
        caller.join(10)
        assert len(results) == 1 and isinstance(results[0], pb.ScoreResponse)
    finally:
        stuck.backend.gate.set()
        thread.stop()


def test_settings_name_models_once_and_the_default_must_be_served(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    settings = ServerSettings(model=[f"first={a}", str(b)])
    assert settings.served_models() == [("first", a), ("b", b)]
    assert ServerSettings(model_repo=a, model=[f"x={b}"]).served_models() == [("a", a), ("x", b)]
    with pytest.raises(ValueError, match="given twice: a"):
        ServerSettings(model_repo=a, model=[f"a={b}"])
    with pytest.raises(ValueError, match="is not served"):
        ServerSettings(model=[str(a)], default_model="zzz")
    with pytest.raises(ValueError, match="name a model repository"):
        ServerSettings()
