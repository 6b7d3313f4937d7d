"""Embedding a catalog through the server's own path: the model seam (server/model.py) behind the same
Batcher and Engine that `running_server` composes, fed concurrently so that batches fill.

NOTE: texts go in by length, so that each batch holds texts of about one length and pads little; rows are
written back at their place in the catalog (id order) as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from recserve.catalog.errors import CatalogError
from recserve.catalog.items import Items
from recserve.catalog.store import CatalogManifest, CatalogWriter, Dtype, ModelInfo
from recserve.export.repository import Staging, check_target
from recserve.server.engine import Engine, Limits
from recserve.server.metrics import Metrics
from recserve.server.model import Model
from recserve.server.registry import compose
from recserve.server.settings import ServerSettings
from recserve.tensors import FloatArray, IntArray

# Texts per Engine.embed call, and calls in flight: enough queued behind the running batch that the next
# one is full when it starts, few enough that an interrupt has little to throw away.
CHUNK_TEXTS = 64
IN_FLIGHT = 4


def index_settings(
    model_repo: Path, threads: int | None = None, device: str = "auto", precision: str = "auto"
) -> ServerSettings:
    """Server settings for an offline build: the server's batching defaults, no ports, and a queue bound
    by count only (admission by time protects callers' deadlines; a build has none)."""
    values: dict[str, object] = {
        "model_repo": model_repo,
        "device": device,
        "precision": precision,
        "metrics_port": None,
        "metrics": False,
        "warmup": False,
        "max_queue_seconds": 24 * 3600.0,
    }
    if threads is not None:
        values["intra_op_threads"] = threads
    return ServerSettings(**values)  # type: ignore[arg-type]


class Progress:
    """One status line on `stream`: done/total, items/s and the time left; redrawn in place on a terminal,
    a line every `interval_s` elsewhere (a log keeps every line)."""

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, interval_s: float = 10.0
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.started = time.perf_counter()
        self._shown_at = -math.inf
        self.done = 0

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.perf_counter()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label} {self.done:,}/{self.total:,} items ({share:.0f}%)  {rate:,.0f} items/s  "
            f"{'ETA ' + _duration(left) if self.done < self.total else 'in ' + _duration(elapsed)}"
        )

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self._shown_at >= self.interval_s or done >= self.total:
            self._shown_at = now
            self._show(self.line(now))

    def note(self, text: str) -> None:
        """A line of its own (a stage that follows, with no count of its own)."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, text: str) -> None:
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Embedded:
    truncated: int
    seconds: float


@contextlib.asynccontextmanager
async def engine_for(model: Model, settings: ServerSettings) -> AsyncIterator[Engine]:
    """An open Engine of `model` with its Batcher and executors, composed as the server composes them
    (registry.compose), without the transport; on exit (or an error, or Ctrl-C) the batcher stops and the
    threads end."""
    # NOTE: no byte limit on a text: the tokenizer truncates at the model's max_length, as it would for
    # a served call, and the catalog's manifest counts the texts it cut.
    served = compose(
        model.manifest.model_name, model, settings, Limits(CHUNK_TEXTS, sys.maxsize), Metrics().for_model("")
    )
    engine = served.engine
    finished = False
    await served.batcher.start()
    engine.open()
    try:
        yield engine
        finished = True
    finally:
        engine.close("the build is over")
        if not finished:
            model.backend.stop_running()  # interrupted: the batch running now is nobody's any more
        await served.batcher.stop(drain=finished, timeout=1.0)
        served.shutdown()


async def _embed_chunks(
    engine: Engine,
    texts: Sequence[str],
    chunks: Iterable[IntArray],
    deliver: Callable[[IntArray, FloatArray, int], None],
) -> None:
    """Embeds (normalised) each chunk of `texts`, IN_FLIGHT chunks at once so that batches fill, and
    hands `deliver` the rows, their vectors and how many of them were truncated."""
    chunk_iterator = iter(chunks)

    async def worker() -> None:
        for rows in chunk_iterator:  # one shared iterator: each chunk goes to exactly one worker
            result = await engine.embed([texts[i] for i in rows.tolist()], True, False, None)
            if not np.isfinite(result.vectors).all():
                raise CatalogError(f"the model returned NaN or infinite values for text {int(rows[0])}")
            deliver(rows, result.vectors, len(result.truncated))

    # NOTE: gather, not a TaskGroup: the first failure comes out as itself (a one-line error for the
    # command), not wrapped in an ExceptionGroup; the finally cancels the other workers.
    tasks = [asyncio.create_task(worker()) for _ in range(IN_FLIGHT)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def by_length(texts: Sequence[str]) -> Iterator[IntArray]:
    """Row numbers of `texts` in chunks of CHUNK_TEXTS, shortest texts first."""
    order = np.argsort(np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable")
    for start in range(0, len(order), CHUNK_TEXTS):
        yield order[start : start + CHUNK_TEXTS]


async def embed_into(
    model: Model, settings: ServerSettings, items: Items, writer: CatalogWriter, progress: Progress | None
) -> Embedded:
    """Embeds every text of `items` into `writer`; returns how many the tokenizer truncated."""
    started = time.perf_counter()
    done = truncated = 0

    def deliver(rows: IntArray, vectors: FloatArray, cut: int) -> None:
        nonlocal done, truncated
        writer.put(rows, vectors)
        done += len(rows)
        truncated += cut
        if progress is not None:
            progress.update(done)

    try:
        async with engine_for(model, settings) as engine:
            await _embed_chunks(engine, items.texts, by_length(items.texts), deliver)
    finally:
        if progress is not None:
            progress.close()
    return Embedded(truncated, time.perf_counter() - started)


def embed_texts(model: Model, settings: ServerSettings, texts: Sequence[str]) -> FloatArray:
    """[len(texts), dim] L2-normalised vectors, through the same engine path as a build (for queries)."""
    out = np.empty((len(texts), model.manifest.output_dim), dtype=np.float32)

    def deliver(rows: IntArray, vectors: FloatArray, cut: int) -> None:
        out[rows] = vectors

    async def main() -> None:
        async with engine_for(model, settings) as engine:
            await _embed_chunks(engine, texts, by_length(texts), deliver)

    asyncio.run(main())
    return out


def build_catalog(
    model: Model,
    settings: ServerSettings,
    items: Items,
    out: Path,
    dtype: Dtype = "float16",
    ann: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> CatalogManifest:
    """Embeds `items` with `model` and writes the catalog at `out`, atomically (a staging directory next
    to it, renamed at the end: an error or Ctrl-C leaves nothing behind)."""
    manifest = model.manifest
    if manifest.task != "embedding":
        raise CatalogError(
            f"model {manifest.model_name} is a {manifest.task}; a catalog needs an embedding model"
        )
    check_target(out, force)
    with Staging(out) as staging:
        writer = CatalogWriter(staging.path, len(items), manifest.output_dim, dtype)
        embedded = asyncio.run(embed_into(model, settings, items, writer, progress))
        info = ModelInfo(
            name=manifest.model_name,
            weights_sha256=manifest.source.weights_sha256,
            dimension=manifest.output_dim,
            repository=str(settings.model_repo or ""),
        )
        if ann and progress is not None:
            progress.note(f"building the HNSW index of {len(items):,} vectors")
        written = writer.finish(items, info, embedded.truncated, ann={} if ann else None)
        del writer  # closes the memory map before the directory moves
        staging.commit()
    return written
