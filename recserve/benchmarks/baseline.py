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

import numpy as np

from recserve.benchmarks import stats
from recserve.benchmarks.results import RawLimit, SingleLatency
from recserve.manifest import Manifest
from recserve.tensors import Encoded, FloatArray, l2_normalize


class RawModel:
    """The model alone, in this process: the server's runtime (`load_backend`) and tokenizer, no server.

    `run` tokenises, runs and pools `texts` (a cross-encoder pairs each with `query`), blocking the calling
    thread. One batch at a time on every thread: the fastest way to run the model alone
    (two concurrent single-thread batches are slower here), so the server is held to the stricter limit.
    """

    def __init__(
        self, repo: Path, *, threads: int, precision: str = "auto", device: str = "auto", query: str = ""
    ) -> None:
        # Imported here: onnxruntime is heavy, and only this baseline needs it in the benchmark's process.
        from recserve.server.runtime import FastTokenizer, load_backend

        self.manifest = Manifest.load(repo)
        self.threads = threads
        # The server's own device choice ("auto" by default), so the limit runs where the server would.
        self.backend = load_backend(repo, self.manifest, device, precision, threads, 1, concurrent_batches=1)
        self._tokenizer = FastTokenizer(repo / self.manifest.tokenizer_file)
        self._cross = self.manifest.task == "cross-encoder"
        self._query = query

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        # A cross-encoder's unit of work is a (query, candidate) pair.
        if self._cross:
            return self._tokenizer.encode_pairs(self._query, texts)
        return self._tokenizer.encode(texts)

    def infer(self, encoded: Sequence[Encoded]) -> FloatArray:
        out = self.backend.run(encoded)
        return l2_normalize(out) if self.manifest.normalize and not self._cross else out

    def run(self, texts: Sequence[str]) -> FloatArray:
        """What a served call costs the model: tokenise, run, normalise."""
        return self.infer(self.encode(texts))


def raw_limit(
    model: RawModel,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    repeats: int = 3,
    singles: int = 200,
) -> RawLimit:
    """Texts/s over `texts` in sorted batches (median of `repeats` passes) and the single-text latency.

    The single-text figure: tokenise one text, run a batch of one, pool, normalise, over the first `singles`
    texts, back to back.
    """

    def one_pass() -> tuple[float, int, int]:
        started = time.perf_counter()
        encoded = model.encode(texts)
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
        padded = 0
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            padded += max(e.length for e in batch) * len(batch)
            rows = model.infer(batch)
            if rows.shape[0] != len(batch):
                raise RuntimeError(f"the model returned {rows.shape[0]} rows for a batch of {len(batch)}")
        real = sum(e.length for e in encoded)
        return time.perf_counter() - started, real, padded

    one_pass_warm = texts[: batch_size * 4]
    for start in range(0, len(one_pass_warm), batch_size):
        model.run(one_pass_warm[start : start + batch_size])
    passes = [one_pass() for _ in range(max(1, repeats))]
    seconds = [p[0] for p in passes]
    real, padded = passes[0][1], passes[0][2]
    single_lat = []
    for text in texts[: max(1, singles)]:
        started = time.perf_counter()
        model.run([text])
        single_lat.append(time.perf_counter() - started)
    median_s = statistics.median(seconds)
    backend = model.backend
    variant = model.manifest.variants[backend.precision]
    return RawLimit(
        texts=len(texts),
        batch_size=batch_size,
        threads=model.threads,
        precision=backend.precision,
        provider=backend.provider,
        model_file=variant.file,
        model_sha256=variant.sha256,
        repeats=len(passes),
        pass_seconds=tuple(round(s, 4) for s in seconds),
        texts_per_s=stats.rate(len(texts), median_s),
        tokens_per_s=stats.rate(real, median_s),
        padding_ratio=round(padded / real, 4) if real else None,
        single=SingleLatency(calls=len(single_lat), latency_ms=stats.latency_summary(np.array(single_lat))),
    )
