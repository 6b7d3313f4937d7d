"""The raw limit: the same model file through the server's own runtime, in process, with no server around it.

Same ONNX Runtime session settings (the server's `load_backend`, same thread count), same tokenizer, the
same texts, in length-sorted batches of 32, tokenisation included: the most a server could deliver on this
machine. Every served figure is reported as a ratio to it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recserve.benchmarks import stats
from recserve.manifest import Manifest
from recserve.pooling import l2_normalize


def raw_limit(
    repo: Path,
    texts: Sequence[str],
    *,
    threads: int,
    precision: str = "auto",
    batch_size: int = 32,
    repeats: int = 3,
    singles: int = 200,
) -> dict[str, Any]:
    """Texts/s over `texts` in sorted batches (median of `repeats` passes) and the single-text latency.

    The single-text figure is what a lone served call is compared with: tokenise one text, run a batch of
    one, pool, normalise, over the first `singles` texts.
    """
    # Imported here: onnxruntime is heavy, and only this baseline needs it in the benchmark's process.
    from recserve.server.runtime import TokenizerPool, load_backend

    manifest = Manifest.load(repo)
    # The server's own default device choice ("auto"), so the limit runs where the server would.
    # One batch at a time on every thread: the fastest way to run the model alone (two concurrent
    # single-thread batches are slower here), so the server is held to the stricter limit.
    backend = load_backend(repo, manifest, "auto", precision, threads, 1, concurrent_batches=1)
    tokenizers = TokenizerPool(repo / manifest.tokenizer_file, 1)
    cross = manifest.task == "cross-encoder"
    query = texts[0]

    def encode(chunk: Sequence[str]) -> list[Any]:
        # A cross-encoder's unit of work is a (query, candidate) pair.
        return tokenizers.encode_pairs(query, chunk) if cross else tokenizers.encode(chunk)

    def finish(out: np.ndarray) -> np.ndarray:
        return l2_normalize(out) if manifest.normalize and not cross else out

    def one_pass() -> tuple[float, int, int]:
        started = time.perf_counter()
        encoded = encode(texts)
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
        padded = 0
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            padded += max(e.length for e in batch) * len(batch)
            rows = finish(backend.run(batch))
            if rows.shape[0] != len(batch):
                raise RuntimeError(f"the model returned {rows.shape[0]} rows for a batch of {len(batch)}")
        real = sum(e.length for e in encoded)
        return time.perf_counter() - started, real, padded

    try:
        one_pass_warm = texts[: batch_size * 4]
        for start in range(0, len(one_pass_warm), batch_size):
            backend.run(encode(one_pass_warm[start : start + batch_size]))
        passes = [one_pass() for _ in range(max(1, repeats))]
        seconds = [p[0] for p in passes]
        real, padded = passes[0][1], passes[0][2]
        single_lat = []
        for text in texts[: max(1, singles)]:
            started = time.perf_counter()
            finish(backend.run(encode([text])))
            single_lat.append(time.perf_counter() - started)
    finally:
        tokenizers.shutdown()
    median_s = statistics.median(seconds)
    variant = manifest.variants[backend.selection.precision]
    return {
        "texts": len(texts),
        "batch_size": batch_size,
        "threads": threads,
        "precision": backend.selection.precision,
        "provider": backend.provider,
        "model_file": variant.file,
        "model_sha256": variant.sha256,
        "repeats": len(passes),
        "pass_seconds": [round(s, 4) for s in seconds],
        "texts_per_s": stats.rate(len(texts), median_s),
        "tokens_per_s": stats.rate(real, median_s),
        "padding_ratio": round(padded / real, 4) if real else None,
        "single": {"calls": len(single_lat), "latency_ms": stats.latency_summary(np.array(single_lat))},
    }
