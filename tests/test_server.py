"""End to end over a real grpc.aio server on a loopback port, real ONNX Runtime, an exported tiny BERT."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recserve.server.app import RunningServer
from recserve.server.runtime import (
    CPU,
    CUDA,
    RuntimeSelectionError,
    ThreadShare,
    default_concurrent_batches,
    select_runtime,
)
from recserve.server.service import SERVICE_NAME
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.serving import ServerThread, serving, settings_for

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "a red running shoe",
    "wireless noise-cancelling headphones with a long battery life",
    "",
    "   ",
    "日本語のテキスト",
    "emoji 🎧🔥 and more",
    "the quick brown fox jumps over the lazy dog " * 3,
]


@pytest.fixture(scope="module")
def server(tiny_repo: Path):
    with serving(tiny_repo, max_texts_per_call=64, max_text_bytes=4096, max_message_bytes=1024 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> pb_grpc.InferenceStub:
    return server.stub()


def embed(stub: pb_grpc.InferenceStub, texts: list[str], **kwargs: object) -> np.ndarray:
    reply = stub.Embed(pb.EmbedRequest(texts=texts, encoding=pb.VECTOR_ENCODING_PACKED_F32, **kwargs))
    return np.frombuffer(reply.packed, dtype="<f4").reshape(len(texts), reply.dimension)


def status_of(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


# --- runtime selection ----------------------------------------------------------------------------------
def test_runtime_prefers_fp16_on_cuda_and_fp32_on_cpu() -> None:
    assert select_runtime([CUDA, CPU], ["fp32", "fp16", "int8"]).precision == "fp16"
    assert select_runtime([CUDA, CPU], ["fp32", "fp16"]).provider == CUDA
    cpu = select_runtime([CPU], ["fp32", "fp16", "int8"])
    assert (cpu.precision, cpu.provider) == ("fp32", CPU)
    assert "no CUDAExecutionProvider" in cpu.reason
    assert select_runtime([CUDA, CPU], ["fp32"]).precision == "fp32"  # fp16 missing: falls back, says so
    assert select_runtime([CUDA, CPU], ["fp32", "fp16"], device="cpu").provider == CPU
    assert select_runtime([CPU], ["fp32", "int8"], precision="int8").precision == "int8"


def test_runtime_refuses_what_cannot_be_met() -> None:
    with pytest.raises(RuntimeSelectionError, match="CUDAExecutionProvider"):
        select_runtime([CPU], ["fp32", "fp16"], device="cuda")
    with pytest.raises(RuntimeSelectionError, match="holds only"):
        select_runtime([CPU], ["fp32"], precision="int8")


def test_concurrent_batches_default_to_two_on_a_multicore_cpu_only() -> None:
    assert default_concurrent_batches(CPU, 2) == 2
    assert default_concurrent_batches(CPU, 16) == 2
    assert default_concurrent_batches(CPU, 1) == 1  # one thread: nothing to share
    assert default_concurrent_batches(CUDA, 16) == 1


def test_thread_share_gives_every_thread_only_to_a_batch_that_starts_alone() -> None:
    share = ThreadShare()
    with share.enter() as first:
        with share.enter() as second:  # starts while the first runs
            pass
        with share.enter() as third:  # the first still runs
            pass
    with share.enter() as later:  # everything finished: alone again
        pass
    assert (first, second, third, later) == (True, False, False, True)
    assert share.started == {"alone": 2, "shared": 2}


# --- the API --------------------------------------------------------------------------------------------
def test_info_reports_model_runtime_and_limits(stub: pb_grpc.InferenceStub, server: ServerThread) -> None:
    info = stub.Info(pb.InfoRequest())
    assert info.task == "embedding"
    assert info.dimension > 0
    assert (info.precision, info.provider) == ("fp32", CPU)
    assert len(info.weights_sha256) == 64
    assert info.limits.max_texts_per_call == 64
    assert info.limits.max_message_bytes == 1024 * 1024
    assert info.limits.max_batch_size == server.settings.max_batch_size


def test_encodings_decode_to_the_same_vectors(stub: pb_grpc.InferenceStub) -> None:
    floats = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_FLOAT))
    as_floats = np.array([list(v.values) for v in floats.vectors], dtype=np.float32)
    packed32 = embed(stub, TEXTS)
    f16 = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_PACKED_F16))
    packed16 = np.frombuffer(f16.packed, dtype="<f2").reshape(len(TEXTS), f16.dimension).astype(np.float32)
    assert as_floats.shape == packed32.shape == packed16.shape
    np.testing.assert_allclose(as_floats, packed32, rtol=0, atol=1e-6)
    np.testing.assert_allclose(packed16, packed32, rtol=0, atol=2e-3)
    assert list(floats.token_counts)[2] == 2  # the empty text is [CLS] [SEP]


def test_normalisation_is_the_default_and_can_be_turned_off(stub: pb_grpc.InferenceStub) -> None:
    normalised = embed(stub, TEXTS)
    raw = embed(stub, TEXTS, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normalised, atol=1e-5)


def test_truncation_is_reported_and_strict_mode_rejects(stub: pb_grpc.InferenceStub) -> None:
    long_text = "word " * 600
    reply = stub.Embed(pb.EmbedRequest(texts=["short", long_text], encoding=pb.VECTOR_ENCODING_PACKED_F32))
    info = stub.Info(pb.InfoRequest())
    assert list(reply.truncated) == [1]
    assert reply.token_counts[1] == info.max_tokens
    code, details = status_of(
        stub.Embed, pb.EmbedRequest(texts=["short", long_text], truncation=pb.TRUNCATION_STRICT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]" in details and "STRICT" in details


def test_timings_and_request_id_travel_in_trailing_metadata(stub: pb_grpc.InferenceStub) -> None:
    _, call = stub.Embed.with_call(pb.EmbedRequest(texts=TEXTS), metadata=(("x-request-id", "abc123"),))
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "abc123"
    for key in ("x-tokenize-ms", "x-queue-ms", "x-infer-ms"):
        assert float(trailing[key]) >= 0.0
    assert float(trailing["x-infer-ms"]) > 0.0


def concurrent_single_text_calls(address: str, texts: list[str]) -> np.ndarray:
    """One Embed call per text, all at once; the vectors in the order of `texts`."""

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


def assert_each_is_its_own(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    # Each answer is its own text's vector (nothing lost, nothing swapped): nearest reference is itself.
    nearest = np.argmax(got @ expected.T, axis=1)
    assert (nearest == np.arange(len(expected))).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)


MANY_TEXTS = [f"item {i}: " + "token " * (i % 37) for i in range(500)]


def test_concurrent_calls_each_get_their_own_vector(
    server: ServerThread, stub: pb_grpc.InferenceStub
) -> None:
    texts = MANY_TEXTS
    expected = np.concatenate([embed(stub, texts[i : i + 50]) for i in range(0, len(texts), 50)])
    assert_each_is_its_own(concurrent_single_text_calls(server.address, texts), expected)


def test_concurrent_batches_share_the_threads_and_answer_the_same(
    server: ServerThread, stub: pb_grpc.InferenceStub, tiny_repo: Path
) -> None:
    """Two threads: a batch alone runs on both, batches that overlap on one each; the vectors agree."""
    expected = concurrent_single_text_calls(server.address, MANY_TEXTS)
    with serving(tiny_repo, intra_op_threads=2) as shared:
        assert shared.server is not None
        backend = shared.server.backend
        assert (backend.concurrent_batches, backend.threads) == (2, (2, 1))
        # Pool threads must not spin on after a batch, holding the cores that answer its calls.
        options = backend.session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        got = concurrent_single_text_calls(shared.address, MANY_TEXTS)
        lone = embed(shared.stub(), MANY_TEXTS[:1])
    assert backend.share.started["shared"] > 0 and backend.share.started["alone"] > 0
    assert_each_is_its_own(got, expected)
    np.testing.assert_allclose(lone[0], expected[0], atol=1e-5)


def test_score_is_cosine_of_embed_and_user_vector_follows_the_formula(stub: pb_grpc.InferenceStub) -> None:
    candidates = TEXTS[:5]
    vectors = embed(stub, ["a running shoe", *candidates], normalize=False)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    reply = stub.Score(pb.ScoreRequest(query_text="a running shoe", candidates=candidates))
    np.testing.assert_allclose(reply.scores, unit[1:] @ unit[0], atol=1e-5)

    dot = stub.Score(
        pb.ScoreRequest(query_text="a running shoe", candidates=candidates, similarity=pb.SIMILARITY_DOT)
    )
    np.testing.assert_allclose(
        dot.scores, unit[1:] @ unit[0], atol=1e-5
    )  # the model normalises: dot = cosine

    history, weights = ["hiking boots", "trail socks", "rain jacket"], [0.5, 1.0, 2.0]
    hist = embed(stub, history, normalize=False)
    e = hist / np.linalg.norm(hist, axis=1, keepdims=True)
    user = (np.asarray(weights)[:, None] * e).sum(axis=0)
    user /= np.linalg.norm(user)
    reply = stub.Score(
        pb.ScoreRequest(user_history=pb.UserHistory(texts=history, weights=weights), candidates=candidates)
    )
    np.testing.assert_allclose(reply.scores, unit[1:] @ user, atol=1e-5)
    unweighted = stub.Score(
        pb.ScoreRequest(user_history=pb.UserHistory(texts=history), candidates=candidates)
    )
    user1 = e.sum(axis=0) / np.linalg.norm(e.sum(axis=0))
    np.testing.assert_allclose(unweighted.scores, unit[1:] @ user1, atol=1e-5)


BAD_EMBEDS = {
    "empty text list": (pb.EmbedRequest(texts=[]), "texts is empty"),
    "too many texts": (pb.EmbedRequest(texts=["x"] * 65), "limit is 64"),
    "text over the byte limit": (pb.EmbedRequest(texts=["ok", "é" * 3000]), "texts[1] is 6000 bytes"),
    "unknown encoding": (pb.EmbedRequest(texts=["x"], encoding=99), "unknown vector encoding"),  # type: ignore[arg-type]
    "unknown truncation": (pb.EmbedRequest(texts=["x"], truncation=7), "unknown truncation"),  # type: ignore[arg-type]
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
    "wrong weight count": (_history(["a", "b"], [1.0]), "2 texts but 1 weights"),
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
        pb.ScoreRequest(query_text="q", candidates=["c"], similarity=5),
        "unknown similarity",
    ),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_bad_score_calls_get_invalid_argument(stub: pb_grpc.InferenceStub, case: str) -> None:
    request, message = BAD_SCORES[case]
    code, details = status_of(stub.Score, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert len(stub.Score(pb.ScoreRequest(query_text="q", candidates=["c", "d"])).scores) == 2


def test_message_over_the_size_limit_is_resource_exhausted(stub: pb_grpc.InferenceStub) -> None:
    code, _ = status_of(stub.Embed, pb.EmbedRequest(texts=["x" * 4000] * 300))  # ~1.2 MB > 1 MiB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert embed(stub, ["still serving"]).shape[0] == 1


def test_deadline_already_short_gets_deadline_exceeded(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(texts=["x"] * 64), timeout=0.000_001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert embed(stub, ["still serving"]).shape[0] == 1


def test_health_and_reflection(server: ServerThread) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_metrics_families_and_consistency(server: ServerThread, stub: pb_grpc.InferenceStub) -> None:
    before = _scrape(server.metrics_url)
    embed(stub, TEXTS)
    stub.Score(pb.ScoreRequest(query_text="q", candidates=["c", "d"]))
    status_of(stub.Embed, pb.EmbedRequest(texts=[]))
    after = _scrape(server.metrics_url)

    for family in (
        "recserve_requests_total",
        "recserve_request_duration_seconds_count",
        "recserve_tokenize_seconds_count",
        "recserve_queue_wait_seconds_count",
        "recserve_inference_seconds_count",
        "recserve_batch_size_count",
        "recserve_batch_tokens_count",
        "recserve_padding_ratio_count",
        "recserve_queue_texts",
        "recserve_in_flight",
        "recserve_backlog_seconds",
        "recserve_failures_total",
        "recserve_model_info",
    ):
        assert any(name == family for name, _ in after), family

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, labels) - _value(before, name, labels)

    # Every text that reached the model was answered, and each call was counted once with its code.
    assert delta("recserve_batch_size_sum") == delta("recserve_texts_total") == len(TEXTS) + 3
    assert delta("recserve_requests_total", rpc="Embed", code="OK") == 1
    assert delta("recserve_requests_total", rpc="Embed", code="INVALID_ARGUMENT") == 1
    assert delta("recserve_failures_total", reason="invalid") == 1
    assert _value(after, "recserve_in_flight", {}) == 0
    assert _value(after, "recserve_model_info", {"precision": "fp32", "provider": CPU}) == 1


def _scrape(url: str) -> list[tuple[str, tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.name, (sample.labels, sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _value(
    samples: list[tuple[str, tuple[dict[str, str], float]]], name: str, labels: dict[str, str]
) -> float:
    return sum(
        value
        for sample_name, (sample_labels, value) in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


# --- lifecycle ------------------------------------------------------------------------------------------
def test_not_serving_until_warm_up_ends(tiny_repo: Path) -> None:
    bound: list[int] = []
    is_bound, release = threading.Event(), threading.Event()

    async def hold(server: RunningServer) -> None:
        bound.append(server.port)
        is_bound.set()
        await asyncio.to_thread(release.wait, 30)

    thread = ServerThread(settings_for(tiny_repo), before_ready=hold)
    starter = threading.Thread(target=thread.start)
    starter.start()
    try:
        assert is_bound.wait(60)
        channel = grpc.insecure_channel(f"127.0.0.1:{bound[0]}")
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        code, details = status_of(pb_grpc.InferenceStub(channel).Embed, pb.EmbedRequest(texts=["x"]))
        assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
        release.set()
        starter.join(30)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        starter.join(30)
        thread.stop()


def test_a_dead_batch_loop_turns_the_server_not_serving(tiny_repo: Path) -> None:
    with serving(tiny_repo) as server:
        stub, health = server.stub(), health_pb2_grpc.HealthStub(server.channel())
        assert embed(stub, ["before"]).shape[0] == 1
        assert server.server is not None
        batcher = server.server.engine.batcher

        def bug(now: float) -> None:
            raise RuntimeError("a bug in batch assembly")

        batcher._cut = bug  # type: ignore[method-assign]  # the next wake-up of the loop dies
        code, _ = status_of(stub.Embed, pb.EmbedRequest(texts=["the call that meets the bug"]))
        assert code == grpc.StatusCode.UNAVAILABLE  # answered, not hung
        reply = None
        for _ in range(200):
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            threading.Event().wait(0.01)
        assert reply is not None and reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["later"]))
        assert code == grpc.StatusCode.UNAVAILABLE and "not serving" in details


def test_cross_encoder_scores_match_pytorch(tiny_cross_repo: Path, tiny_cross_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    query, candidates = (
        "red running shoes",
        ["nike pegasus road shoe", "cast iron pan", "", "trail runner " * 80],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_cross_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_checkpoint).eval()
    with serving(tiny_cross_repo) as s:
        stub = s.stub()
        info = stub.Info(pb.InfoRequest())
        batch = tokenizer(
            [query] * len(candidates),
            candidates,
            padding=True,
            truncation=True,
            max_length=info.max_tokens,
            return_tensors="pt",
        )
        with torch.no_grad():
            expected = model(**batch).logits[:, -1].numpy()
        reply = stub.Score(pb.ScoreRequest(query_text=query, candidates=candidates))
        assert info.task == "cross-encoder"
        np.testing.assert_allclose(reply.scores, expected, atol=1e-4)
        assert list(reply.truncated) == [3]
        code, details = status_of(stub.Embed, pb.EmbedRequest(texts=["x"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cross-encoder" in details
        code, details = status_of(stub.Score, _history(["a"], []))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "embedding model" in details


def test_generated_protobuf_modules_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recserve.protos", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, recserve.cli, recserve.server.app; recserve.cli.build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model-repo", "/no/such/repo"], "does not exist"),
        (["--max-batch-size", "512"], "window_texts (256) must be at least max_batch_size (512)"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(
    tiny_repo: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from recserve.cli import main

    assert main(["serve", "--model-repo", str(tiny_repo), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
