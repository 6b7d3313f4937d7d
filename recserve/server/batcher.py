"""The dynamic batcher: one asyncio task turns queued texts into length-sorted, token-budgeted batches."""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from recserve.server.errors import DeadlineExceeded, Internal, Overloaded, Unavailable
from recserve.tensors import Encoded, FloatArray

if TYPE_CHECKING:
    from recserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# How many recent batches the throughput estimate (and so the backlog gauge) looks back over.
_RATE_BATCHES = 64
# Admission by time lets a call's estimated queue wait take at most this share of what its deadline leaves
# after its own work: the estimate is an average that can be off by as much as itself, and a call admitted
# at the edge would often just miss its deadline. Its own work is not discounted, so a tight deadline into
# an empty queue is admitted whenever the work fits.
_DEADLINE_SHARE = 0.5
# Texts that arrived this close after the anchor (or within the batch's max_delay) are its contemporaries.
_CONTEMPORARY_S = 0.002
# A caller that goes away this close to its deadline is counted as expired (service.DEADLINE_SLACK_S).
_DEADLINE_SLACK_S = 0.01


@dataclass(frozen=True)
class BatcherConfig:
    """How batches are formed. Every limit is per batch unless it says otherwise."""

    max_batch_size: int = 32
    """Texts per batch; 1 turns batching off (each text runs alone, in arrival order)."""
    max_batch_tokens: int = 8192
    """Padded tokens per batch (longest x count). A longer text runs alone."""
    max_delay_s: float = 0.005
    """A batch leaves at most this long after its oldest member arrived (if an execution slot is free)."""
    max_queue_texts: int = 4096
    """Texts waiting, all requests together; a submit that would exceed it fails at once (Overloaded)."""
    max_queue_seconds: float = 5.0
    """Seconds of queued work (queued tokens / measured rate) a call may wait behind; a call that would
    wait longer, or whose wait would take over half of what its deadline leaves after its own work, fails
    at once (Overloaded)."""
    window_texts: int = 64
    """Look-ahead: the oldest this many queued texts are sorted by length before a batch is cut."""
    max_concurrent_batches: int = 1
    """Model executions in flight at once; the next batch is assembled while these run."""
    min_wait_share: float = 0.6
    """A text joins a batch only if it has waited at least this share of the wait of the batch's anchor
    (the text whose turn it is). Sorting the window by length alone lets a young text of the anchor's
    length jump the queue while older texts of other lengths wait on, which is what makes a closed loop's
    p99 twice its mean; with this floor a batch takes the anchor's contemporaries and the queue is served
    close to arrival order, in smaller batches (docs/decisions/0008 has the trade-off). 0 = length only."""
    max_padding_ratio: float = 1.15
    """Padded / real tokens allowed in a batch of two or more texts: a longer text that would push the batch
    over it closes the batch instead. Lower pads less but cuts smaller batches; inf turns the check off
    (sensible where a batch's fixed cost dwarfs its per-token cost, as on a GPU with short texts)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue_texts", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window_texts < self.max_batch_size:
            raise ValueError(
                f"window_texts ({self.window_texts}) must be at least max_batch_size ({self.max_batch_size})"
            )
        if not self.max_delay_s >= 0.0:
            raise ValueError(f"max_delay_s must be >= 0, got {self.max_delay_s}")
        if not self.max_padding_ratio >= 1.0:
            raise ValueError(f"max_padding_ratio must be >= 1, got {self.max_padding_ratio}")
        if not 0.0 <= self.min_wait_share <= 1.0:
            raise ValueError(f"min_wait_share must be within 0..1, got {self.min_wait_share}")
        if not self.max_queue_seconds > 0.0:
            raise ValueError(f"max_queue_seconds must be > 0, got {self.max_queue_seconds}")

    @classmethod
    def from_settings(cls, settings: ServerSettings, max_concurrent_batches: int = 1) -> BatcherConfig:
        """The batcher's part of the server settings (whose names it shares); the runtime decides how many
        batches may run at once."""
        return cls(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_texts=settings.max_queue_texts,
            max_queue_seconds=settings.max_queue_seconds,
            window_texts=settings.window_texts,
            max_concurrent_batches=max_concurrent_batches,
            max_padding_ratio=settings.max_padding_ratio,
            min_wait_share=settings.min_wait_share,
        )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a submitted request resolves to.

    `queue_s` runs from submit to the start of the request's first batch, `infer_s` from there to the end of
    its last batch (a request split across batches may wait between them), so together they are the request's
    whole time in the batcher.
    """

    rows: FloatArray
    """One row per submitted item, in submit order."""
    queue_s: float
    infer_s: float


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot for diagnostics and gauges."""

    queued_texts: int
    queued_tokens: int
    running_batches: int
    tokens_per_second: float
    """Real tokens per second while the model was busy, over recent batches; 0.0 until two have finished."""

    @property
    def backlog_seconds(self) -> float:
        """Seconds of model work waiting (an autoscaling signal); 0.0 while the rate is unknown."""
        return self.queued_tokens / self.tokens_per_second if self.tokens_per_second > 0 else 0.0


class Reservation:
    """Room for a call's texts in the queue, held from admission until they are queued or the call ends.

    Admission reserves before tokenising, so that a call the queue has no room for is refused before any
    work is spent on it. Release is idempotent: `submit` turns the room into queued texts, and leaving the
    `with` block gives back whatever was not used.
    """

    __slots__ = ("_batcher", "texts")

    def __init__(self, batcher: Batcher, texts: int) -> None:
        self._batcher = batcher
        self.texts = texts

    def release(self) -> None:
        self._batcher._reserved_texts -= self.texts
        self.texts = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BatchObserver(Protocol):
    """Hooks for metrics (server/metrics.py). Subclass it to inherit a no-op for each hook not overridden.

    NOTE: the explicit `return`s keep the hooks concrete (a Protocol method with an empty body is abstract).
    """

    def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        """A batch was handed to the executor."""
        return

    def batch_finished(self, size: int, seconds: float, ok: bool) -> None:
        """A batch came back; ok is False when it failed (or returned the wrong number of rows)."""
        return

    def queue_wait(self, seconds: float) -> None:
        """One request's time from submit to the start of its first batch."""
        return

    def dropped(self, reason: str, texts: int) -> None:
        """Texts of one request dropped before inference; reason is "deadline" or "cancelled"."""
        return

    def queue_changed(self, texts: int, tokens: int) -> None:
        """The queue now holds this many texts and real tokens."""
        return


class NullObserver(BatchObserver):
    """Observes nothing: the default."""


class _GuardedObserver(BatchObserver):
    """Forwards to the real observer; a failing metric must not take serving down with it."""

    def __init__(self, inner: BatchObserver) -> None:
        self._inner = inner

    def _call(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("batch observer %s failed", getattr(hook, "__name__", hook))

    def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        self._call(self._inner.batch_started, size, real_tokens, padded_tokens)

    def batch_finished(self, size: int, seconds: float, ok: bool) -> None:
        self._call(self._inner.batch_finished, size, seconds, ok)

    def queue_wait(self, seconds: float) -> None:
        self._call(self._inner.queue_wait, seconds)

    def dropped(self, reason: str, texts: int) -> None:
        self._call(self._inner.dropped, reason, texts)

    def queue_changed(self, texts: int, tokens: int) -> None:
        self._call(self._inner.queue_changed, texts, tokens)


def cut_batch(
    lengths: Sequence[int], anchor: int, max_size: int, max_tokens: int, max_padding_ratio: float
) -> tuple[int, int, bool]:
    """Chooses the next batch from a window of text lengths sorted ascending.

    Returns `(lo, hi, closed)`: the batch is `lengths[lo:hi]`, the contiguous run containing `anchor` (the
    oldest text, so nothing starves) with the most texts that keeps within `max_size`, `max_tokens` padded
    tokens and `max_padding_ratio` (ties: the least padding). A single text is always allowed, however long.
    A contiguous run of a sorted window pads least for its size. `closed` says the batch should leave without
    waiting: it is full (by count, or no room for one more text as long as its longest), or a text of the
    window was left out because it would break a limit. Lengths must be at least 1.
    """
    n = len(lengths)
    if not 0 <= anchor < n:
        raise ValueError(f"anchor {anchor} outside a window of {n}")
    if n == 1:
        # A lone text, the usual case at light load: the grid below costs tens of microseconds of numpy
        # set-up, more when a model run has just evicted the caches, all of it on a lone call's latency.
        return 0, 1, max_size == 1 or 2 * lengths[0] > max_tokens
    sorted_lengths = np.asarray(lengths, dtype=np.int64)
    cumulative = np.concatenate(([0], np.cumsum(sorted_lengths)))
    # Every run [lo, hi) that contains the anchor and has at most max_size texts, evaluated at once: the
    # window is at most a few hundred texts, so this is a (max_size x max_size) grid at worst.
    lo = np.arange(max(0, anchor - max_size + 1), anchor + 1)[:, None]
    hi = np.arange(anchor + 1, min(n, anchor + max_size) + 1)[None, :]
    count = hi - lo
    padded = sorted_lengths[hi - 1] * count
    real = cumulative[hi] - cumulative[lo]
    fits = (count <= max_size) & (
        (count == 1) | ((padded <= max_tokens) & (padded <= max_padding_ratio * real))
    )
    best = int(count[fits].max())  # the anchor alone always fits
    # Among the largest runs, the least padded one.
    ratio = np.where(fits & (count == best), padded / real, np.inf)
    i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    start, stop = int(lo[i, 0]), int(hi[0, j])
    longest = int(sorted_lengths[stop - 1])
    closed = best == max_size or (best + 1) * longest > max_tokens or start > 0 or stop < n
    return start, stop, closed


class _Request:
    """One submit: its future, and where its rows are gathered as its texts come back from their batches."""

    __slots__ = (
        "arrival",
        "deadline",
        "dropped",
        "due",
        "first_start",
        "future",
        "in_window",
        "last_batch",
        "pending",
        "queued",
        "rows",
        "seq",
        "size",
        "waiting",
    )

    def __init__(
        self,
        future: asyncio.Future[BatchResult],
        size: int,
        arrival: float,
        due: float,
        deadline: float | None,
        seq: int,
    ) -> None:
        self.future = future
        self.arrival = arrival
        self.seq = seq  # arrival order, for ties
        # When a batch holding this request's texts must leave: computed once, here, on the loop's clock.
        self.due = due
        self.deadline = deadline
        self.size = size
        self.pending = size  # texts without a row yet
        self.queued = size  # texts still in the queue
        self.dropped = False
        self.first_start: float | None = None
        self.rows: FloatArray | None = None
        self.waiting: deque[_Item] = deque()  # its texts not yet in the look-ahead window, in order
        self.in_window = 0  # its texts in the window
        self.last_batch = -1  # the number of the last batch that took one of its texts; -1: none yet


@dataclass(slots=True)
class _Item:
    """One text of a request, queued."""

    request: _Request
    index: int  # its position in the request
    encoded: Encoded
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = _planned(self.encoded)


def _turn(item: _Item) -> tuple[int, int, int]:
    """Whose text anchors the next batch: the request served least recently, then the oldest, then its
    first text."""
    return item.request.last_batch, item.request.seq, item.index


def _planned(encoded: Encoded) -> int:
    """Planning length: an (impossible) empty encoding still occupies a row, and must not divide by zero."""
    return max(1, encoded.length)


class Batcher:
    """Queues tokenised texts, cuts them into batches and runs them on `run_batch` in `executor` threads.

    `submit` is synchronous (call it on the event loop's thread) and returns a future; one task (started by
    `start`) owns the queue and decides when each batch leaves. `observer` receives metrics hooks;
    `on_fatal` is called once if that task ever dies, after every pending request has failed with
    Unavailable.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Encoded]], FloatArray],
        config: BatcherConfig,
        executor: concurrent.futures.Executor,
        observer: BatchObserver | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._config = config
        self._executor = executor
        self._observer: BatchObserver = _GuardedObserver(observer or NullObserver())
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # The queue: the look-ahead window that batches are cut from, and behind it the requests whose
        # texts wait to enter it (in arrival order), see _refill.
        self._window: list[_Item] = []
        self._backlog: deque[_Request] = deque()
        # (deadline, seq, request) of queued requests with a deadline, soonest first, to expire them on time.
        self._deadlines: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()
        self._batches_cut = 0
        self._queued_texts = 0
        self._queued_tokens = 0
        self._reserved_texts = 0  # admitted, still being tokenised (see Reservation)
        self._queued_requests = 0  # requests with texts queued (in the window or behind it)
        self._running = 0
        self._closing = False
        self._dead = False
        # Throughput: a clock that advances only while a batch runs, and (busy clock, tokens) at each finish.
        self._busy_total = 0.0
        self._busy_since = 0.0
        self._recent: deque[tuple[float, int]] = deque(maxlen=_RATE_BATCHES)
        self._recent_seconds: deque[float] = deque(maxlen=_RATE_BATCHES)  # how long recent batches took
        # Derived from the two above when a batch finishes, not on every admission check (a hot path).
        self._rate = 0.0
        self._batch_s = 0.0

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Starts the batch loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("the batcher was already started")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="recserve-batcher")
        self._task.add_done_callback(self._loop_exited)

    def reserve(self, texts: int, deadline: float | None = None) -> Reservation:
        """Admits a call of `texts` texts before any work is spent on it, or refuses it at once.

        Raises Overloaded when the queued and reserved texts leave no room for them within
        `max_queue_texts`, or when the queued work alone would outlast `max_queue_seconds` or the call's
        `deadline` (absolute, on the loop's clock); DeadlineExceeded when that has passed already;
        Unavailable when stopping, stopped or dead.
        """
        self._check_room(texts, 0)
        assert self._loop is not None  # _check_room refuses a batcher that was never started
        if deadline is not None and self._loop.time() >= deadline:
            raise DeadlineExceeded("the deadline passed before the call was admitted")
        self._check_time(texts, 0, deadline)
        self._reserved_texts += texts
        return Reservation(self, texts)

    def _check_time(self, texts: int, own_tokens: int, deadline: float | None) -> None:
        """Admission by time: the call's wait (and its own work) must fit its deadline and the bound.

        The wait is the queued work in seconds, or, when fewer calls are queued than that implies, the
        turns a call of `texts` texts takes under fair batching: about one batch per queued call per
        round, a round per batch of its own texts. So a small call is admitted beside a few huge ones, and
        a queue of many small calls is judged as the FIFO it is.
        """
        rate, batch_s = self._rate, self._batch_s
        if rate <= 0.0:
            return  # nothing measured yet: only the count bound applies
        assert self._loop is not None
        # A call's own work is the batch it rides in (batch_s), not its share of the tokens: under load a
        # batch of dozens of texts takes a good part of a second on a CPU.
        rounds = -(-texts // self._config.max_batch_size)
        turns = rounds * (self._queued_requests + 1) * batch_s / self._config.max_concurrent_batches
        wait = min(self._queued_tokens / rate, turns)
        if wait > self._config.max_queue_seconds:
            raise Overloaded(
                f"the queue holds about {wait:.2f} s of work, more than this server queues "
                f"({self._config.max_queue_seconds:g} s): retry later or on another replica"
            )
        if deadline is not None:
            left = deadline - self._loop.time()
            own_s = max(own_tokens / rate, batch_s)
            if own_s > left:
                # Not an overload: no replica would finish it in time, so retrying elsewhere is no help.
                raise DeadlineExceeded(
                    f"the call's deadline leaves {max(left, 0.0):.3f} s, less than its own work takes here "
                    f"(about {own_s:.3f} s): send a longer deadline"
                )
            if wait > _DEADLINE_SHARE * (left - own_s):
                raise Overloaded(
                    f"this call would wait about {wait:.2f} s here behind the queue, and its deadline leaves "
                    f"{max(left, 0.0):.2f} s, too little to be sure of that and its own work (about "
                    f"{own_s:.2f} s): retry elsewhere or with a longer deadline"
                )

    def _check_room(self, texts: int, held: int) -> None:
        if self._loop is None or self._closing or self._dead:
            raise Unavailable("the batcher is not accepting requests")
        limit = self._config.max_queue_texts
        if self._queued_texts + self._reserved_texts - held + texts > limit:
            raise Overloaded(
                f"the queue is full ({self._queued_texts} texts waiting and {self._reserved_texts} being "
                f"tokenised, of {limit}; this call has {texts}): retry later or on another replica"
            )

    def submit(
        self, items: Sequence[Encoded], deadline: float | None = None, room: Reservation | None = None
    ) -> asyncio.Future[BatchResult]:
        """Queues `items` (one request) and returns a future of its `BatchResult`.

        `deadline` is absolute, on the event loop's clock; `room`, if given, is this call's reservation and
        is used up. Raises at once: Overloaded when the queue would exceed `max_queue_texts`, Unavailable
        when stopping, stopped or dead, DeadlineExceeded when `deadline` has already passed.
        """
        size = len(items)
        if size == 0:
            raise ValueError("submit needs at least one item")  # callers validate; this is a bug guard
        self._check_room(size, room.texts if room is not None else 0)
        assert self._loop is not None  # _check_room refuses a batcher that was never started
        now = self._loop.time()
        if deadline is not None and now >= deadline:
            self._observer.dropped("deadline", size)
            raise DeadlineExceeded("the deadline passed before the request was queued")
        self._check_time(size, sum(_planned(encoded) for encoded in items), deadline)
        if room is not None:
            room.release()
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        request = _Request(future, size, now, now + self._config.max_delay_s, deadline, next(self._seq))
        for index, encoded in enumerate(items):
            item = _Item(request, index, encoded)
            request.waiting.append(item)
            self._queued_tokens += item.length
        self._backlog.append(request)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, request.seq, request))
            if len(self._deadlines) > 64 + 2 * len(self._backlog) + len(self._window):
                # Answered requests stay in the heap until their deadline; prune them so that it (and the
                # rows they hold) cannot grow with the call rate times the deadline.
                self._deadlines = [entry for entry in self._deadlines if not entry[2].future.done()]
                heapq.heapify(self._deadlines)
        # A caller that goes away frees its queue room at once, not when its texts reach the window.
        future.add_done_callback(lambda f: self._abandoned(request) if f.cancelled() else None)
        self._queued_texts += size
        self._queued_requests += 1
        self._observer.queue_changed(self._queued_texts, self._queued_tokens)
        self._wake.set()
        return future

    # NOTE: `timeout` bounds only the drain; what is left then is failed, which wrapping the call in
    # asyncio.timeout could not do.
    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stops taking requests; with `drain`, first finishes queued and running work (within `timeout`).

        Whatever is left after that (everything, without `drain`) fails with Unavailable; running batches are
        abandoned (their executor threads finish on their own, and their results are discarded).
        """
        self._closing = True
        self._wake.set()
        if drain:
            try:
                async with asyncio.timeout(timeout):
                    await self._drained()
            except TimeoutError:
                logger.warning("batcher drain timed out with %d texts queued", self._queued_texts)
        self._fail_queued(lambda: Unavailable("the server is shutting down"))
        tasks = [t for t in (self._task, *self._batch_tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def alive(self) -> bool:
        """Started, not stopping and its loop not dead: submits are accepted."""
        return self._task is not None and not self._closing and not self._dead

    @property
    def idle(self) -> bool:
        """No batch runs and no text waits: a call submitted now starts at once, alone."""
        return self._running == 0 and self._queued_texts == 0

    @property
    def free(self) -> bool:
        """An execution slot is free and no text waits: a call submitted now starts at once (beside the
        batches running, if any)."""
        return self._running < self._config.max_concurrent_batches and self._queued_texts == 0

    @property
    def stats(self) -> BatcherStats:
        """The queue, the running batches and recent throughput (for the backlog gauge)."""
        return BatcherStats(self._queued_texts, self._queued_tokens, self._running, self._rate)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wake_at: float | None = None
            if self._running < self._config.max_concurrent_batches:
                batch, wake_at = self._cut(now)
                if batch is not None:
                    self._launch(batch, now)
                    continue
                if self._closing and self._queued_texts == 0:
                    return
            else:
                # No slot to cut a batch into: still answer calls whose deadline passes meanwhile.
                self._expire(now)
            if self._deadlines:
                soonest = self._deadlines[0][0]
                wake_at = soonest if wake_at is None else min(wake_at, soonest)
            # Sleep until a submit, a finished batch or stop() wakes us, or the oldest text falls due, or
            # a queued call's deadline passes.
            self._wake.clear()
            try:
                async with asyncio.timeout_at(wake_at):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _cut(self, now: float) -> tuple[list[_Item] | None, float | None]:
        """Returns the next batch if it should leave now, else None and when it falls due.

        Fairness: the batch is anchored on a text of the request served least recently (ties: the oldest),
        so that a call with thousands of texts shares the model batch by batch with the calls behind it
        instead of holding them for its whole duration. A request of one text, or a stream of them, is
        served in arrival order.
        """
        self._refill(now)
        window = self._window
        if not window:
            return None, None
        config = self._config
        first = min(range(len(window)), key=lambda i: _turn(window[i]))
        anchor_arrival = window[first].request.arrival
        floor = max(
            now - config.min_wait_share * (now - anchor_arrival),
            anchor_arrival + config.max_delay_s + _CONTEMPORARY_S,
        )
        # The anchor and the texts that have waited nearly as long, by length (stable: texts of equal
        # length keep their order in the window).
        eligible = [i for i, item in enumerate(window) if i == first or item.request.arrival <= floor]
        order = sorted(eligible, key=lambda i: window[i].length)
        lengths = [window[i].length for i in order]
        anchor = order.index(first)
        start, stop, closed = cut_batch(
            lengths, anchor, config.max_batch_size, config.max_batch_tokens, config.max_padding_ratio
        )
        due = min(item.request.due for item in window)
        # NOTE: a full window leaves at once too: texts arriving now land behind it and could not join.
        ready = closed or len(window) >= config.window_texts or now >= due or self._closing
        if not ready:
            return None, due
        chosen = set(order[start:stop])
        batch = [window[i] for i in order[start:stop]]  # shortest first
        self._window = [item for i, item in enumerate(window) if i not in chosen]
        self._batches_cut += 1
        for item in batch:
            item.request.last_batch = self._batches_cut
            self._dequeue(item)
        self._observer.queue_changed(self._queued_texts, self._queued_tokens)
        return batch, None

    def _refill(self, now: float) -> None:
        """Drops dead texts from the window and tops it up from the requests behind it.

        The request with the fewest texts in the window goes first (ties: the oldest), one text at a time:
        a call that arrives behind a large one gets into the window as soon as a batch frees room, rather
        than after every text of the large call.
        """
        before = self._queued_texts
        self._expire(now)
        window = [item for item in self._window if self._keep(item, now)]
        free = self._config.window_texts - len(window)
        if free > 0 and self._backlog:
            active = [r for r in self._backlog if r.waiting and self._alive(r, now)]
            while free > 0 and active:
                level = min(r.in_window for r in active)
                for request in active:
                    if request.in_window == level and free > 0:
                        window.append(request.waiting.popleft())
                        request.in_window += 1
                        free -= 1
                active = [r for r in active if r.waiting]
            self._backlog = deque(r for r in self._backlog if r.waiting)
        self._window = window
        if self._queued_texts != before:
            self._observer.queue_changed(self._queued_texts, self._queued_tokens)

    def _expire(self, now: float) -> None:
        """Fails every queued request whose deadline has passed, and frees its room."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            self._alive(request, now)

    def _abandoned(self, request: _Request) -> None:
        """A caller went away (its future was cancelled): its queued texts leave the queue now."""
        if self._loop is None or request.dropped:
            return
        before = self._queued_texts
        self._alive(request, self._loop.time())
        if self._queued_texts != before:
            self._observer.queue_changed(self._queued_texts, self._queued_tokens)
        self._wake.set()

    def _keep(self, item: _Item, now: float) -> bool:
        """False, and the text leaves the queue, when its caller is gone, already answered or out of time."""
        if self._alive(item.request, now):
            return True
        self._dequeue(item)
        return False

    def _alive(self, request: _Request, now: float) -> bool:
        """Whether `request` still wants its texts run. The first time it does not, it is dropped: failed
        with DeadlineExceeded if its deadline passed, counted, and its texts outside the window dequeued
        (those in the window leave at the next refill)."""
        if request.dropped:
            return False
        expired = request.deadline is not None and now >= request.deadline
        if request.future.done():
            # Cancelled by its caller (by gRPC, when the deadline passed: its timer and this loop's clock
            # may disagree by a hair), or already failed by another of its batches (reported there).
            reason = None
            if request.future.cancelled():
                late = request.deadline is not None and now >= request.deadline - _DEADLINE_SLACK_S
                reason = "deadline" if late else "cancelled"
        elif expired:
            reason = "deadline"
            request.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
        else:
            return True
        request.dropped = True
        if reason is not None:
            self._observer.dropped(reason, request.queued)
        while request.waiting:
            self._dequeue(request.waiting.popleft(), in_window=False)
        return False

    def _dequeue(self, item: _Item, in_window: bool = True) -> None:
        item.request.queued -= 1
        if item.request.queued == 0:
            self._queued_requests -= 1
        if in_window:
            item.request.in_window -= 1
        self._queued_texts -= 1
        self._queued_tokens -= item.length

    def _launch(self, batch: list[_Item], now: float) -> None:
        if self._running == 0:
            self._busy_since = now
        self._running += 1
        for item in batch:
            request = item.request
            if request.first_start is None:
                request.first_start = now
                self._observer.queue_wait(now - request.arrival)
        real = sum(item.length for item in batch)
        self._observer.batch_started(len(batch), real, batch[-1].length * len(batch))
        task = asyncio.get_running_loop().create_task(self._execute(batch, now, real))
        # Held until done, so a running batch is never garbage-collected; stop() also finds them here.
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _execute(self, batch: list[_Item], start: float, real_tokens: int) -> None:
        loop = asyncio.get_running_loop()
        ok = False
        try:
            rows = await loop.run_in_executor(self._executor, self._run_batch, [i.encoded for i in batch])
            if not (isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[0] == len(batch)):
                shape = getattr(rows, "shape", type(rows).__name__)
                raise RuntimeError(f"the model returned {shape} for a batch of {len(batch)} texts")
            ok = True
        except asyncio.CancelledError:
            self._fail(batch, lambda: Unavailable("the server is shutting down"))
            raise
        except Exception as exc:
            logger.exception("a batch of %d texts failed", len(batch))
            self._fail(batch, lambda: Internal("inference failed"), cause=exc)
        finally:
            end = loop.time()
            self._finished(batch, end - start, real_tokens if ok else 0, ok, end)
        if ok:
            try:
                self._deliver(batch, rows, end)
            except Exception as exc:
                # A bug here must still answer every caller, not leave them waiting forever.
                logger.exception("delivering a batch's rows failed")
                self._fail(batch, lambda: Internal("inference failed"), cause=exc)

    def _finished(self, batch: list[_Item], seconds: float, tokens: int, ok: bool, end: float) -> None:
        # The busy clock has run since _busy_since, when the first of the batches now running started.
        busy_clock = self._busy_total + (end - self._busy_since)
        self._running -= 1
        if self._running == 0:
            self._busy_total = busy_clock
        self._recent.append((busy_clock, tokens))
        self._recent_seconds.append(seconds)
        self._batch_s = sum(self._recent_seconds) / len(self._recent_seconds)
        if len(self._recent) >= 2:
            # The first entry only marks where the span starts: its tokens were run before it.
            busy = self._recent[-1][0] - self._recent[0][0]
            run = sum(tokens for _, tokens in self._recent) - self._recent[0][1]
            self._rate = run / busy if busy > 0 else 0.0
        self._observer.batch_finished(len(batch), seconds, ok)
        # Frees an execution slot: the loop cuts the next batch from what is queued at this moment.
        self._wake.set()

    def _deliver(self, batch: list[_Item], rows: FloatArray, end: float) -> None:
        for item, row in zip(batch, rows, strict=True):
            request = item.request
            if request.future.done():
                continue
            if request.rows is None:
                request.rows = np.empty((request.size, row.shape[0]), dtype=rows.dtype)
            if request.rows.shape[1] != row.shape[0]:
                logger.error("batches of one request returned rows of different widths")
                request.future.set_exception(Internal("inference failed"))
                continue
            request.rows[item.index] = row
            request.pending -= 1
            if request.pending == 0:
                assert request.first_start is not None  # set when its first batch launched
                result = BatchResult(
                    request.rows, request.first_start - request.arrival, end - request.first_start
                )
                request.future.set_result(result)

    def _fail(
        self, batch: list[_Item], error: Callable[[], Exception], cause: BaseException | None = None
    ) -> None:
        # A fresh exception per caller: one instance raised in many tasks would collect all their tracebacks.
        for item in batch:
            future = item.request.future
            if not future.done():
                exc = error()
                exc.__cause__ = cause
                future.set_exception(exc)

    # ------------------------------------------------------------------ shutdown and supervision

    async def _drained(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])
        while self._batch_tasks:
            await asyncio.wait(list(self._batch_tasks))

    def _fail_queued(self, error: Callable[[], Exception]) -> None:
        waiting = [item for request in self._backlog for item in request.waiting]
        items = [*self._window, *waiting]
        for item in self._window:
            self._dequeue(item)
        for item in waiting:
            self._dequeue(item, in_window=False)
        for request in self._backlog:
            request.waiting.clear()
        self._window = []
        self._backlog.clear()
        self._deadlines.clear()
        self._fail(items, error)
        if items:
            self._observer.queue_changed(self._queued_texts, self._queued_tokens)

    def _loop_exited(self, task: asyncio.Task[None]) -> None:
        """The supervisor: if the loop ends other than by stop(), nobody will answer the queue, so fail it."""
        error = None if task.cancelled() else task.exception()
        if self._closing and error is None:
            return
        self._dead = True
        cause = error or RuntimeError("the batch loop exited unexpectedly")
        logger.critical("the batch loop died; failing pending requests", exc_info=cause)
        self._fail_queued(lambda: Unavailable("the batcher stopped working"))
        if self._on_fatal is not None:
            try:
                self._on_fatal(cause)
            except Exception:
                logger.exception("on_fatal failed")
