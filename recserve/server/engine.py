"""The recommender operations on top of the batcher: validate -> admit -> tokenise (threads) -> batch ->
post-process.

Knows nothing of gRPC or protobuf: the transport (service.py) turns messages into these calls and the
ServeError subclasses raised here into status codes. Validation of a call's content lives here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from recserve.manifest import Manifest
from recserve.server.batcher import Batcher, Reservation
from recserve.server.errors import DeadlineExceeded, InvalidArgument, Unavailable
from recserve.server.model import Tokenizer
from recserve.tensors import Encoded, FloatArray, l2_normalize

Similarity = Literal["cosine", "dot"]

# Tokenising runs in chunks of at most this many texts or characters: a call whose caller has gone, or
# whose deadline has passed, stops within one chunk, and one large call cannot hold a tokeniser thread
# (and the calls queued behind it) for seconds.
CHUNK_TEXTS = 64
CHUNK_CHARS = 256 * 1024
# While no execution slot is free, a call waits this long for the calls after it to share its tokeniser hop:
# it waits for a running batch anyway, and one hop per call cost more CPU than the tokenising (0008).
GATHER_S = 0.001


@dataclass(frozen=True)
class Limits:
    max_texts_per_call: int
    max_text_bytes: int


@dataclass
class Timings:
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0


@dataclass
class EmbedResult:
    vectors: FloatArray
    truncated: list[int]
    token_counts: list[int]
    timings: Timings


@dataclass
class ScoreResult:
    scores: FloatArray
    truncated: list[int]
    timings: Timings
    # Texts (or pairs) that went through the model: the query or history, and the candidates.
    model_texts: int


@dataclass
class ClassifyResult:
    # [texts, top_k]: label indices best first, and their probabilities.
    indices: npt.NDArray[np.int64]
    probabilities: FloatArray
    truncated: list[int]
    timings: Timings


@dataclass(frozen=True)
class UserHistory:
    texts: Sequence[str]
    # Empty: every item weighs 1.
    weights: Sequence[float] = ()


class Engine:
    """Embed and Score for one model repository."""

    def __init__(
        self,
        manifest: Manifest,
        tokenizer: Tokenizer,
        tokenize_executor: Executor,
        tokenizer_threads: int,
        inline_tokenize_chars: int,
        batcher: Batcher,
        limits: Limits,
    ) -> None:
        self.manifest = manifest
        self._tokenizer = tokenizer
        self._tokenizing = Tokenizing(
            tokenize_executor,
            tokenizer_threads,
            inline_tokenize_chars,
            model_idle=lambda: batcher.idle,
            model_free=lambda: batcher.free,
        )
        self.batcher = batcher
        self.limits = limits
        self.accepting = False
        self.refusal = "the server is warming up"
        self._in_flight = 0
        self._tasks: set[asyncio.Task[object]] = set()  # the tasks of the calls in flight
        self._cutting_off = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Embed and Score calls being handled (the in-flight gauge reads it; the drain waits for 0)."""
        return self._in_flight

    def open(self) -> None:
        self.accepting = True

    def close(self, why: str) -> None:
        self.accepting = False
        self.refusal = why

    async def wait_idle(self, within_s: float) -> bool:
        """Waits until no Embed/Score call is in flight; False if `within_s` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def cut_off(self) -> None:
        """Ends every call in flight with UNAVAILABLE (the closing reason), wherever it is waiting: for a
        shutdown whose grace period is over, so that each caller gets an answer before the port closes."""
        self._cutting_off = True
        for task in self._tasks:
            task.cancel()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Admits one call (or refuses it with UNAVAILABLE) and counts it as in flight until it ends."""
        if not self.accepting:
            raise Unavailable(self.refusal)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        except asyncio.CancelledError:
            if not self._cutting_off:
                raise  # the caller went away (gRPC cancelled the call)
            task.uncancel()
            raise Unavailable(self.refusal) from None
        finally:
            self._tasks.discard(task)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    # --- operations -----------------------------------------------------------------------------------
    async def embed(
        self, texts: Sequence[str], normalize: bool | None, strict: bool, deadline: float | None
    ) -> EmbedResult:
        with self._call():
            return await self._embed(texts, normalize, strict, deadline)

    async def _embed(
        self, texts: Sequence[str], normalize: bool | None, strict: bool, deadline: float | None
    ) -> EmbedResult:
        self._check_task("Embed", "embedding")
        self._check_texts("texts", texts)
        timings = Timings()
        with self.batcher.reserve(len(texts), deadline) as room:
            items = await self._tokenize(timings, self._tokenizer.encode, texts, deadline)
            truncated = self._truncated("texts", items, strict)
            rows = await self._run(timings, items, deadline, room)
        if normalize if normalize is not None else self.manifest.normalize:
            rows = l2_normalize(rows)
        return EmbedResult(rows, truncated, [item.length for item in items], timings)

    async def score(
        self,
        query: str | UserHistory,
        candidates: Sequence[str],
        similarity: Similarity,
        strict: bool,
        deadline: float | None,
        candidate_vectors: FloatArray | None = None,
    ) -> ScoreResult:
        """`candidate_vectors` ([n, dimension], e.g. a catalog's stored vectors) are scored after the
        candidate texts, with no model run for them; embedding models only."""
        with self._call():
            self._check_task("Score", "embedding", "cross-encoder")
            if candidate_vectors is None or candidates:
                self._check_texts("candidates", candidates)
            if self.manifest.task == "cross-encoder":
                if candidate_vectors is not None:
                    raise InvalidArgument(
                        "candidate_ids need an embedding model; a cross-encoder scores texts: send candidates"
                    )
                return await self._score_pairs(query, candidates, strict, deadline)
            return await self._score_vectors(
                query, candidates, similarity, strict, deadline, candidate_vectors
            )

    async def _score_vectors(
        self,
        query: str | UserHistory,
        candidates: Sequence[str],
        similarity: Similarity,
        strict: bool,
        deadline: float | None,
        candidate_vectors: FloatArray | None = None,
    ) -> ScoreResult:
        if isinstance(query, UserHistory):
            weights = history_weights(query.weights, len(query.texts))
            head_name, head = "user_history.texts", list(query.texts)
        else:
            head_name, head, weights = "query_text", [query], np.ones(1, dtype=np.float64)
        self._check_texts(head_name, head)
        timings = Timings()
        # The query (or history) and the candidates travel together: one submission, one queue wait.
        texts = [*head, *candidates]
        with self.batcher.reserve(len(texts), deadline) as room:
            items = await self._tokenize(timings, self._tokenizer.encode, texts, deadline)
            self._truncated(head_name, items[: len(head)], strict)
            truncated = self._truncated("candidates", items[len(head) :], strict)
            rows = await self._run(timings, items, deadline, room)
        head_rows, candidate_rows = rows[: len(head)], rows[len(head) :]
        if candidate_vectors is not None:
            if candidate_vectors.shape[1] != rows.shape[1]:
                raise InvalidArgument(
                    f"the catalog's vectors have {candidate_vectors.shape[1]} dimensions and this model's "
                    f"{rows.shape[1]}: use the model that built the catalog"
                )
            candidate_rows = np.concatenate([candidate_rows, candidate_vectors.astype(rows.dtype)])
        history = isinstance(query, UserHistory)
        query_vector = user_vector(weights, head_rows) if history else head_rows[0]
        if similarity == "cosine":
            scores = l2_normalize(candidate_rows) @ l2_normalize(query_vector[None, :])[0]
        else:
            # Dot product of the vectors as Embed returns them by default.
            if self.manifest.normalize:
                candidate_rows = l2_normalize(candidate_rows)
                if not history:
                    query_vector = l2_normalize(query_vector[None, :])[0]
            scores = candidate_rows @ query_vector
        return ScoreResult(scores.astype(np.float32), truncated, timings, len(items))

    async def _score_pairs(
        self, query: str | UserHistory, candidates: Sequence[str], strict: bool, deadline: float | None
    ) -> ScoreResult:
        if isinstance(query, UserHistory):
            raise InvalidArgument(
                "a user history needs an embedding model; this server serves a cross-encoder: send query_text"
            )
        self._check_texts("query_text", [query])
        timings = Timings()
        with self.batcher.reserve(len(candidates), deadline) as room:
            items = await self._tokenize(
                timings, lambda c: self._tokenizer.encode_pairs(query, c), candidates, deadline
            )
            truncated = self._truncated("candidates", items, strict)
            rows = await self._run(timings, items, deadline, room)
        # One logit: it is the relevance. Several (a classifier): the last is the "relevant" class.
        return ScoreResult(rows[:, -1].astype(np.float32), truncated, timings, len(items))

    async def classify(
        self, texts: Sequence[str], top_k: int, strict: bool, deadline: float | None
    ) -> ClassifyResult:
        with self._call():
            self._check_task("Classify", "classifier")
            self._check_texts("texts", texts)
            labels = len(self.manifest.labels)
            if not 1 <= top_k <= labels:
                raise InvalidArgument(
                    f"top_k is {top_k}; this classifier has {labels} labels: use 1..{labels}"
                )
            timings = Timings()
            with self.batcher.reserve(len(texts), deadline) as room:
                items = await self._tokenize(timings, self._tokenizer.encode, texts, deadline)
                truncated = self._truncated("texts", items, strict)
                logits = await self._run(timings, items, deadline, room)
            probabilities = probabilities_of(logits, self.manifest.multi_label)
            # Best first, ties to the lower index: a stable sort of the negated probabilities.
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
            best = np.take_along_axis(probabilities, order, axis=1)
            return ClassifyResult(order, best, truncated, timings)

    # --- steps ----------------------------------------------------------------------------------------
    def _check_task(self, rpc: str, *tasks: str) -> None:
        """InvalidArgument naming the RPC that fits this model, when `rpc` does not."""
        task = self.manifest.task
        if task in tasks:
            return
        fits = {
            "embedding": "Embed (or Score)",
            "cross-encoder": "Score with query_text",
            "classifier": "Classify",
        }.get(task, "Info")
        raise InvalidArgument(f"{rpc} does not apply to this model, a {task}: call {fits}")

    def _check_texts(self, name: str, texts: Sequence[str]) -> None:
        if not texts:
            raise InvalidArgument(f"{name} is empty: send at least one text")
        if len(texts) > self.limits.max_texts_per_call:
            raise InvalidArgument(
                f"{name} holds {len(texts)} texts; the limit is {self.limits.max_texts_per_call} per call "
                "(Info.limits.max_texts_per_call): split the call"
            )
        for index, text in enumerate(texts):
            # Cheap bound first: a str of n code points is at most 4n UTF-8 bytes.
            if len(text) * 4 > self.limits.max_text_bytes:
                size = len(text.encode("utf-8", "surrogatepass"))
                if size > self.limits.max_text_bytes:
                    raise InvalidArgument(
                        f"{name}[{index}] is {size} bytes; the limit is {self.limits.max_text_bytes} "
                        "(Info.limits.max_text_bytes)"
                    )

    def _truncated(self, name: str, items: Sequence[Encoded], strict: bool) -> list[int]:
        cut = [index for index, item in enumerate(items) if item.truncated]
        if strict and cut:
            raise InvalidArgument(
                f"{name}[{cut[0]}] is longer than the model's {self.manifest.max_length} tokens "
                f"({len(cut)} such text(s)) and truncation is STRICT: shorten it or use TRUNCATE"
            )
        return cut

    async def _tokenize(
        self, timings: Timings, encode: Encode, texts: Sequence[str], deadline: float | None
    ) -> list[Encoded]:
        """Tokenises in worker threads, chunk by chunk, checking the deadline between chunks.

        A cancelled caller raises CancelledError at the await: a chunk already in a thread finishes, and
        no further chunk starts.
        """
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        items: list[Encoded] = []
        for chunk in chunks(texts):
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExceeded("the deadline passed while the call was being tokenised")
            items.extend(await self._tokenizing.encode(encode, chunk))
        timings.tokenize_s = time.perf_counter() - started
        return items

    async def _run(
        self, timings: Timings, items: Sequence[Encoded], deadline: float | None, room: Reservation
    ) -> FloatArray:
        result = await self.batcher.submit(items, deadline, room)
        timings.queue_s = result.queue_s
        timings.infer_s = result.infer_s
        return result.rows


Encode = Callable[[Sequence[str]], list[Encoded]]


@dataclass(slots=True)
class _Chunk:
    encode: Encode
    texts: Sequence[str]
    future: asyncio.Future[list[Encoded]]


class Tokenizing:
    """Tokeniser threads fed with the chunks of many calls at once.

    A one-text call is tokenised in 0.03-0.1 ms (64-256 characters), but a hop to a worker thread and
    back costs several times that in CPU (a future, a wake-up, the GIL changing hands, the loop's
    wake-up), and under load one-text calls arrive by the dozen. So the chunks that arrive in one turn
    of the event loop, or while every thread is busy, go to a thread together, up to one chunk's bounds
    (CHUNK_TEXTS, CHUNK_CHARS), in one tokenizer call and one hop; while no execution slot is free (or
    texts already wait: `model_free` is False), so do those of the next GATHER_S. A chunk whose caller
    has gone before its turn is skipped. Chunks of different encode functions (texts, or pairs with one
    query) never share a call.

    A short call (at most `inline_chars` characters) that arrives while the model is idle is tokenised on
    the loop instead: nothing else waits on the loop then, and the call's latency is all on its own
    critical path, so the hop's cost is latency saved (a lone call) for about 0.1 ms of loop time. While
    the model is busy every call hops, so under load the loop keeps its time for the calls it serves.
    """

    def __init__(
        self,
        executor: Executor,
        threads: int,
        inline_chars: int = 0,
        model_idle: Callable[[], bool] = lambda: True,
        model_free: Callable[[], bool] = lambda: True,
    ) -> None:
        self._executor = executor
        self._threads = threads
        self._inline_chars = inline_chars
        self._model_idle = model_idle
        self._model_free = model_free
        self._pending: deque[_Chunk] = deque()
        self._busy = 0
        self._pending_texts = 0
        # A flush scheduled for the end of this turn of the loop, or for GATHER_S from now.
        self._soon: asyncio.Handle | None = None
        self._later: asyncio.TimerHandle | None = None

    async def encode(self, encode: Encode, texts: Sequence[str]) -> list[Encoded]:
        if (
            self._inline_chars
            and sum(len(text) for text in texts) <= self._inline_chars
            and self._model_idle()
        ):
            return encode(texts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Encoded]] = loop.create_future()
        self._pending.append(_Chunk(encode, texts, future))
        self._pending_texts += len(texts)
        if self._pending_texts >= CHUNK_TEXTS or self._model_free():
            # At the end of this turn of the loop: the calls that arrived in it go together.
            if self._soon is None:
                self._soon = loop.call_soon(self._flush)
        elif self._soon is None and self._later is None:
            # No execution slot is free, so the call waits for a running batch anyway: the calls of
            # the next GATHER_S go to a thread with it, in one hop.
            self._later = loop.call_later(GATHER_S, self._flush)
        return await future

    def _flush(self) -> None:
        for handle in (self._soon, self._later):
            if handle is not None:
                handle.cancel()
        self._soon = self._later = None
        loop = asyncio.get_running_loop()
        while self._pending and self._busy < self._threads:
            group = self._take()
            if not group:
                continue
            self._busy += 1
            job = loop.run_in_executor(self._executor, _encode_group, group)
            job.add_done_callback(functools.partial(self._done, group))

    def _take(self) -> list[_Chunk]:
        """The oldest pending chunks of one encode function, within one chunk's bounds (at least one)."""
        group: list[_Chunk] = []
        texts = chars = 0
        while self._pending:
            chunk = self._pending[0]
            if chunk.future.done():  # its caller went away
                self._pending.popleft()
                self._pending_texts -= len(chunk.texts)
                continue
            size = sum(len(text) for text in chunk.texts)
            if group and (
                chunk.encode != group[0].encode
                or texts + len(chunk.texts) > CHUNK_TEXTS
                or chars + size > CHUNK_CHARS
            ):
                break
            group.append(self._pending.popleft())
            self._pending_texts -= len(chunk.texts)
            texts += len(chunk.texts)
            chars += size
        return group

    def _done(self, group: list[_Chunk], job: asyncio.Future[list[list[Encoded] | Exception]]) -> None:
        self._busy -= 1
        # Cancelled: the thread pool is shutting down. (_encode_group returns the tokenizer's errors.)
        outcomes = None if job.cancelled() else job.result()
        for i, chunk in enumerate(group):
            if chunk.future.done():
                continue
            if outcomes is None:
                chunk.future.cancel()
            elif isinstance(outcome := outcomes[i], Exception):
                chunk.future.set_exception(outcome)
            else:
                chunk.future.set_result(outcome)
        self._flush()


def _encode_group(group: Sequence[_Chunk]) -> list[list[Encoded] | Exception]:
    """In a tokeniser thread: every chunk of `group` in one call of their encode function.

    Should that call fail, each chunk is tokenised alone, so that a text that breaks the tokenizer fails
    its own call and no other."""
    try:
        encoded = group[0].encode([text for chunk in group for text in chunk.texts])
    except Exception as exc:
        return [exc] if len(group) == 1 else [_encode_alone(chunk) for chunk in group]
    out: list[list[Encoded] | Exception] = []
    start = 0
    for chunk in group:
        out.append(encoded[start : start + len(chunk.texts)])
        start += len(chunk.texts)
    return out


def _encode_alone(chunk: _Chunk) -> list[Encoded] | Exception:
    try:
        return chunk.encode(chunk.texts)
    except Exception as exc:
        return exc


def chunks(texts: Sequence[str]) -> Iterator[Sequence[str]]:
    """`texts` in consecutive slices of at most CHUNK_TEXTS texts and (but for a single longer text)
    CHUNK_CHARS characters."""
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and stop - start < CHUNK_TEXTS:
            chars += len(texts[stop])
            if chars > CHUNK_CHARS and stop > start:
                break
            stop += 1
        yield texts[start:stop]
        start = stop


def user_vector(weights: npt.NDArray[np.float64], history: FloatArray) -> FloatArray:
    """normalize(sum_i w_i * normalize(e_i)), in float64 with the weights scaled to a maximum of 1.

    So any positive common scale of the weights gives the same vector (float32 sums under- and overflow
    at extreme scales, and a tiny sum would meet the normalisation's floor). A sum of exactly zero has no
    direction: it is the caller's to fix, not a silent zero vector.
    """
    scaled = weights / weights.max()
    items = history.astype(np.float64)
    items /= np.maximum(np.linalg.norm(items, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    summed = scaled @ items
    norm = float(np.linalg.norm(summed))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidArgument(
            "the weighted user_history vectors sum to zero (they cancel out): change the weights or texts"
        )
    vector: FloatArray = (summed / norm).astype(np.float32)
    return vector


def probabilities_of(logits: FloatArray, multi_label: bool) -> FloatArray:
    """Softmax over each row (one label per text), or an independent sigmoid per label (multi-label)."""
    values = logits.astype(np.float64)
    if multi_label:
        result = 0.5 * (1.0 + np.tanh(0.5 * values))  # the sigmoid, without exp's overflow
    else:
        values -= values.max(axis=1, keepdims=True)
        exp = np.exp(values)
        result = exp / exp.sum(axis=1, keepdims=True)
    out: FloatArray = result.astype(np.float32)
    return out


def history_weights(weights: Sequence[float], count: int) -> npt.NDArray[np.float64]:
    """A user history's weights, checked: one finite, non-negative weight per item, not all zero; all 1
    when none are given."""
    if not weights:
        return np.ones(count, dtype=np.float64)
    if len(weights) != count:
        raise InvalidArgument(
            f"user_history has {count} items but {len(weights)} weights: send one weight per item, or none"
        )
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument(
                f"user_history.weights[{index}] is {weight}: weights must be finite and >= 0"
            )
    checked = np.asarray(weights, dtype=np.float64)
    if not checked.any():
        raise InvalidArgument("user_history.weights are all zero: at least one must be positive")
    return checked
