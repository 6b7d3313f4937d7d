"""The dynamic batcher, driven directly through its queue with a fake deterministic model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest

from recserve.server import batcher as batcher_module
from recserve.server.batcher import Batcher, BatcherConfig, BatchObserver, BatchResult, cut_batch
from recserve.server.errors import DeadlineExceeded, Internal, Overloaded, Unavailable
from recserve.tensors import Encoded, FloatArray

# Tags of the texts that hold the model busy while a test queues work behind them.
BLOCKER = 10_000


def text(tag: int, length: int) -> Encoded:
    """A text the fake model recognises by `tag`."""
    return Encoded(ids=np.full(length, tag, dtype=np.int64), type_ids=np.zeros(length, dtype=np.int64))


def row(tag: int, length: int) -> list[float]:
    return [float(tag), float(length), float(tag * length)]


class FakeModel:
    """A run_batch whose rows derive from each text's ids; it records every batch, and can be held or fail."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []  # (tag, length) of each text, in batch order
        self.gate = threading.Event()  # cleared: batches wait here until the test opens it
        self.gate.set()
        self.fail_tags: set[int] = set()
        self.wrong_row_count = False
        self.delay_s = 0.0  # per batch, so that the batcher measures a modest token rate
        self.active = 0
        self.max_active = 0
        self._entered = threading.Semaphore(0)
        self._lock = threading.Lock()

    def __call__(self, batch: Sequence[Encoded]) -> FloatArray:
        texts = [(int(e.ids[0]), e.length) for e in batch]
        with self._lock:
            self.batches.append(texts)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self._entered.release()
        try:
            if not self.gate.wait(timeout=10):
                raise TimeoutError("the test never opened the gate")
            if self.delay_s:
                time.sleep(self.delay_s)
            if any(tag in self.fail_tags for tag, _ in texts):
                raise RuntimeError("model exploded: CUDA error 700 at 0xdeadbeef")
            rows = np.array([row(tag, length) for tag, length in texts], dtype=np.float32)
            return rows[1:] if self.wrong_row_count else rows
        finally:
            with self._lock:
                self.active -= 1

    async def wait_entered(self, batches: int = 1) -> None:
        """Until this many more batches have reached the model."""
        for _ in range(batches):
            assert await asyncio.to_thread(self._entered.acquire, timeout=5), "no batch reached the model"

    def tags(self) -> list[int]:
        return [tag for batch in self.batches for tag, _ in batch]


class RecordingObserver(BatchObserver):
    def __init__(self) -> None:
        self.started: list[tuple[int, int, int]] = []
        self.finished: list[bool] = []
        self.waits: list[float] = []
        self.dropped_texts: list[tuple[str, int]] = []
        self.queue: tuple[int, int] = (0, 0)

    def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        self.started.append((size, real_tokens, padded_tokens))

    def batch_finished(self, size: int, seconds: float, ok: bool) -> None:
        self.finished.append(ok)

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def dropped(self, reason: str, texts: int) -> None:
        self.dropped_texts.append((reason, texts))

    def queue_changed(self, texts: int, tokens: int) -> None:
        self.queue = (texts, tokens)


class Harness:
    def __init__(self) -> None:
        self.model = FakeModel()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self.observer = RecordingObserver()
        self.fatal: list[BaseException] = []
        self._batchers: list[Batcher] = []

    async def start(self, observer: BatchObserver | None = None, **config: Any) -> Batcher:
        batcher = Batcher(
            self.model,
            BatcherConfig(**config),
            self.executor,
            observer or self.observer,
            self.fatal.append,
        )
        await batcher.start()
        self._batchers.append(batcher)
        return batcher

    async def occupy_model(self, batcher: Batcher, texts: int = 1) -> asyncio.Future[BatchResult]:
        """Starts a batch that holds the model at the gate, so what is submitted next queues behind it."""
        self.model.gate.clear()
        future = batcher.submit([text(BLOCKER + i, 3) for i in range(texts)])
        await self.model.wait_entered()
        return future

    async def close(self) -> None:
        self.model.gate.set()
        for batcher in self._batchers:
            await batcher.stop(drain=False)
        self.executor.shutdown(wait=True)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


async def settle(future: asyncio.Future[BatchResult] | asyncio.Task[BatchResult]) -> BatchResult:
    """Its result, or the test fails (instead of hanging) when the batcher never answers."""
    return await asyncio.wait_for(future, 5)


def padding(batches: Sequence[Sequence[tuple[int, int]]]) -> float:
    """Padded / real tokens over `batches`."""
    padded = sum(max(length for _, length in b) * len(b) for b in batches)
    real = sum(length for b in batches for _, length in b)
    return padded / real


async def test_full_batch_leaves_at_once(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=4, max_delay_s=30.0)
    futures = [batcher.submit([text(i, 5)]) for i in range(4)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert harness.model.batches == [[(0, 5), (1, 5), (2, 5), (3, 5)]]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.rows, [row(i, 5)])


async def test_partial_batch_leaves_at_max_delay(harness: Harness) -> None:
    delay = 0.05
    batcher = await harness.start(max_batch_size=8, max_delay_s=delay)
    futures = [batcher.submit([text(i, 5)]) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert harness.model.batches == [[(0, 5), (1, 5), (2, 5)]]
    # The oldest text waited its max_delay (not less), and was not kept much longer either.
    assert delay <= results[0].queue_s < delay + 1.0


async def test_token_budget_is_respected(harness: Harness) -> None:
    rng = random.Random(3)
    batcher = await harness.start(max_batch_tokens=64, max_delay_s=0.01, max_padding_ratio=math.inf)
    blocked = await harness.occupy_model(batcher)
    lengths = [rng.randint(2, 30) for _ in range(40)] + [100]  # the last one alone exceeds the budget
    futures = [batcher.submit([text(i, length)]) for i, length in enumerate(lengths)]
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, *futures), 5)
    batches = harness.model.batches[1:]
    assert sorted(tag for b in batches for tag, _ in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(length for _, length in b) * len(b) <= 64
    assert [(40, 100)] in batches
    assert max(len(b) for b in batches) > 1


@pytest.mark.parametrize("max_padding_ratio", [1.15, math.inf])
async def test_ordering_by_length_cuts_padding(harness: Harness, max_padding_ratio: float) -> None:
    rng = np.random.default_rng(5)
    lengths = np.clip(rng.lognormal(np.log(36) - 0.18, 0.6, size=64).round(), 4, 200).astype(int)
    batcher = await harness.start(max_batch_size=16, max_delay_s=0.01, max_padding_ratio=max_padding_ratio)
    blocked = await harness.occupy_model(batcher)
    futures = [batcher.submit([text(i, int(length))]) for i, length in enumerate(lengths)]
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, *futures), 5)
    cut = padding(harness.model.batches[1:])
    in_arrival_order = padding([[(0, int(x)) for x in lengths[i : i + 16]] for i in range(0, 64, 16)])
    assert cut < in_arrival_order * 0.75  # about 2.5 here
    assert cut <= max_padding_ratio  # with the default check, at most 1.15


async def test_a_long_text_does_not_pad_a_batch_of_short_ones(harness: Harness) -> None:
    batcher = await harness.start(max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    futures = [batcher.submit([text(i, 10)]) for i in range(6)] + [batcher.submit([text(6, 120)])]
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, *futures), 5)
    assert sorted(harness.model.batches[1:]) == [[(i, 10) for i in range(6)], [(6, 120)]]


def test_cut_batch_keeps_the_oldest_and_closes_early_on_padding() -> None:
    inf = math.inf
    # The oldest (the anchor) is always in the batch; a far longer neighbour closes it.
    assert cut_batch([10, 10, 10, 10, 100], 0, 32, 8192, 1.15) == (0, 4, True)
    assert cut_batch([10, 10, 10, 10, 100], 4, 32, 8192, 1.15) == (4, 5, True)
    # Without the padding check everything fits, and nothing is left out, so the batch may still grow.
    assert cut_batch([10, 10, 10, 10, 100], 0, 32, 8192, inf) == (0, 5, False)
    # Full by count: the run of 8 around the anchor that pads least.
    assert cut_batch(list(range(1, 100)), 50, 8, 8192, inf) == (50, 58, True)
    # A text over the token budget runs alone, at once.
    assert cut_batch([500], 0, 32, 100, 1.15) == (0, 1, True)
    assert cut_batch([5, 500], 1, 32, 100, inf) == (1, 2, True)
    # A lone text (its own shortcut) waits for company only while a second one as long could join it.
    assert cut_batch([40], 0, 32, 100, 1.15) == (0, 1, False)
    assert cut_batch([60], 0, 32, 100, 1.15) == (0, 1, True)
    assert cut_batch([40], 0, 1, 100, 1.15) == (0, 1, True)  # batching off: always full


async def test_split_request_comes_back_whole_and_in_order(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=4, max_delay_s=0.01, max_padding_ratio=math.inf)
    lengths = [9, 3, 7, 1, 12, 5, 8, 2, 11, 4]
    result = await settle(batcher.submit([text(100 + i, n) for i, n in enumerate(lengths)]))
    assert len(harness.model.batches) >= 3
    np.testing.assert_array_equal(result.rows, [row(100 + i, n) for i, n in enumerate(lengths)])
    assert result.queue_s >= 0 and result.infer_s >= 0


async def test_error_reaches_every_caller_of_its_batch_and_next_batch_is_served(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.01)
    harness.model.fail_tags = {1}
    with caplog.at_level(logging.ERROR, logger="recserve.server.batcher"):
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                batcher.submit([text(1, 5)]), batcher.submit([text(2, 5)]), return_exceptions=True
            ),
            5,
        )
    for outcome in outcomes:
        assert isinstance(outcome, Internal)
        assert str(outcome) == "inference failed"  # generic: the details stay in the log
        assert isinstance(outcome.__cause__, RuntimeError)
    assert any("CUDA error" in r.exc_text for r in caplog.records if r.exc_text)
    served = await settle(batcher.submit([text(3, 5)]))
    np.testing.assert_array_equal(served.rows, [row(3, 5)])
    assert harness.observer.finished == [False, True]


async def test_failed_split_request_is_answered_once_and_its_rest_is_skipped(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    harness.model.fail_tags = {1}
    doomed = batcher.submit([text(1, 5), text(2, 5), text(3, 5), text(4, 5)])
    harness.model.gate.set()
    with pytest.raises(Internal):
        await settle(doomed)
    await settle(blocked)
    served = await settle(batcher.submit([text(5, 5)]))
    np.testing.assert_array_equal(served.rows, [row(5, 5)])
    assert set(harness.model.tags()) == {BLOCKER, 1, 2, 5}
    assert harness.observer.dropped_texts == []  # a failure, not a drop
    assert batcher.stats.queued_texts == 0


async def test_wrong_row_count_fails_the_batch(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.01)
    harness.model.wrong_row_count = True
    with pytest.raises(Internal):
        await settle(batcher.submit([text(1, 5), text(2, 5)]))
    harness.model.wrong_row_count = False
    served = await settle(batcher.submit([text(3, 5)]))
    np.testing.assert_array_equal(served.rows, [row(3, 5)])


async def test_cancelled_and_expired_requests_are_dropped_before_inference(harness: Harness) -> None:
    loop = asyncio.get_running_loop()
    batcher = await harness.start(max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    # A caller that goes away: cancelling its handler task cancels the future it awaits.
    caller = asyncio.create_task(asyncio.wait_for(batcher.submit([text(1, 5), text(2, 5)]), 30))
    await asyncio.sleep(0)
    expired = batcher.submit([text(3, 5)], deadline=loop.time() + 0.05)
    kept = batcher.submit([text(4, 5)])
    caller.cancel()
    await asyncio.sleep(0.08)  # past the deadline, while the model is still busy
    harness.model.gate.set()
    np.testing.assert_array_equal((await settle(kept)).rows, [row(4, 5)])
    with pytest.raises(DeadlineExceeded):
        await settle(expired)
    with pytest.raises(asyncio.CancelledError):
        await settle(caller)
    await settle(blocked)
    assert harness.model.tags() == [BLOCKER, 4]
    assert harness.observer.dropped_texts == [("cancelled", 2), ("deadline", 1)]
    assert batcher.stats.queued_texts == 0 and batcher.stats.queued_tokens == 0


async def test_full_queue_rejects_at_once(harness: Harness) -> None:
    batcher = await harness.start(max_queue_texts=4, max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)  # running, so no longer queued
    futures = [batcher.submit([text(1, 5), text(2, 5)]), batcher.submit([text(3, 5)])]
    with pytest.raises(Overloaded):
        batcher.submit([text(4, 5), text(5, 5)])  # 3 + 2 > 4
    futures.append(batcher.submit([text(6, 5)]))  # exactly 4
    with pytest.raises(Overloaded):
        batcher.submit([text(7, 5)])
    assert (batcher.stats.queued_texts, batcher.stats.queued_tokens, batcher.stats.running_batches) == (
        4,
        20,
        1,
    )
    assert harness.observer.queue == (4, 20)
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, *futures), 5)
    assert (batcher.stats.queued_texts, batcher.stats.queued_tokens) == (0, 0)
    assert sorted(harness.model.tags()) == [1, 2, 3, 6, BLOCKER]


async def test_idle_means_nothing_runs_and_nothing_waits(harness: Harness) -> None:
    batcher = await harness.start(max_delay_s=0.01)
    assert batcher.idle
    with batcher.reserve(1):  # being tokenised is not the model's work yet
        assert batcher.idle
    blocked = await harness.occupy_model(batcher)
    assert not batcher.idle  # a batch runs
    queued = batcher.submit([text(1, 5)])
    harness.model.gate.set()
    await settle(blocked)
    await settle(queued)
    assert batcher.idle


async def test_free_means_a_slot_is_free_and_nothing_waits(harness: Harness) -> None:
    """Free (a call submitted now starts at once) is wider than idle: a batch may run beside it."""
    batcher = await harness.start(max_batch_size=1, max_concurrent_batches=2)
    assert batcher.free and batcher.idle
    harness.model.gate.clear()
    first = batcher.submit([text(1, 5)])
    await harness.model.wait_entered(1)
    assert batcher.free and not batcher.idle  # one of two slots runs
    second = batcher.submit([text(2, 5)])
    await harness.model.wait_entered(1)
    assert not batcher.free  # both slots run
    third = batcher.submit([text(3, 5)])
    assert not batcher.free  # and a text waits
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second, third), 5)
    assert batcher.free and batcher.idle


async def test_reserved_room_counts_against_the_queue_until_used_or_released(harness: Harness) -> None:
    batcher = await harness.start(max_queue_texts=4, max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    first = batcher.reserve(3)  # a call being tokenised holds its room
    with pytest.raises(Overloaded, match="3 being tokenised"):
        batcher.submit([text(1, 5), text(2, 5)])  # 3 reserved + 2 > 4
    with pytest.raises(Overloaded):
        batcher.reserve(2)
    second = batcher.reserve(1)
    # The reservation turns into queued texts: a full queue, and still nothing else fits.
    queued = batcher.submit([text(3, 5), text(4, 5), text(5, 5)], room=first)
    assert (first.texts, batcher.stats.queued_texts) == (0, 3)
    with pytest.raises(Overloaded):
        batcher.reserve(1)
    second.release()
    second.release()  # idempotent: the room is given back once
    last = batcher.reserve(1)
    with last:  # leaving the block unused gives the room back
        pass
    also = batcher.submit([text(6, 5)])
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, queued, also), 5)
    assert sorted(harness.model.tags()) == [3, 4, 5, 6, BLOCKER]


async def test_a_call_behind_a_large_one_is_served_within_a_batch_or_two(harness: Harness) -> None:
    """Fairness: the window and the batch anchor go round the calls, not through the large one first."""
    batcher = await harness.start(max_batch_size=8, window_texts=16, max_delay_s=0.0)
    blocked = await harness.occupy_model(batcher)
    large = batcher.submit([text(1000 + i, 4 + i % 5) for i in range(200)])
    small = batcher.submit([text(7, 6)])
    harness.model.gate.set()
    await settle(blocked)
    await settle(small)
    batches_with_small = [i for i, b in enumerate(harness.model.batches) if (7, 6) in b]
    # Batch 0 is the blocker; the small call rides in the first or second batch after it.
    assert batches_with_small and batches_with_small[0] <= 2
    result = await settle(large)
    assert [int(r[0]) for r in result.rows] == [1000 + i for i in range(200)]  # whole and in order


async def measure_rate(batcher: Batcher) -> float:
    """Runs a few batches of 20 tokens, so that the batcher knows its token rate; returns it."""
    for tag in range(4):
        await settle(batcher.submit([text(tag, 10), text(tag, 10)]))
    return batcher.stats.tokens_per_second


async def test_admission_refuses_what_cannot_finish_in_time(harness: Harness) -> None:
    """Queued work in seconds (queued tokens / measured rate) is held against the deadline and a bound."""
    harness.model.delay_s = 0.01
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.0, max_queue_seconds=30.0)
    tight = await harness.start(max_batch_size=2, max_delay_s=0.0, max_queue_seconds=1.0)
    rate = await measure_rate(batcher)
    assert 0 < rate < 20 / 0.01 * 1.5
    tight_rate = await measure_rate(tight)
    blocked = await harness.occupy_model(batcher)
    # Many calls, so that fair batching does not shorten a newcomer's turn: a batch of 10 ms each (the
    # model's delay), and at least 3 s of work by the token rate.
    queued = [batcher.submit([text(100 + i, 100)]) for i in range(max(200, int(rate * 3 / 100) + 1))]
    now = asyncio.get_running_loop().time()
    with pytest.raises(Overloaded, match="deadline leaves"):
        batcher.reserve(1, deadline=now + 1.0)
    with pytest.raises(Overloaded, match="deadline leaves"):
        batcher.submit([text(8, 5)], deadline=now + 1.0)
    batcher.reserve(1, deadline=now + 1000.0).release()  # a generous deadline is admitted
    batcher.reserve(1).release()  # so is a call without one, within max_queue_seconds
    assert tight_rate > 0
    with pytest.raises(Overloaded, match="more than this server queues"):
        for i in range(10_000):  # the queue fills to its bound in seconds of work, then refuses
            tight.submit([text(1000 + i, 100)])
    assert tight.stats.backlog_seconds >= 1.0
    with pytest.raises(Overloaded, match="more than this server queues"):
        tight.reserve(1)
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, *queued), 30)


async def test_a_small_call_beside_one_huge_one_is_admitted_for_its_fair_turn(harness: Harness) -> None:
    """The FIFO estimate would refuse it; under fair batching it rides in one of the next batches."""
    harness.model.delay_s = 0.01
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.0, max_queue_seconds=30.0)
    rate = await measure_rate(batcher)
    blocked = await harness.occupy_model(batcher)
    huge = batcher.submit([text(100 + i, 100) for i in range(int(rate * 3 / 100) + 1)])  # >= 3 s of work
    now = asyncio.get_running_loop().time()
    small = batcher.submit([text(7, 5)], deadline=now + 2.0)
    harness.model.gate.set()
    await settle(small)
    await asyncio.wait_for(asyncio.gather(blocked, huge), 30)


async def test_an_expired_call_is_answered_at_its_deadline_while_the_model_is_busy(harness: Harness) -> None:
    batcher = await harness.start(max_delay_s=0.0, max_concurrent_batches=1)
    blocked = await harness.occupy_model(batcher)
    loop = asyncio.get_running_loop()
    expiring = batcher.submit([text(1, 5), text(2, 5), text(3, 5)], deadline=loop.time() + 0.05)
    with pytest.raises(DeadlineExceeded):
        await settle(expiring)  # the model is still held: the batcher answered it on its own clock
    assert batcher.stats.queued_texts == 0
    assert harness.observer.dropped_texts == [("deadline", 3)]
    harness.model.gate.set()
    await settle(blocked)
    assert harness.model.tags() == [BLOCKER]


async def test_a_cancelled_call_frees_its_queue_room_at_once(harness: Harness) -> None:
    batcher = await harness.start(max_queue_texts=4, max_delay_s=0.0)
    blocked = await harness.occupy_model(batcher)
    gone = batcher.submit([text(1, 5), text(2, 5), text(3, 5), text(4, 5)])
    with pytest.raises(Overloaded):
        batcher.reserve(1)
    gone.cancel()
    await asyncio.sleep(0)  # the future's done callbacks run on the next turn of the loop
    assert batcher.stats.queued_texts == 0
    assert harness.observer.dropped_texts == [("cancelled", 4)]
    after = batcher.submit([text(5, 5)])
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, after), 5)
    assert harness.model.tags() == [BLOCKER, 5]


async def test_loop_death_fails_pending_calls_and_reports_fatal(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = await harness.start(max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    pending = batcher.submit([text(1, 5)])

    def broken(*args: object) -> tuple[int, int, bool]:
        raise RuntimeError("a bug in the batch loop")

    monkeypatch.setattr(batcher_module, "cut_batch", broken)
    harness.model.gate.set()  # the loop wakes to cut the next batch, and dies
    with pytest.raises(Unavailable):
        await settle(pending)
    np.testing.assert_array_equal((await settle(blocked)).rows, [row(BLOCKER, 3)])  # it was already running
    assert [str(e) for e in harness.fatal] == ["a bug in the batch loop"]
    assert not batcher.alive
    with pytest.raises(Unavailable):
        batcher.submit([text(2, 5)])


async def test_stop_with_drain_finishes_queued_work(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=4, max_delay_s=30.0)  # draining does not wait for max_delay
    blocked = await harness.occupy_model(batcher, texts=4)
    futures = [batcher.submit([text(i, 5)]) for i in range(6)]
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable):
        batcher.submit([text(99, 5)])
    harness.model.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert all(f.done() and not f.exception() for f in [blocked, *futures])
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result().rows, [row(i, 5)])
    assert harness.fatal == []


async def test_stop_without_drain_fails_pending(harness: Harness) -> None:
    batcher = await harness.start(max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    queued = batcher.submit([text(1, 5)])
    await batcher.stop(drain=False)
    for future in (blocked, queued):
        with pytest.raises(Unavailable):
            await settle(future)
    assert harness.fatal == []


async def test_stop_drain_timeout_fails_the_rest(harness: Harness) -> None:
    batcher = await harness.start(max_delay_s=0.01)
    blocked = await harness.occupy_model(batcher)
    queued = batcher.submit([text(1, 5)])
    await batcher.stop(drain=True, timeout=0.05)  # the model never comes back in time
    for future in (blocked, queued):
        with pytest.raises(Unavailable):
            await settle(future)


async def test_concurrent_batches_are_bounded(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=1, max_concurrent_batches=2)
    harness.model.gate.clear()
    futures = [batcher.submit([text(i, 5)]) for i in range(3)]
    await harness.model.wait_entered(2)
    assert (batcher.stats.running_batches, batcher.stats.queued_texts) == (2, 1)
    harness.model.gate.set()
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert harness.model.max_active == 2


async def test_max_batch_size_one_turns_batching_off(harness: Harness) -> None:
    batcher = await harness.start(max_batch_size=1, max_delay_s=30.0)
    futures = [batcher.submit([text(i, 3 + i)]) for i in range(4)] + [
        batcher.submit([text(9, 2), text(8, 1)])
    ]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert harness.model.batches == [[(0, 3)], [(1, 4)], [(2, 5)], [(3, 6)], [(9, 2)], [(8, 1)]]


@pytest.mark.parametrize("max_concurrent_batches", [1, 2])
async def test_many_concurrent_requests_nothing_lost_nothing_mixed(
    harness: Harness, max_concurrent_batches: int
) -> None:
    rng = random.Random(11)
    batcher = await harness.start(
        max_batch_size=16,
        max_batch_tokens=256,
        max_delay_s=0.002,
        max_concurrent_batches=max_concurrent_batches,
    )
    tags = iter(range(1_000_000))
    requests = [[(next(tags), rng.randint(1, 40)) for _ in range(rng.randint(1, 12))] for _ in range(300)]

    async def call(texts: list[tuple[int, int]], pause: float) -> BatchResult:
        await asyncio.sleep(pause)
        return await batcher.submit([text(tag, length) for tag, length in texts])

    results = await asyncio.wait_for(
        asyncio.gather(*(call(texts, rng.random() * 0.05) for texts in requests)), 10
    )
    for texts, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.rows, [row(tag, length) for tag, length in texts])
    all_tags = [tag for texts in requests for tag, _ in texts]
    assert Counter(harness.model.tags()) == Counter(all_tags)  # every text ran exactly once
    for b in harness.model.batches:
        assert len(b) <= 16 and (len(b) == 1 or max(n for _, n in b) * len(b) <= 256)
    assert harness.model.max_active <= max_concurrent_batches
    assert sum(size for size, _, _ in harness.observer.started) == len(all_tags)
    assert len(harness.observer.waits) == len(requests)
    stats = batcher.stats
    assert stats.tokens_per_second > 0 and stats.queued_texts == 0 and stats.backlog_seconds == 0


async def test_a_failing_observer_does_not_stop_serving(harness: Harness) -> None:
    class Broken(BatchObserver):
        def batch_started(self, size: int, real_tokens: int, padded_tokens: int) -> None:
            raise ValueError("metrics bug")

        def queue_changed(self, texts: int, tokens: int) -> None:
            raise ValueError("metrics bug")

    batcher = await harness.start(observer=Broken(), max_delay_s=0.01)
    result = await settle(batcher.submit([text(1, 5)]))
    np.testing.assert_array_equal(result.rows, [row(1, 5)])
    assert batcher.alive


async def test_submit_validation(harness: Harness) -> None:
    idle = Batcher(harness.model, BatcherConfig(), harness.executor)
    with pytest.raises(Unavailable):
        idle.submit([text(1, 5)])
    batcher = await harness.start()
    with pytest.raises(ValueError):
        batcher.submit([])
    with pytest.raises(DeadlineExceeded):
        batcher.submit([text(1, 5)], deadline=asyncio.get_running_loop().time() - 1)
    assert harness.observer.dropped_texts == [("deadline", 1)]
    assert harness.model.batches == []


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 64, "window_texts": 32},
        {"max_delay_s": -1.0},
        {"max_padding_ratio": 0.9},
        {"max_concurrent_batches": 0},
    ],
)
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatcherConfig(**bad)


@pytest.mark.parametrize("min_wait_share", [0.0, 0.6])
async def test_a_young_text_does_not_jump_older_texts_of_other_lengths(
    harness: Harness, min_wait_share: float
) -> None:
    # Length sorting alone batches the oldest text with the young one of its length (no padding) and
    # leaves the long old text behind it; with the wait floor a batch takes only the anchor's contemporaries.
    batcher = await harness.start(
        max_batch_size=2, max_delay_s=0.0, max_padding_ratio=1.15, min_wait_share=min_wait_share
    )
    blocked = await harness.occupy_model(batcher)
    old = [batcher.submit([text(1, 10)]), batcher.submit([text(2, 40)])]
    await asyncio.sleep(0.3)
    young = batcher.submit([text(3, 10)])
    await asyncio.sleep(0.05)
    harness.model.gate.set()
    for future in [blocked, *old, young]:
        await settle(future)
    if min_wait_share:
        assert harness.model.batches[1:] == [[(1, 10)], [(2, 40)], [(3, 10)]]
    else:
        assert harness.model.batches[1:] == [[(1, 10), (3, 10)], [(2, 40)]]


async def test_a_tight_deadline_into_an_empty_queue_is_admitted_when_its_own_work_fits(
    harness: Harness,
) -> None:
    """The safety margin is on the estimated wait, not on the call's own work: with nothing queued, a
    deadline a little over one batch is admitted and served."""
    harness.model.delay_s = 0.02
    batcher = await harness.start(max_batch_size=2, max_delay_s=0.0)
    await measure_rate(batcher)
    batch_s = batcher._batch_s
    assert batch_s > 0
    now = asyncio.get_running_loop().time()
    # Over the batch, but under twice it: a share of the whole deadline would refuse it at once.
    admitted = batcher.submit([text(3, 5)], deadline=now + 1.5 * batch_s)
    with contextlib.suppress(DeadlineExceeded):  # served or, on a slow machine, just late: both fine here
        await settle(admitted)
