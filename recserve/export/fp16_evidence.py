"""The evidence behind the fp16 parity bar (docs/decisions/0006-fp16-parity-bar.md), reproducible:

    python -m recserve.export.fp16_evidence --repo models/minilm [--catalog 3000] [--queries 500]

What a recommender loses to fp16 is neighbours, so this measures recall@10 overlap: for each query, how
many of its 10 nearest catalogue items (cosine) under fp16 are among the 10 under fp32. The catalogue and
queries are workload-like texts (recserve/benchmarks/workloads.py), the parity texts are queries too. To
tie a per-vector cosine bar to that loss, it also rotates every fp32 vector by exactly a given cosine, in a
random direction, and measures the overlap again: what recall a model would keep if every vector were at
the bar.

NOTE: it runs the fp16 graph on the CPU provider, the best proxy there is without a GPU; there ONNX
Runtime computes the ops it has no fp16 kernel for in fp32 between casts, so the figures bound CUDA's
rounding from below, not exactly.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recserve.export.parity import run_sorted_batches
from recserve.export.parity_texts import parity_texts
from recserve.runner import TextRunner
from recserve.tensors import FloatArray, l2_normalize

K = 10
COSINES = (0.99999, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99)


def recall_overlap(
    queries: FloatArray, catalog: FloatArray, queries2: FloatArray, catalog2: FloatArray
) -> FloatArray:
    """Per query: the share of its top-K catalogue items under (queries, catalog) that (queries2, catalog2)
    also ranks in its top K."""
    top = np.argsort(-(queries @ catalog.T), axis=1)[:, :K]
    top2 = np.argsort(-(queries2 @ catalog2.T), axis=1)[:, :K]
    overlap = [len(set(a) & set(b)) / K for a, b in zip(top, top2, strict=True)]
    return np.asarray(overlap, dtype=np.float32)


def rotated(vectors: FloatArray, cosine: float, rng: np.random.Generator) -> FloatArray:
    """Each unit vector turned by exactly `cosine` towards a random orthogonal direction."""
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise -= (noise * vectors).sum(axis=1, keepdims=True) * vectors
    noise = l2_normalize(noise)
    out: FloatArray = (cosine * vectors + np.sqrt(1.0 - cosine**2) * noise).astype(np.float32)
    return out


def _embed(runner: TextRunner, texts: Sequence[str]) -> FloatArray:
    return l2_normalize(run_sorted_batches(runner, texts))


def study(repo: Path, catalog_size: int, query_count: int, seed: int = 0) -> dict[str, object]:
    from recserve.benchmarks.workloads import DISTRIBUTIONS, synthetic_texts

    catalog_texts = [
        *synthetic_texts(DISTRIBUTIONS["title"], catalog_size // 2, seed)[0],
        *synthetic_texts(DISTRIBUTIONS["description"], catalog_size - catalog_size // 2, seed + 1)[0],
    ]
    query_texts = [*synthetic_texts(DISTRIBUTIONS["query"], query_count, seed + 2)[0], *parity_texts()]
    vectors = {}
    for precision in ("fp32", "fp16"):
        runner = TextRunner.of_repository(repo, precision)  # type: ignore[arg-type]
        vectors[precision] = (_embed(runner, query_texts), _embed(runner, catalog_texts))
    (q32, c32), (q16, c16) = vectors["fp32"], vectors["fp16"]
    cosine = np.concatenate([(q32 * q16).sum(axis=1), (c32 * c16).sum(axis=1)])
    parity_cos = (q32 * q16).sum(axis=1)[query_count:]
    overlap = recall_overlap(q32, c32, q16, c16)
    rng = np.random.default_rng(seed)
    simulated = {}
    for c in COSINES:
        o = recall_overlap(q32, c32, rotated(q32, c, rng), rotated(c32, c, rng))
        simulated[str(c)] = {"mean": float(o.mean()), "min": float(o.min()), "full": float((o == 1).mean())}
    return {
        "repo": str(repo),
        "catalog": len(catalog_texts),
        "queries": len(query_texts),
        "fp16_vs_fp32": {
            "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean()),
            "p001_cosine": float(np.quantile(cosine, 0.001)),
            "parity_texts_min_cosine": float(parity_cos.min()),
            "parity_texts_mean_cosine": float(parity_cos.mean()),
            "recall_at_10_mean": float(overlap.mean()),
            "recall_at_10_min": float(overlap.min()),
            "queries_with_identical_top_10": float((overlap == 1).mean()),
        },
        "every_vector_rotated_to_cosine": simulated,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recserve.export.fp16_evidence", description=__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="a repository exported with fp32 and fp16")
    parser.add_argument("--catalog", type=int, default=3000, help="catalogue texts (default %(default)s)")
    parser.add_argument("--queries", type=int, default=500, help="workload queries (default %(default)s)")
    args = parser.parse_args(argv)
    print(json.dumps(study(args.repo, args.catalog, args.queries), indent=2))


if __name__ == "__main__":
    main()
