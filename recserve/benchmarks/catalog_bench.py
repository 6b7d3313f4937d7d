"""Catalog search, in process: latency of exact and approximate top-k over synthetic catalogs, recall of
the approximate index, and exact search against a bare numpy matrix product + argpartition.

The catalogs are clustered (1024 centres, each item its centre plus noise, cosine ~0.55 to it), as real
embeddings are, and written by the catalog's own writer, so search reads what `recserve index` writes. 16
callers means 16 queries gathered into one call (one matrix product), as the server's searcher gathers
the queries that arrive together: each caller waits for that whole call, so its latency is the call's.
Run: `python -m recserve.benchmarks.catalog_bench --sizes 100000,1000000 --ann-max 100000 --json FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recserve.benchmarks.stats import nearest_rank
from recserve.catalog.items import AttributeColumn, Items
from recserve.catalog.search import CHUNK_ROWS, exact_top_k, recall_at_k, to_float32
from recserve.catalog.store import Catalog, CatalogWriter, Dtype, ModelInfo
from recserve.tensors import FloatArray

DIMENSION = 384
K = 10
CENTRES = 1024
# Per-coordinate noise: |noise| ~ 1.5 at 384 dimensions against a unit centre, so cosine to it ~0.55 and
# between two items of one centre ~0.3: neighbourhoods crowded enough for a graph to miss some.
NOISE = 0.075
_BLOCK = 65536


def _mixture(rng: np.random.Generator, centres: FloatArray, count: int) -> FloatArray:
    rows = centres[rng.integers(0, len(centres), count)]
    rows = rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(NOISE)
    unit: FloatArray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def _centres(seed: int, dimension: int) -> FloatArray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dimension), dtype=np.float32)
    unit: FloatArray = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return unit


def synthetic_catalog(
    directory: Path,
    count: int,
    dimension: int = DIMENSION,
    dtype: Dtype = "float16",
    ann: bool = False,
    seed: int = 0,
    model: ModelInfo | None = None,
) -> Catalog:
    """Writes (block by block: memory stays bounded) and opens a clustered catalog of `count` items.

    `model`: whose catalog it claims to be (a server refuses a catalog not built by a model it serves);
    by default a synthetic one."""
    directory.mkdir(parents=True)
    centres = _centres(seed, dimension)
    rng = np.random.default_rng(seed + 1)
    writer = CatalogWriter(directory, count, dimension, dtype)
    for start in range(0, count, _BLOCK):
        stop = min(count, start + _BLOCK)
        writer.put(slice(start, stop), _mixture(rng, centres, stop - start))
    ids = [f"item{i:08d}" for i in range(count)]
    # Attributes to filter on: a category of 100 values and a price.
    category = AttributeColumn("category", "string", 1, [f"c{i % 100:02d}" for i in range(count)])
    price = AttributeColumn("price", "number", 1, [float(v) for v in rng.integers(1, 1000, count)])
    items = Items(ids, [f"synthetic item {i}" for i in range(count)], {"category": category, "price": price})
    model = model or ModelInfo(name="synthetic", weights_sha256="0" * 64, dimension=dimension)
    writer.finish(items, model, ann={} if ann else None)
    del writer
    return Catalog.open(directory, verify=False)


def query_vectors(count: int, dimension: int = DIMENSION, seed: int = 0) -> FloatArray:
    """Queries from the catalog's own mixture (same centres, fresh noise): not rows of it."""
    return _mixture(np.random.default_rng(seed + 2), _centres(seed, dimension), count)


def _timed(call: Callable[[], object], rounds: int) -> list[float]:
    call()  # warm: page cache, BLAS threads
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def _summary(seconds: Sequence[float], queries_per_call: int) -> dict[str, float]:
    ms = np.sort(np.asarray(seconds) * 1000.0)
    return {
        "p50_ms": round(nearest_rank(ms, 50), 2),
        "p99_ms": round(nearest_rank(ms, 99), 2),
        "queries_per_s": round(queries_per_call * len(ms) / (float(ms.sum()) / 1000.0), 1),
        "calls": len(ms),
    }


def search_latency(
    catalog: Catalog, queries: FloatArray, callers: int, exact: bool, rounds: int
) -> dict[str, float]:
    """p50/p99 of calls of `callers` gathered queries (a different slice of `queries` each round)."""
    position = 0

    def call() -> None:
        nonlocal position
        chunk = np.take(queries, range(position, position + callers), axis=0, mode="wrap")
        position += callers
        catalog.search(chunk, K, exact=exact)

    return _summary(_timed(call, rounds), callers)


def versus_bare(catalog: Catalog, queries: FloatArray, callers: int, rounds: int) -> dict[str, Any]:
    """Exact search of the (float16) catalog, the same search over a float32 copy in memory, a bare
    float32 `queries @ matrix.T` + argpartition over that copy (same shapes, same run), the float16 ->
    float32 conversion of the catalog's blocks alone, and the bare product over the catalog as stored."""
    matrix = np.asarray(catalog.vectors, dtype=np.float32)  # made once, outside the timings
    chunk = np.ascontiguousarray(queries[:callers])
    no_filters = [None] * callers
    no_exclusions = [np.zeros(0, dtype=np.int64)] * callers

    def bare() -> None:
        scores = chunk @ matrix.T
        np.argpartition(scores, scores.shape[1] - K, axis=1)[:, -K:]

    def bare_as_stored() -> None:
        # The same bare product over the catalog as stored (numpy upcasts a float16 matrix itself).
        scores = chunk @ np.asarray(catalog.vectors).T
        np.argpartition(scores, scores.shape[1] - K, axis=1)[:, -K:]

    block = np.empty((min(CHUNK_ROWS, len(matrix)), matrix.shape[1]), dtype=np.float32)

    def convert() -> None:
        # What a float16 catalog adds: converting its blocks, as exact search does, and nothing else.
        for start in range(0, len(matrix), CHUNK_ROWS):
            rows = catalog.vectors[start : start + CHUNK_ROWS]
            to_float32(rows, block[: len(rows)])

    figures: dict[str, dict[str, Any]] = {
        "bare_float32": _summary(_timed(bare, rounds), callers),
        "search_float32": _summary(
            _timed(lambda: exact_top_k(matrix, chunk, [K] * callers, no_filters, no_exclusions), rounds),
            callers,
        ),
        f"search_{catalog.manifest.dtype}": _summary(
            _timed(lambda: catalog.search(chunk, K), rounds), callers
        ),
    }
    if catalog.vectors.dtype != np.float32:
        figures["conversion_only"] = _summary(_timed(convert, rounds), callers)
        figures[f"bare_{catalog.manifest.dtype}_as_stored"] = _summary(
            _timed(bare_as_stored, rounds), callers
        )
    base = figures["bare_float32"]["p50_ms"]
    for name in list(figures):
        figures[name]["x_bare"] = round(figures[name]["p50_ms"] / base, 2) if base else None
    return figures


def run_catalog_bench(
    sizes: Sequence[int] = (100_000, 1_000_000),
    callers: Sequence[int] = (1, 16),
    ann_max: int = 1_000_000,
    rounds: int = 30,
    workdir: Path | None = None,
    dimension: int = DIMENSION,
) -> dict[str, Any]:
    """Every figure for each size: latency (exact, and approximate up to `ann_max` items), recall@10 of
    approximate, and exact versus bare at the largest size. Catalogs go under `workdir` (a temporary
    directory by default), removed at the end."""
    result: dict[str, Any] = {"dimension": dimension, "k": K, "callers": list(callers), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="recserve-catalog-bench-", dir=workdir) as scratch:
        for size in sizes:
            ann = size <= ann_max
            started = time.perf_counter()
            catalog = synthetic_catalog(Path(scratch) / f"c{size}", size, dimension, ann=ann)
            figures: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1)}
            if catalog.manifest.ann is not None:
                figures["ann_build_s"] = catalog.manifest.ann.build_seconds
            started = time.perf_counter()
            Catalog.open(catalog.path, verify=True)
            figures["open_verified_s"] = round(time.perf_counter() - started, 2)
            queries = query_vectors(max(callers) * (rounds + 1), dimension)
            for mode in (True, False) if ann else (True,):
                name = "exact" if mode else "approximate"
                figures[name] = {str(c): search_latency(catalog, queries, c, mode, rounds) for c in callers}
            if ann:
                figures["recall@10"] = round(recall_at_k(catalog, queries[:200], K), 4)
            if size == max(sizes):
                figures["versus_bare"] = {str(c): versus_bare(catalog, queries, c, rounds) for c in callers}
            result["sizes"][str(size)] = figures
            del catalog
    return result


def markdown(result: dict[str, Any]) -> str:
    """The figures as two tables: search latency by size, mode and callers; exact versus bare."""
    lines = [
        f"| items | search | callers | p50 ms | p99 ms | queries/s | recall@{K} |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, figures in result["sizes"].items():
        for mode in ("exact", "approximate"):
            for callers, row in figures.get(mode, {}).items():
                recall = figures.get("recall@10", "") if mode == "approximate" else ""
                lines.append(
                    f"| {int(size):,} | {mode} | {callers} | {row['p50_ms']} | {row['p99_ms']} | "
                    f"{row['queries_per_s']:,} | {recall} |"
                )
    for size, figures in result["sizes"].items():
        if "versus_bare" not in figures:
            continue
        lines += [
            "",
            f"Exact top-{K} over {int(size):,} x {result['dimension']}, same run:",
            "",
            "| callers | what | p50 ms | p99 ms | x bare |",
            "|---|---|---|---|---|",
        ]
        for callers, table in figures["versus_bare"].items():
            for name, row in table.items():
                lines.append(f"| {callers} | {name} | {row['p50_ms']} | {row['p99_ms']} | {row['x_bare']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve.benchmarks.catalog_bench", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--sizes", default="100000,1000000", help="catalog sizes (default: %(default)s)")
    parser.add_argument("--ann-max", type=int, default=1_000_000, help="largest size given an ANN index")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per figure")
    parser.add_argument("--workdir", type=Path, help="where the catalogs are written (default: /tmp)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    result = run_catalog_bench(sizes, ann_max=args.ann_max, rounds=args.rounds, workdir=args.workdir)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
