"""Tokenising gathered across calls (engine.Tokenizing): one tokenizer call for the chunks of many calls,
each call its own rows, a broken text failing only its call, and a gone caller's chunk skipped; a short
call on the loop only while the model is idle, and later calls sharing a hop while no execution slot is
free (a call waits for a running batch then anyway), not while one is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from recserve.server import engine
from recserve.server.engine import CHUNK_TEXTS, Tokenizing
from recserve.tensors import Encoded


class Counting:
    """An encode function that records each call's texts; a text "boom" breaks it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, texts: Sequence[str]) -> list[Encoded]:
        self.gate.wait(10)
        self.calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("the tokenizer broke")
        return [Encoded(np.array([len(t)]), np.zeros(1, dtype=np.int64)) for t in texts]


async def _run(tokenizing: Tokenizing, encode: Counting, texts: Sequence[str]) -> list[int]:
    return [int(e.ids[0]) for e in await tokenizing.encode(encode, texts)]


def test_calls_of_one_loop_turn_share_one_tokenizer_call_and_get_their_own_rows() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            tokenizing, encode = Tokenizing(pool, 2), Counting()
            texts = [["a" * (i + 1)] for i in range(20)]
            rows = await asyncio.gather(*(_run(tokenizing, encode, t) for t in texts))
            assert rows == [[i + 1] for i in range(20)]
            assert len(encode.calls) == 1
            assert encode.calls[0] == [t[0] for t in texts]

    asyncio.run(main())


def test_a_gathered_call_stays_within_one_chunk() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing, encode = Tokenizing(pool, 1), Counting()
            calls = [[f"t{i}-{j}" for j in range(CHUNK_TEXTS // 2 + 1)] for i in range(3)]
            rows = await asyncio.gather(*(_run(tokenizing, encode, c) for c in calls))
            assert rows == [[len(t) for t in c] for c in calls]
            assert [len(c) for c in encode.calls] == [CHUNK_TEXTS // 2 + 1] * 3

    asyncio.run(main())


def test_a_text_that_breaks_the_tokenizer_fails_its_own_call_only() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing, encode = Tokenizing(pool, 1), Counting()
            results = await asyncio.gather(
                _run(tokenizing, encode, ["ok"]),
                _run(tokenizing, encode, ["boom"]),
                _run(tokenizing, encode, ["fine"]),
                return_exceptions=True,
            )
            assert results[0] == [2] and results[2] == [4]
            assert isinstance(results[1], ValueError)

    asyncio.run(main())


def test_a_caller_that_left_before_its_turn_is_not_tokenised() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing, encode = Tokenizing(pool, 1), Counting()
            encode.gate.clear()  # the first call holds the only thread
            first = asyncio.ensure_future(_run(tokenizing, encode, ["first"]))
            await asyncio.sleep(0.05)
            gone = asyncio.ensure_future(_run(tokenizing, encode, ["gone"]))
            kept = asyncio.ensure_future(_run(tokenizing, encode, ["kept"]))
            await asyncio.sleep(0.05)
            gone.cancel()
            encode.gate.set()
            assert await first == [5] and await kept == [4]
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert encode.calls == [["first"], ["kept"]]

    asyncio.run(main())


class OnThread(Counting):
    """Also records the thread each call ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, texts: Sequence[str]) -> list[Encoded]:
        self.threads.append(threading.get_ident())
        return super().__call__(texts)


def test_a_short_call_is_tokenised_on_the_loop_only_while_the_model_is_idle() -> None:
    async def main() -> None:
        model_idle = True
        with ThreadPoolExecutor(1) as pool:
            tokenizing = Tokenizing(pool, 1, inline_chars=8, model_idle=lambda: model_idle)
            encode = OnThread()
            assert await _run(tokenizing, encode, ["short"]) == [5]  # idle, short: on the loop
            assert await _run(tokenizing, encode, ["longer than 8"]) == [13]  # too long: a thread
            model_idle = False
            assert await _run(tokenizing, encode, ["short"]) == [5]  # the model is busy: a thread
            loop_thread = threading.get_ident()
            assert [t == loop_thread for t in encode.threads] == [True, False, False]

    asyncio.run(main())


def test_an_inline_tokenizer_error_fails_its_call() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing = Tokenizing(pool, 1, inline_chars=8)
            with pytest.raises(ValueError, match="broke"):
                await _run(tokenizing, Counting(), ["boom"])

    asyncio.run(main())


def test_while_no_slot_is_free_calls_of_later_loop_turns_share_a_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "GATHER_S", 0.2)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing, encode = (
                Tokenizing(pool, 1, model_idle=lambda: False, model_free=lambda: False),
                Counting(),
            )
            first = asyncio.ensure_future(_run(tokenizing, encode, ["first"]))
            for _ in range(3):
                await asyncio.sleep(0)  # later turns of the loop, well inside the gathering time
            second = asyncio.ensure_future(_run(tokenizing, encode, ["second"]))
            assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [[5], [6]]
            assert encode.calls == [["first", "second"]]

    asyncio.run(main())


def test_while_a_slot_is_free_a_call_is_not_held_for_later_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch runs, but another could start beside it: the call would start at once, so it hops at the end
    of its loop turn (with the calls of that turn), not after the gathering time."""
    monkeypatch.setattr(engine, "GATHER_S", 60.0)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing = Tokenizing(pool, 1, model_idle=lambda: False, model_free=lambda: True)
            encode = Counting()
            rows = await asyncio.wait_for(
                asyncio.gather(_run(tokenizing, encode, ["one"]), _run(tokenizing, encode, ["three"])), 5
            )  # not 60 s
            assert rows == [[3], [5]] and encode.calls == [["one", "three"]]

    asyncio.run(main())


def test_a_full_chunk_goes_at_once_while_no_slot_is_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "GATHER_S", 60.0)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            tokenizing, encode = (
                Tokenizing(pool, 1, model_idle=lambda: False, model_free=lambda: False),
                Counting(),
            )
            texts = [f"t{i}" for i in range(CHUNK_TEXTS)]
            rows = await asyncio.wait_for(_run(tokenizing, encode, texts), 5)  # not 60 s
            assert rows == [len(t) for t in texts]

    asyncio.run(main())
