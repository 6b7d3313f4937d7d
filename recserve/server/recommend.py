"""Recommend: a query (text, user history or vector) -> the top k items of a catalog, optionally reranked.

Knows nothing of gRPC (service.py maps messages onto it). The query is embedded through the model's own
engine (the same admission and batching as Embed), the search runs off the event loop, and queries that
arrive while a search runs are searched together in the next one: one matrix product for all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from recserve import threads
from recserve.catalog.errors import UnknownIds
from recserve.catalog.search import Filter, Hits
from recserve.catalog.store import Catalog
from recserve.server.engine import history_weights, user_vector
from recserve.server.errors import InvalidArgument, NotFound
from recserve.server.registry import ServedModel, ServedModels
from recserve.tensors import FloatArray, IntArray


@dataclass(frozen=True)
class HistoryQuery:
    texts: Sequence[str] = ()
    item_ids: Sequence[str] = ()
    # One per text, then one per item id; empty: every item weighs 1.
    weights: Sequence[float] = ()


Query = str | HistoryQuery | FloatArray


@dataclass
class Recommendation:
    ids: list[str]
    scores: FloatArray
    # "retrieval" or "rerank", per item.
    stages: list[str]
    retrieval_scores: FloatArray
    retrieve_s: float
    rerank_s: float
    # Texts (and pairs) that went through a model: the query or history texts, and the reranked items.
    model_texts: int = 0


@dataclass
class _Search:
    vector: FloatArray
    k: int
    exclude: Sequence[str]
    filters: tuple[Filter, ...]
    future: asyncio.Future[Hits] = field(repr=False)


class CatalogSearcher:
    """One catalog's searches, on one worker thread, gathered: while a search runs, the queries that
    arrive wait together and go into the next one (a caller waits for at most one search before its own).
    """

    def __init__(self, name: str, catalog: Catalog) -> None:
        self.name = name
        self.catalog = catalog
        self._executor = ThreadPoolExecutor(
            1,
            thread_name_prefix=f"search-{name}",
            initializer=threads.name_thread,
            initargs=(threads.SEARCH,),
        )
        self._pending: dict[bool, list[_Search]] = {True: [], False: []}
        self._worker: asyncio.Task[None] | None = None
        # Searches run, each for one or more gathered queries (tests read it).
        self.runs = 0

    @property
    def waiting(self) -> int:
        """Queries waiting for the next search."""
        return len(self._pending[True]) + len(self._pending[False])

    async def search(
        self, vector: FloatArray, k: int, exclude: Sequence[str], filters: Sequence[Filter], exact: bool
    ) -> Hits:
        future: asyncio.Future[Hits] = asyncio.get_running_loop().create_future()
        self._pending[exact].append(_Search(vector, k, exclude, tuple(filters), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending[True] or self._pending[False]:
            for exact in (True, False):
                # Callers that went away meanwhile are left out.
                group = [s for s in self._pending[exact] if not s.future.done()]
                self._pending[exact] = []
                if not group:
                    continue
                try:
                    found = await loop.run_in_executor(self._executor, self._run, group, exact)
                except Exception:
                    # One query's bad argument must not fail its batch mates: each alone gets its own answer.
                    for one in group:
                        try:
                            alone = await loop.run_in_executor(self._executor, self._run, [one], exact)
                        except Exception as exc:
                            if not one.future.done():
                                one.future.set_exception(exc)
                        else:
                            if not one.future.done():
                                one.future.set_result(alone[0])
                    continue
                for one, hits in zip(group, found, strict=True):
                    if not one.future.done():
                        one.future.set_result(hits)

    def _run(self, group: Sequence[_Search], exact: bool) -> list[Hits]:
        self.runs += 1
        return self.catalog.search(
            np.stack([s.vector for s in group]),
            [s.k for s in group],
            exclude=[s.exclude for s in group],
            filters=[s.filters for s in group],
            exact=exact,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Recommender:
    """Recommend over the served models and the loaded catalogs."""

    def __init__(self, models: ServedModels, catalogs: Sequence[CatalogSearcher]) -> None:
        self.models = models
        self._catalogs = {searcher.name: searcher for searcher in catalogs}

    @property
    def names(self) -> list[str]:
        return list(self._catalogs)

    def catalog(self, name: str) -> CatalogSearcher:
        """The catalog a call named ("" = the only one); NotFound listing the loaded ones otherwise."""
        if not self._catalogs:
            raise NotFound(
                "this server has no catalog: start it with --catalog NAME=DIR (see `recserve index`)"
            )
        if not name:
            if len(self._catalogs) > 1:
                raise InvalidArgument(f"name the catalog: this server has {', '.join(self._catalogs)}")
            return next(iter(self._catalogs.values()))
        searcher = self._catalogs.get(name)
        if searcher is None:
            raise NotFound(f"no catalog named {name[:100]!r}; the catalogs are: {', '.join(self._catalogs)}")
        return searcher

    @staticmethod
    def rows_of(catalog: Catalog, ids: Sequence[str], field_name: str) -> IntArray:
        """Row numbers of a request's `ids`; InvalidArgument naming the field and the unknown ones (the
        caller's mistake, not a missing resource)."""
        try:
            return catalog.index_of(list(ids))
        except UnknownIds as exc:
            raise InvalidArgument(f"{field_name}: {exc}") from None

    def stored_vectors(self, catalog: Catalog, ids: Sequence[str], field_name: str) -> FloatArray:
        """The stored (normalised) vectors of a request's `ids`, as float32."""
        return np.asarray(catalog.vectors[self.rows_of(catalog, ids, field_name)], dtype=np.float32)

    def check_built_by(self, catalog: CatalogSearcher, served: ServedModel) -> None:
        if served.model.manifest.source.weights_sha256 != catalog.catalog.weights_sha256:
            raise InvalidArgument(
                f"catalog {catalog.name} was built by {catalog.catalog.model_name} (weights sha256 "
                f"{catalog.catalog.weights_sha256[:12]}...), not by model {served.name} (weights sha256 "
                f"{served.model.manifest.source.weights_sha256[:12]}...): name the model that built it"
            )

    async def recommend(
        self,
        model: str,
        catalog_name: str,
        query: Query,
        k: int,
        exclude_ids: Sequence[str],
        filters: Sequence[Filter],
        approximate: bool,
        rerank_model: str,
        rerank_k: int,
        strict: bool,
        deadline: float | None,
    ) -> Recommendation:
        started = time.perf_counter()
        searcher = self.catalog(catalog_name)
        catalog = searcher.catalog
        reranker = self._reranker(rerank_model, query)
        wanted = max(k, rerank_k) if reranker is not None else k
        if exclude_ids:
            self.rows_of(catalog, exclude_ids, "exclude_ids")
        vector = await self._query_vector(model, searcher, query, strict, deadline)
        hits = await searcher.search(vector, wanted, exclude_ids, filters, exact=not approximate)
        retrieve_s = time.perf_counter() - started
        embedded = 1 if isinstance(query, str) else len(query.texts) if isinstance(query, HistoryQuery) else 0
        if reranker is None or not hits.ids:
            shown = min(k, len(hits.ids))
            return Recommendation(
                hits.ids[:k],
                hits.scores[:k],
                ["retrieval"] * shown,
                hits.scores[:k],
                retrieve_s,
                0.0,
                embedded,
            )
        assert isinstance(query, str)
        reranked = await reranker.engine.score(
            query, catalog.texts_for(hits.indices), "cosine", strict, deadline
        )
        # Best first, ties broken by id, as retrieval does.
        order = sorted(range(len(hits.ids)), key=lambda i: (-float(reranked.scores[i]), hits.ids[i]))[:k]
        return Recommendation(
            [hits.ids[i] for i in order],
            reranked.scores[order],
            ["rerank"] * len(order),
            hits.scores[order],
            retrieve_s,
            time.perf_counter() - started - retrieve_s,
            embedded + len(hits.ids),
        )

    def _reranker(self, name: str, query: Query) -> ServedModel | None:
        if not name:
            return None
        served = self.models.get(name)
        if served.model.manifest.task != "cross-encoder":
            raise InvalidArgument(
                f"rerank_model {name} is a {served.model.manifest.task}; reranking needs a cross-encoder"
            )
        if not isinstance(query, str):
            raise InvalidArgument("rerank scores (query, item) text pairs: send query_text")
        return served

    async def _query_vector(
        self, model: str, searcher: CatalogSearcher, query: Query, strict: bool, deadline: float | None
    ) -> FloatArray:
        catalog = searcher.catalog
        if isinstance(query, np.ndarray):
            if query.shape != (catalog.dimension,) or not np.isfinite(query).all() or not query.any():
                raise InvalidArgument(
                    f"query_vector must hold {catalog.dimension} finite values, not all zero "
                    f"(it has {query.size})"
                )
            return query.astype(np.float32)
        served = self.models.get(model)
        if served.model.manifest.task != "embedding":
            raise InvalidArgument(
                f"model {served.name} is a {served.model.manifest.task}; the query is embedded by an"
                " embedding model: name the one that built the catalog"
            )
        self.check_built_by(searcher, served)
        if isinstance(query, str):
            result = await served.engine.embed([query], True, strict, deadline)
            vector: FloatArray = result.vectors[0]
            return vector
        weights = history_weights(query.weights, len(query.texts) + len(query.item_ids))
        parts = []
        if query.texts:
            parts.append((await served.engine.embed(query.texts, True, strict, deadline)).vectors)
        if query.item_ids:
            parts.append(self.stored_vectors(catalog, query.item_ids, "user_history.item_ids"))
        if not parts:
            raise InvalidArgument("user_history is empty: send texts or item_ids")
        return user_vector(weights, np.concatenate(parts).astype(np.float32))
