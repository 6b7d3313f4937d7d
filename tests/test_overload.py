"""Overload and callers that go away, end to end on the fake model: admission by time, and tokenising that
stops within a chunk once its caller is gone."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from recserve.server.engine import CHUNK_TEXTS, chunks
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_model import fake_model
from tests.support.serving import embed, serving

FAKE = Path("fake")


def test_chunks_bound_texts_and_characters_and_keep_order() -> None:
    texts = [f"t{i}" for i in range(150)]
    assert [len(c) for c in chunks(texts)] == [CHUNK_TEXTS, CHUNK_TEXTS, 150 - 2 * CHUNK_TEXTS]
    long = ["x" * 200_000, "y" * 100_000, "z", "w" * 300_000]
    assert [list(c) for c in chunks(long)] == [[long[0]], [long[1], long[2]], [long[3]]]
    assert [t for c in chunks(texts) for t in c] == texts
    assert list(chunks([])) == []


def test_a_call_that_cannot_finish_by_its_deadline_is_refused_at_once_without_tokenising() -> None:
    model = fake_model()
    model.backend.delay_s = 0.02  # per batch: a modest token rate the batcher can measure
    # NOTE: a queue bound far above the backlog, so that only the hurried call's deadline refuses it (on a
    # busy machine the measured rate, and so the backlog's estimate, varies).
    with serving(FAKE, model, metrics_port=None, max_queue_seconds=120.0) as server:
        stub = server.stub()
        for i in range(4):
            embed(stub, [f"warm {i}"])
        assert server.server is not None
        batcher = server.server.engine.batcher
        rate = batcher.stats.tokens_per_second
        assert rate > 0
        model.backend.gate.clear()
        blocker = stub.Embed.future(pb.EmbedRequest(texts=["blocker"]))
        assert model.backend.wait_entered(5)
        # Many one-text calls (four tokens each): at least two seconds of work at the measured rate, and
        # as many turns of fair batching.
        backlog = [f"queued {i}" for i in range(max(100, int(rate * 2 / 4) + 1))]
        queued = [stub.Embed.future(pb.EmbedRequest(texts=[text])) for text in backlog]
        deadline = time.monotonic() + 10
        while batcher.stats.queued_texts < len(backlog) and time.monotonic() < deadline:
            time.sleep(0.005)
        tokenised = model.tokenizer.texts_encoded
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(texts=["in a hurry"]), timeout=1.0)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "deadline leaves" in refused.value.details()
        assert model.tokenizer.texts_encoded == tokenised
        patient = stub.Embed.future(
            pb.EmbedRequest(texts=["patient"], encoding=pb.VECTOR_ENCODING_PACKED_F32)
        )
        model.backend.gate.set()
        assert blocker.result(10).dimension == 8
        assert all(len(call.result(30).vectors) == 1 for call in queued)
        reply = patient.result(10)
        np.testing.assert_array_equal(
            np.frombuffer(reply.packed, dtype="<f4").reshape(1, -1), model.expected(["patient"])
        )


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_big_call_whose_caller_goes_stops_tokenising_and_the_next_call_is_served(how: str) -> None:
    model = fake_model()
    model.tokenizer.delay_s = 0.05  # per chunk of CHUNK_TEXTS texts
    texts = [f"text {i}" for i in range(CHUNK_TEXTS * 30)]  # 30 chunks: 1.5 s of tokenising
    with serving(FAKE, model, metrics_port=None, tokenizer_threads=1) as server:
        stub = server.stub()
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as gone:
                stub.Embed(pb.EmbedRequest(texts=texts), timeout=0.3)
            assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            call = stub.Embed.future(pb.EmbedRequest(texts=texts))
            assert model.tokenizer.wait_encoded(CHUNK_TEXTS * 2)
            call.cancel()
        time.sleep(0.3)  # the chunk in its thread ends; no other may start
        stopped_at = model.tokenizer.texts_encoded
        time.sleep(0.3)  # six more chunks' worth of time
        assert model.tokenizer.texts_encoded == stopped_at < len(texts) // 2
        np.testing.assert_allclose(embed(stub, ["next"]), model.expected(["next"]), atol=1e-6)
        assert server.server is not None
        assert server.server.engine.batcher.stats.queued_texts == 0
