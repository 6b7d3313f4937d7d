"""Top-k search over a catalog: exact (one float32 matrix product per block of rows, for every query at
once) or approximate (the HNSW graph, post-filtered, falling back to exact).

Exclusions and filters take effect before the cut (their scores become -inf), so k results come back
whenever k rows qualify. Results are best first; equal scores go by id (rows are stored in id order, so the
row number decides). Every function is pure over an immutable Catalog: safe from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from recserve.catalog.errors import InvalidQuery
from recserve.tensors import FloatArray, IntArray

if TYPE_CHECKING:
    from recserve.catalog.store import Catalog, Column

MAX_K = 1000
# Rows scored per block: the float32 copy of a float16 block ([rows, dim]) and the block's scores
# ([queries, rows]) are the search's only large allocations (about 25 MB at 384 dimensions).
CHUNK_ROWS = 16384
# Approximate search fetches this many candidates per wanted result (plus the excluded ids), to leave k
# after post-filtering; when fewer survive, that query is answered exactly.
OVERFETCH = 4
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Filter:
    """A condition on one attribute; a query's filters must all hold (missing values never match).

    String attribute: `values`, the item's value is one of them. Number: `min` and/or `max`, inclusive.
    """

    attribute: str
    values: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        # A tuple whatever the caller passed, so that equal filters hash equal (see search's grouping).
        object.__setattr__(self, "values", tuple(self.values))


@dataclass(frozen=True)
class Hits:
    """One query's results, best first: ids, cosine scores (float32), and row numbers (for texts_for)."""

    ids: list[str]
    scores: FloatArray
    indices: IntArray


class _Conditions:
    """A query's filters compiled against the catalog's columns."""

    def __init__(self, tests: list[tuple[Column, Filter, IntArray | None]]) -> None:
        self._tests = tests

    def mask(self, rows: slice | IntArray) -> BoolArray:
        """Which of `rows` pass every filter."""
        keep: BoolArray | None = None
        for column, condition, codes in self._tests:
            if column.type == "string":
                assert codes is not None
                values = column.codes[rows]
                passed = values == codes[0] if len(codes) == 1 else np.isin(values, codes)
            else:
                numbers = column.values[rows]
                # NaN (no value) fails both comparisons.
                passed = np.ones(len(numbers), dtype=bool)
                if condition.min is not None:
                    passed &= numbers >= condition.min
                if condition.max is not None:
                    passed &= numbers <= condition.max
            keep = passed if keep is None else keep & passed
        assert keep is not None
        return keep


def compile_filters(catalog: Catalog, filters: Sequence[Filter]) -> _Conditions | None:
    """Checks `filters` against the schema (InvalidQuery names the problem); None when there are none."""
    tests: list[tuple[Column, Filter, IntArray | None]] = []
    for position, condition in enumerate(filters):
        where = f"filters[{position}]"
        column = catalog.attributes.get(condition.attribute)
        if column is None:
            known = ", ".join(sorted(catalog.attributes)) or "none"
            raise InvalidQuery(
                f"{where}: the catalog has no attribute {condition.attribute!r} (it has: {known})"
            )
        ranged = condition.min is not None or condition.max is not None
        if column.type == "string":
            if ranged or not condition.values:
                raise InvalidQuery(
                    f"{where}: {condition.attribute!r} is a string attribute: give values to match, "
                    "not min/max"
                )
            position_of = {value: i for i, value in enumerate(column.vocabulary)}
            # A value no item has matches nothing (not an error: a category may be empty today).
            codes = np.asarray(
                sorted({position_of[v] for v in condition.values if v in position_of}) or [-2], dtype=np.int64
            )
            tests.append((column, condition, codes))
            continue
        if condition.values or not ranged:
            raise InvalidQuery(
                f"{where}: {condition.attribute!r} is a number attribute: give min and/or max, not values"
            )
        for bound in (condition.min, condition.max):
            if bound is not None and not math.isfinite(bound):
                raise InvalidQuery(f"{where}: min and max must be finite numbers, got {bound}")
        if condition.min is not None and condition.max is not None and condition.min > condition.max:
            raise InvalidQuery(f"{where}: min {condition.min} is above max {condition.max}")
        tests.append((column, condition, None))
    return _Conditions(tests) if tests else None


def _check_queries(queries: FloatArray, dimension: int) -> FloatArray:
    array = np.asarray(queries)
    if array.ndim != 2 or array.shape[1] != dimension or array.shape[0] == 0:
        raise InvalidQuery(
            f"queries must be a [count >= 1, {dimension}] array (the catalog's dimension), got "
            f"{list(array.shape)}"
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidQuery("queries hold NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise InvalidQuery("a query vector is all zeros: it has no direction to search along")
    # Scores are cosine similarities whatever the caller's scale (catalog rows are unit length).
    unit: FloatArray = np.ascontiguousarray(array / norms, dtype=np.float32)
    return unit


def _check_k(k: int | Sequence[int], queries: int) -> list[int]:
    ks = [k] * queries if isinstance(k, int) else list(k)
    if len(ks) != queries:
        raise InvalidQuery(f"{len(ks)} values of k for {queries} queries: give one, or one per query")
    for value in ks:
        if not 1 <= value <= MAX_K:
            raise InvalidQuery(f"k is {value}; it must be between 1 and {MAX_K}")
    return ks


def search(
    catalog: Catalog,
    queries: FloatArray,
    k: int | Sequence[int],
    exclude: Sequence[Collection[str]] | None = None,
    filters: Sequence[Sequence[Filter]] | None = None,
    exact: bool = True,
) -> list[Hits]:
    """The top `k` rows for each row of `queries` ([q, dimension]; normalised here), one Hits per query.

    `k` is one number or one per query (1..MAX_K; fewer hits when fewer rows qualify). `exclude` and
    `filters` hold one entry per query (or are None): ids that must not come back (UnknownIds if the
    catalog lacks one), and filters that must all hold. `exact=False` uses the catalog's HNSW graph
    (InvalidQuery if it has none). Raises InvalidQuery for a bad argument.
    """
    unit = _check_queries(queries, catalog.dimension)
    count = len(unit)
    ks = _check_k(k, count)
    for name, given in (("exclude", exclude), ("filters", filters)):
        if given is not None and len(given) != count:
            raise InvalidQuery(f"{name} has {len(given)} entries for {count} queries: give one per query")
    excluded = [
        np.unique(catalog.index_of(sorted(set(ids)))) if ids else np.zeros(0, dtype=np.int64)
        for ids in (exclude or [()] * count)
    ]
    # Queries gathered from many calls often share their filters: each distinct set is compiled, and its
    # mask computed per block, once.
    compiled: dict[tuple[Filter, ...], _Conditions | None] = {}
    conditions = []
    for given_filters in filters or [()] * count:
        key = tuple(given_filters)
        if key not in compiled:
            compiled[key] = compile_filters(catalog, key) if key else None
        conditions.append(compiled[key])
    if exact:
        found = exact_top_k(catalog.vectors, unit, ks, conditions, excluded)
    else:
        found = _approximate(catalog, unit, ks, conditions, excluded)
    ids = catalog.ids
    return [Hits([ids[row] for row in rows.tolist()], scores, rows) for rows, scores in found]


# --- exact --------------------------------------------------------------------------------------------
def exact_top_k(
    vectors: np.ndarray,
    queries: FloatArray,
    ks: Sequence[int],
    conditions: Sequence[_Conditions | None],
    excluded: Sequence[IntArray],
) -> list[tuple[IntArray, FloatArray]]:
    """(rows, scores) per query: its ks[i] best rows of `vectors` that pass its conditions and are not in
    its (sorted) excluded rows; ties by row number.

    Block by block: one product for all queries in float32, -inf where a row may not come back, then per
    query the block's best k (every row tying with the k-th too, so the final cut can prefer lower rows).
    """
    total, dimension = vectors.shape
    q = len(queries)
    k_max = max(ks)
    # Queries that share one compiled _Conditions share its mask (search compiles each distinct set once).
    groups: dict[int, tuple[_Conditions, IntArray]] = {}
    for i, condition in enumerate(conditions):
        if condition is not None:
            members = groups.get(id(condition), (condition, np.zeros(0, dtype=np.int64)))[1]
            groups[id(condition)] = (condition, np.append(members, i))
    # Every (query, excluded row) pair, by row: a block takes its slice with one search.
    pair_query = np.concatenate([np.full(len(rows), i, dtype=np.int64) for i, rows in enumerate(excluded)])
    pair_row = np.concatenate(list(excluded))
    by_row = np.argsort(pair_row, kind="stable")
    pair_query, pair_row = pair_query[by_row], pair_row[by_row]

    convert = vectors.dtype != np.float32
    block_buffer = np.empty((min(CHUNK_ROWS, total), dimension), dtype=np.float32) if convert else None
    found_rows: list[list[IntArray]] = [[] for _ in range(q)]
    found_scores: list[list[FloatArray]] = [[] for _ in range(q)]
    for start in range(0, total, CHUNK_ROWS):
        stop = min(total, start + CHUNK_ROWS)
        size = stop - start
        block = vectors[start:stop]
        if block_buffer is not None:
            converted = block_buffer[:size]
            to_float32(block, converted)
            block = converted
        scores: FloatArray = queries @ block.T
        for condition, members in groups.values():
            blocked = np.flatnonzero(~condition.mask(slice(start, stop)))
            if len(blocked):
                scores[members[:, None], blocked[None, :]] = -np.inf
        lo, hi = np.searchsorted(pair_row, (start, stop))
        if hi > lo:
            scores[pair_query[lo:hi], pair_row[lo:hi] - start] = -np.inf
        keep = min(k_max, size)
        if keep < size:
            part = np.argpartition(scores, size - keep, axis=1)[:, size - keep :]
            threshold = np.take_along_axis(scores, part, axis=1).min(axis=1)
        else:
            part = np.broadcast_to(np.arange(size), (q, size))
            threshold = np.full(q, -np.inf, dtype=np.float32)
        # -inf never qualifies, however few rows are left.
        threshold = np.maximum(threshold, np.finfo(np.float32).min)
        passing = scores >= threshold[:, None]
        counts = passing.sum(axis=1)
        for i in range(q):
            # More than `keep` pass: rows tie with the k-th score (all are kept, the final cut prefers
            # lower rows). Fewer: some of the block may not come back (-inf).
            rows = part[i] if counts[i] == keep else np.flatnonzero(passing[i])
            found_rows[i].append(rows + start)
            found_scores[i].append(scores[i, rows])
    return [_cut(np.concatenate(found_rows[i]), np.concatenate(found_scores[i]), ks[i]) for i in range(q)]


def _numkong_astype() -> Callable[..., object] | None:
    try:
        import numkong  # the ann extra brings it (usearch's own kernels)
    except ImportError:
        return None
    cast: Callable[..., object] = numkong.astype
    return cast


# NOTE: numpy converts float16 to float32 one element at a time (about 1.2 ns each here: 0.46 s per 1M x 384
# catalog, ten times the float32 product itself); numkong's SIMD cast gives the same bits about three times
# faster. Exact either way: the scores, and so the results, are identical.
_FAST_CAST = _numkong_astype()


def to_float32(block: np.ndarray, out: FloatArray) -> None:
    if _FAST_CAST is not None and block.dtype == np.float16 and block.flags.c_contiguous:
        _FAST_CAST(block, "float32", out=out)
    else:
        np.copyto(out, block)


def _cut(rows: IntArray, scores: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """The best `k` of the candidates, best first, ties by row number."""
    if len(rows) > k:
        # Only the candidates that reach the k-th best score can be among the k.
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        near = scores >= threshold
        rows, scores = rows[near], scores[near]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


# --- approximate ----------------------------------------------------------------------------------------
def _approximate(
    catalog: Catalog,
    queries: FloatArray,
    ks: Sequence[int],
    conditions: Sequence[_Conditions | None],
    excluded: Sequence[IntArray],
) -> list[tuple[IntArray, FloatArray]]:
    """The graph's candidates, filtered and re-scored exactly (so the scores equal the exact path's), and
    exact search for the queries the graph leaves short of k."""
    if catalog.ann is None:
        raise InvalidQuery(
            f"catalog {catalog.path} has no approximate index: search it exactly, or rebuild it with --ann"
        )
    total = len(catalog)
    wants = [min(total, OVERFETCH * k + len(rows)) for k, rows in zip(ks, excluded, strict=True)]
    found: list[tuple[IntArray, FloatArray] | None] = [None] * len(queries)
    graph = [i for i in range(len(queries)) if not _too_selective(conditions[i], wants[i], ks[i], total)]
    if graph:
        candidates = catalog.ann.search(queries[graph], max(wants[i] for i in graph))
        for i, rows in zip(graph, candidates, strict=True):
            rows = rows[(rows >= 0) & (rows < total)]
            if len(excluded[i]):
                rows = rows[~np.isin(rows, excluded[i])]
            condition = conditions[i]
            if condition is not None and len(rows):
                rows = rows[condition.mask(rows)]
            if len(rows) >= ks[i]:
                rows = np.sort(rows)
                block = np.asarray(catalog.vectors[rows], dtype=np.float32)
                found[i] = _cut(rows, block @ queries[i], ks[i])
    fallback = [i for i, hits in enumerate(found) if hits is None]
    if fallback:
        exact = exact_top_k(
            catalog.vectors,
            queries[fallback],
            [ks[i] for i in fallback],
            [conditions[i] for i in fallback],
            [excluded[i] for i in fallback],
        )
        for i, hits in zip(fallback, exact, strict=True):
            found[i] = hits
    return [hits for hits in found if hits is not None]


def _too_selective(condition: _Conditions | None, wants: int, k: int, total: int) -> bool:
    """True when the graph's candidates, filtered, would be expected to leave fewer than k: such a query
    goes straight to exact search (which a filter makes no slower)."""
    if condition is None:
        return False
    kept = int(condition.mask(slice(0, total)).sum())
    return kept * wants < k * total


def recall_at_k(catalog: Catalog, queries: FloatArray, k: int = 10) -> float:
    """Share of the exact top-k that approximate search also returns, over `queries` (no filters)."""
    exact = search(catalog, queries, k)
    approximate = search(catalog, queries, k, exact=False)
    pairs = zip(approximate, exact, strict=True)
    hits = sum(len(set(a.indices.tolist()) & set(e.indices.tolist())) for a, e in pairs)
    wanted = sum(len(e.indices) for e in exact)
    return hits / wanted if wanted else 1.0
