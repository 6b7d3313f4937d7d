"""The Python client: limits-aware splitting, decoding, status -> exception, against a fake and a real server.

The fake server (tests/support/fake_server.py) is shared with the harness's tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from recserve.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    ProtocolError,
    RecserveError,
    ResourceExhausted,
    Unavailable,
    decode_vectors,
    plan_chunks,
)
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_server import FakeInference, FakeServer, fake_server, fake_vector


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    limits = pb.Limits(max_texts_per_call=3, max_message_bytes=64 * 1024 * 1024)
    with fake_server(FakeInference(limits=limits)) as server:
        yield server


TEXTS = [f"{chr(97 + i)} text number {i}" + "!" * i for i in range(10)]
EXPECTED = np.array([fake_vector(t, 8) for t in TEXTS], dtype=np.float32)


# --- planning and decoding, no server ------------------------------------------------------------------


def test_chunks_respect_count_and_bytes_and_keep_order() -> None:
    texts = ["x" * 10] * 7
    assert plan_chunks(texts, max_texts=3, budget_bytes=10_000) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    # 12 bytes a text on the wire (tag + length + 10): a 30-byte budget fits two.
    assert [s.stop - s.start for s in plan_chunks(texts, max_texts=100, budget_bytes=30)] == [2, 2, 2, 1]
    # The reply counts too: 100 bytes of vector per text and a 250-byte budget allow two per call.
    sizes = [
        s.stop - s.start
        for s in plan_chunks(texts, max_texts=100, budget_bytes=250, response_bytes_per_text=100)
    ]
    assert sizes == [2, 2, 2, 1]
    # A text too big for any call still goes alone (the server then says what is wrong), never dropped.
    assert plan_chunks(["y" * 100, "z"], max_texts=10, budget_bytes=50) == [slice(0, 1), slice(1, 2)]
    assert plan_chunks([], max_texts=3, budget_bytes=100) == [slice(0, 0)]


def test_decode_checks_sizes() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    reply = pb.EmbedResponse(
        dimension=3, encoding=pb.VECTOR_ENCODING_PACKED_F16, packed=vectors.astype("<f2").tobytes()
    )
    np.testing.assert_array_equal(decode_vectors(reply, 2), vectors)
    with pytest.raises(ProtocolError, match="expected 3 x 3"):
        decode_vectors(reply, 3)


# --- against the fake server -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["f32", "f16", "float"])
def test_sync_embed_splits_to_the_advertised_limit_and_reassembles(fake: FakeServer, encoding: str) -> None:
    with Client(fake.address) as client:
        got = client.embed(TEXTS, encoding=encoding)  # type: ignore[arg-type]
        assert client.health() == "SERVING"
    np.testing.assert_array_equal(got, EXPECTED)
    assert fake.inference is not None
    assert fake.inference.batches == [3, 3, 3, 1]  # max_texts_per_call=3
    assert fake.inference.calls["Info"] == 1  # limits are fetched once


async def test_async_embed_and_score_split_and_keep_order(fake: FakeServer) -> None:
    async with AsyncClient(fake.address) as client:
        got = await client.embed(TEXTS)
        scores = await client.score(TEXTS, query="q")
        hist = await client.score(TEXTS, history=["h1", "h2"], weights=[1.0, 0.5])
    np.testing.assert_array_equal(got, EXPECTED)
    expected_scores = np.array([len(t) for t in TEXTS], dtype=np.float32)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(hist, expected_scores)
    assert fake.inference is not None
    # The query (or the history) counts against max_texts_per_call=3 in every chunk: 5 chunks of 1 + 2,
    # then 10 of 2 + 1.
    assert sorted(fake.inference.batches[:4]) == [1, 3, 3, 3]
    assert fake.inference.batches[4:] == [3] * 15


def test_status_codes_become_exceptions_with_code_and_details(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        with pytest.raises(InvalidArgument) as bad:
            client.embed(["ok", "bad"])
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details == "texts[1] is bad"
        with pytest.raises(ResourceExhausted, match="queue is full"):
            client.embed(["busy"])
        with pytest.raises(NotFound):
            client.health("no.such.Service")
        with pytest.raises(ValueError, match="exactly one of query= and history="):
            client.score(["c"])
    with Client("127.0.0.1:1", deadline=2) as nowhere, pytest.raises(Unavailable) as down:
        nowhere.info()
    assert isinstance(down.value, RecserveError)


# --- against the real server ------------------------------------------------------------------------------


def test_client_against_the_real_server(tiny_repo: Path) -> None:
    from tests.support.serving import serving

    with serving(tiny_repo, max_texts_per_call=4) as server, Client(server.address) as client:
        info = client.info()
        assert info.limits.max_texts_per_call == 4
        assert client.health() == "SERVING"
        texts = [f"item {i} " + "word " * i for i in range(11)]
        together = client.embed(texts)  # three calls under the limit, reassembled
        alone = np.concatenate([client.embed([t]) for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-5)
        assert together.shape == (11, info.dimension)
        np.testing.assert_allclose(client.embed(texts, encoding="f16"), together, atol=2e-3)
        scores = client.score(texts[1:], query=texts[0])
        np.testing.assert_allclose(scores, together[1:] @ together[0], atol=1e-5)
        with pytest.raises(InvalidArgument):
            client.embed([])
