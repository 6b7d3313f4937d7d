"""Approximate search: an HNSW graph (usearch) over the catalog's vectors, saved beside them.

Optional (`pip install 'recserve[ann]'`): only `recserve index --ann` and opening a catalog that holds an
index import usearch. The graph holds its own copy of the vectors (usearch needs them to walk it), so an
index about doubles the catalog on disk; it is memory-mapped on open.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from recserve.catalog.errors import CatalogError, CatalogFormatError
from recserve.catalog.store import AnnInfo, Dtype
from recserve.tensors import FloatArray, IntArray

# usearch's defaults are 16 / 128 / 64; a smaller expansion_add builds about twice as fast for a point or
# two of recall, which a larger expansion_search buys back at query time.
CONNECTIVITY = 16
EXPANSION_ADD = 96
EXPANSION_SEARCH = 128
_USEARCH_DTYPES = {"float16": "f16", "float32": "f32"}


def require_usearch() -> Any:
    try:
        from usearch import index
    except ImportError:
        raise CatalogError(
            "approximate search needs usearch, which is not installed: pip install 'recserve[ann]'"
        ) from None
    return index


def build_ann(
    vectors: np.ndarray,
    path: Path,
    dtype: Dtype,
    connectivity: int = CONNECTIVITY,
    expansion_add: int = EXPANSION_ADD,
    expansion_search: int = EXPANSION_SEARCH,
    threads: int = 0,
) -> AnnInfo:
    """Builds the graph of `vectors` (keys: row numbers) and saves it at `path`; `threads` 0: all cores."""
    usearch = require_usearch()
    started = time.perf_counter()
    index = usearch.Index(
        ndim=vectors.shape[1],
        metric="ip",
        dtype=_USEARCH_DTYPES[dtype],
        connectivity=connectivity,
        expansion_add=expansion_add,
        expansion_search=expansion_search,
    )
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)
    index.save(str(path))
    return AnnInfo(
        dtype=dtype,
        connectivity=connectivity,
        expansion_add=expansion_add,
        expansion_search=expansion_search,
        build_seconds=round(time.perf_counter() - started, 3),
    )


class AnnIndex:
    """A saved graph, memory-mapped; usearch searches it from many threads at once."""

    def __init__(self, index: Any, info: AnnInfo) -> None:
        self._index = index
        self.info = info

    @classmethod
    def open(cls, path: Path, info: AnnInfo, count: int, dimension: int) -> AnnIndex:
        usearch = require_usearch()
        try:
            index = usearch.Index.restore(str(path), view=True)
        except (RuntimeError, ValueError, OSError) as exc:
            raise CatalogFormatError(f"catalog file {path} is not a usable usearch index: {exc}") from None
        if index is None or len(index) != count or index.ndim != dimension:
            found = "nothing" if index is None else f"{len(index)} vectors of {index.ndim} dimensions"
            raise CatalogFormatError(
                f"catalog file {path} holds {found}, expected {count} of {dimension}: rebuild the catalog"
            )
        index.expansion_search = info.expansion_search
        return cls(index, info)

    def search(self, queries: FloatArray, count: int) -> list[IntArray]:
        """For each query, up to `count` row numbers, nearest first (by the graph's own f16/f32 scores)."""
        # One query: no thread pool to start; several (gathered calls): every core.
        matches = self._index.search(queries, count, threads=1 if len(queries) == 1 else 0)
        if not hasattr(matches, "counts"):  # one query: usearch answers a Matches, already cut to size
            return [np.asarray(matches.keys, dtype=np.int64)]
        keys = np.asarray(matches.keys, dtype=np.int64)
        return [keys[i, : int(found)] for i, found in enumerate(matches.counts)]
