"""Recommend and Score by id on a real server over a real catalog, built (by `build_catalog`, as `recserve
index` does) with a fake model behind the server's seam: the right answers are computable here.

The catalog's own search (filters, ties, ANN) is tested in tests/test_catalog*.py; these tests pin what
the server adds: the query kinds, rerank, gathering, and the refusals.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from recserve.catalog.build import build_catalog
from recserve.catalog.errors import ModelMismatch
from recserve.catalog.items import read_items
from recserve.catalog.store import Catalog
from recserve.server.app import check_catalog
from recserve.server.engine import user_vector
from recserve.tensors import l2_normalize
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.fake_model import FakeModel, fake_manifest, fake_model
from tests.support.serving import ServerThread, settings_for

FAKE = Path("/nonexistent/fake-repo")
CATEGORIES = ("shoes", "audio", "kitchen")


def _item(i: int) -> dict[str, object]:
    return {
        "id": f"item-{i:03d}",
        "text": f"product {i} " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(i % 5 + 1)),
        "category": CATEGORIES[i % 3],
        "price": float(i % 40),
    }


ITEMS = [_item(i) for i in range(120)]


@pytest.fixture(scope="module")
def models() -> dict[str, FakeModel]:
    return {"users": fake_model("embedding", dim=8), "rerank": fake_model("cross-encoder")}


@pytest.fixture(scope="module")
def catalog(models: dict[str, FakeModel], tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("catalog")
    source = root / "items.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    settings = settings_for(FAKE, warmup=False, metrics_port=None)
    build_catalog(models["users"], settings, read_items(source), root / "items", dtype="float32")
    return Catalog.open(root / "items")


@pytest.fixture(scope="module")
def server(models: dict[str, FakeModel], catalog: Catalog) -> Iterator[ServerThread]:
    thread = ServerThread(
        settings_for(FAKE, warmup=False, metrics_port=None),
        list(models.items()),
        catalogs=[("items", catalog)],
    ).start()
    yield thread
    thread.stop()


def expected_top(catalog: Catalog, query: np.ndarray, k: int, keep: object = None) -> list[str]:
    """Brute force: cosine against every stored vector, best first, ties by id."""
    scores = np.asarray(catalog.vectors, np.float32) @ l2_normalize(query[None, :].astype(np.float32))[0]
    rows = [r for r in range(len(catalog)) if keep is None or keep(ITEMS_BY_ID[catalog.ids[r]])]  # type: ignore[operator]
    rows.sort(key=lambda r: (-float(scores[r]), catalog.ids[r]))
    return [catalog.ids[r] for r in rows[:k]]


ITEMS_BY_ID = {str(item["id"]): item for item in ITEMS}


def ids_of(reply: pb.RecommendResponse) -> list[str]:
    return [item.id for item in reply.items]


def status_of(stub: pb_grpc.InferenceStub, request: pb.RecommendRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(request, timeout=10)
    return info.value.code(), info.value.details() or ""


def test_a_text_query_gets_the_nearest_items_best_first(
    server: ServerThread, models: dict[str, FakeModel], catalog: Catalog
) -> None:
    query = "red running shoes"
    reply = server.stub().Recommend(pb.RecommendRequest(query_text=query, k=10))
    vector = models["users"].expected([query])[0]
    assert ids_of(reply) == expected_top(catalog, vector, 10)
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert {item.stage for item in reply.items} == {pb.STAGE_RETRIEVAL}
    assert reply.catalog == "items" and reply.retrieve_ms > 0 and reply.rerank_ms == 0


def test_a_history_of_texts_and_ids_is_the_weighted_user_vector(
    server: ServerThread, models: dict[str, FakeModel], catalog: Catalog
) -> None:
    history = pb.RecommendHistory(
        texts=["jazz vinyl"], item_ids=["item-004", "item-010"], weights=[1, 2, 0.5]
    )
    reply = server.stub().Recommend(pb.RecommendRequest(user_history=history, k=5))
    rows = np.concatenate(
        [models["users"].expected(["jazz vinyl"]), catalog.vectors_for(["item-004", "item-010"])]
    )
    vector = user_vector(np.array([1.0, 2.0, 0.5]), rows)
    assert ids_of(reply) == expected_top(catalog, vector, 5)


def test_a_vector_query_exclusions_and_filters(server: ServerThread, catalog: Catalog) -> None:
    vector = np.asarray(catalog.vectors_for(["item-007"])[0])
    stub = server.stub()
    reply = stub.Recommend(pb.RecommendRequest(query_vector=pb.QueryVector(values=vector.tolist()), k=3))
    assert ids_of(reply)[0] == "item-007"
    reply = stub.Recommend(
        pb.RecommendRequest(
            query_vector=pb.QueryVector(values=vector.tolist()),
            k=8,
            exclude_ids=["item-007"],
            filters=[
                pb.AttributeFilter(attribute="category", values=["audio", "kitchen"]),
                pb.AttributeFilter(attribute="price", min=5, max=20),
            ],
        )
    )

    def keep(item: dict[str, object]) -> bool:
        price = float(item["price"])  # type: ignore[arg-type]
        return item["id"] != "item-007" and item["category"] in ("audio", "kitchen") and 5 <= price <= 20

    assert ids_of(reply) == expected_top(catalog, vector, 8, keep)


def test_rerank_orders_the_retrieved_items_by_the_cross_encoder(
    server: ServerThread, models: dict[str, FakeModel], catalog: Catalog
) -> None:
    query = "wireless headphones"
    reply = server.stub().Recommend(
        pb.RecommendRequest(query_text=query, k=4, rerank_model="rerank", rerank_k=12)
    )
    retrieved = expected_top(catalog, models["users"].expected([query])[0], 12)
    texts = catalog.texts_for(catalog.index_of(retrieved))
    cross = models["rerank"]
    logits = [float(cross.backend.row(item)[-1]) for item in cross.tokenizer.encode_pairs(query, texts)]
    best = sorted(range(12), key=lambda i: (-logits[i], retrieved[i]))[:4]
    assert ids_of(reply) == [retrieved[i] for i in best]
    np.testing.assert_allclose([item.score for item in reply.items], [logits[i] for i in best], rtol=1e-6)
    assert {item.stage for item in reply.items} == {pb.STAGE_RERANK}
    assert all(item.retrieval_score != 0 for item in reply.items)
    assert reply.rerank_ms > 0


def test_score_by_id_uses_the_catalog_vectors(
    server: ServerThread, models: dict[str, FakeModel], catalog: Catalog
) -> None:
    ids = ["item-001", "item-050", "item-099"]
    reply = server.stub().Score(
        pb.ScoreRequest(query_text="a query", candidates=["a text"], candidate_ids=ids)
    )
    query = models["users"].expected(["a query"])[0]
    rows = np.concatenate([models["users"].expected(["a text"]), catalog.vectors_for(ids)])
    np.testing.assert_allclose(reply.scores, l2_normalize(rows) @ query, rtol=1e-5)


def test_concurrent_queries_are_searched_together_and_each_gets_its_own(
    server: ServerThread, models: dict[str, FakeModel], catalog: Catalog
) -> None:
    """With the search thread held, the queries that arrive wait together; released, they go into one
    search (two at most: the first may have left alone), and each caller gets its own answer."""
    queries = [f"query number {i}" for i in range(40)]
    assert server.server is not None
    searcher = server.server.recommender.catalog("items")
    held = threading.Event()
    searcher._executor.submit(held.wait, 10)  # the one search thread is busy until `held` is set
    runs_before = searcher.runs

    async def main() -> list[pb.RecommendResponse]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [
                asyncio.ensure_future(stub.Recommend(pb.RecommendRequest(query_text=q, k=3))) for q in queries
            ]
            for _ in range(200):
                if searcher.waiting >= len(queries) - 1:
                    break
                await asyncio.sleep(0.02)
            held.set()
            return await asyncio.gather(*calls)

    try:
        replies = asyncio.run(main())
    finally:
        held.set()
    vectors = models["users"].expected(queries)
    for reply, vector in zip(replies, vectors, strict=True):
        assert ids_of(reply) == expected_top(catalog, vector, 3)
    assert searcher.runs - runs_before <= 2


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.RecommendRequest(query_text="q", k=0), grpc.StatusCode.INVALID_ARGUMENT, "k is 0"),
        (pb.RecommendRequest(query_text="q", k=100_000), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and"),
        (pb.RecommendRequest(k=3), grpc.StatusCode.INVALID_ARGUMENT, "set the query"),
        (pb.RecommendRequest(query_text="q", k=3, catalog="nope"), grpc.StatusCode.NOT_FOUND, "items"),
        (pb.RecommendRequest(query_text="q", k=3, model="nope"), grpc.StatusCode.NOT_FOUND, "users, rerank"),
        (
            pb.RecommendRequest(query_text="q", k=3, exclude_ids=["item-001", "ghost"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exclude_ids: 1 id(s) not in the catalog: 'ghost'",
        ),
        (
            pb.RecommendRequest(user_history=pb.RecommendHistory(item_ids=["ghost"]), k=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "user_history.item_ids",
        ),
        (
            pb.RecommendRequest(
                query_text="q", k=3, filters=[pb.AttributeFilter(attribute="colour", values=["red"])]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "colour",
        ),
        (
            pb.RecommendRequest(query_vector=pb.QueryVector(values=[1.0, 2.0]), k=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "8 finite values",
        ),
        (
            pb.RecommendRequest(query_text="q", k=3, rerank_model="users"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs a cross-encoder",
        ),
        (
            pb.RecommendRequest(query_text="q", k=3, model="rerank"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "embedded by an embedding model",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_recommend_calls_get_a_clear_status_and_the_server_keeps_serving(
    server: ServerThread, request_: pb.RecommendRequest, code: grpc.StatusCode, words: str
) -> None:
    stub = server.stub()
    got, details = status_of(stub, request_)
    assert got == code and words in details, details
    assert ids_of(stub.Recommend(pb.RecommendRequest(query_text="still fine", k=1)))


def test_a_catalog_built_by_another_model_is_refused_naming_both_hashes(catalog: Catalog) -> None:
    other = fake_model("embedding", dim=8)
    other_manifest = fake_manifest("embedding", dim=8).model_copy(
        update={"source": fake_manifest().source.model_copy(update={"weights_sha256": "f" * 64})}
    )
    stranger = FakeModel(other_manifest, other.tokenizer, other.backend)
    with pytest.raises(ModelMismatch) as info:
        check_catalog(catalog, [stranger])
    assert catalog.weights_sha256 in str(info.value) and "f" * 64 in str(info.value)
    check_catalog(catalog, [stranger, fake_model("embedding")])  # one served model built it: accepted
