"""The server's resident memory at idle and after bursts of mixed-length calls (issue 15), and its report.

Idle is the RSS once the server is up: loaded, warmed up, SERVING, settled. A burst round then sends a few
big Embed calls at once whose texts run from a few tokens to past the model's limit (log-uniform lengths,
a fresh seed each round), so the batcher forms batches of many distinct (batch, sequence) shapes, two at a
time on a CPU; every new shape is a chance for ONNX Runtime's arenas to grow. A window of the standard load
(64 callers, one text a call) follows. The RSS (VmRSS from /proc, process.py) is read after each round once
the server has settled, and the rounds go on until one grows it by less than `plateau` of the last reading,
or `max_rounds`. The post-burst figure is the last reading, what the server keeps once the bursts are
over; the peak (sampled during the rounds) is what a memory limit has to hold.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from recserve.benchmarks import report
from recserve.benchmarks.loadgen import LoadSettings, run_step
from recserve.benchmarks.process import RssWatch, rss_mib
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import MemoryResult, MemoryRound, SummaryItem, to_json
from recserve.benchmarks.sweep import ProgressLine
from recserve.benchmarks.targets import TargetError
from recserve.benchmarks.workloads import SPECIAL_TOKENS, WORDS, Workload
from recserve.client import AsyncClient, RecserveError, ResourceExhausted, ServerInfo

# Issue 15's target: after the bursts the server holds at most this many times its idle memory.
POST_BURST_TARGET = 1.5
# The shortest text of a burst, in tokens ([CLS] and [SEP] included).
SHORTEST = 3
# Texts this much past the model's limit are truncated to it: the longest shape is always among them.
PAST_LIMIT = 16
# A big call refused with RESOURCE_EXHAUSTED is sent again after this pause (as overload.py's stream does).
REFUSED_BACKOFF_S = 0.25


@dataclass(frozen=True)
class MemorySettings:
    """How the memory section measures; every field is in its report."""

    min_rounds: int = 3
    max_rounds: int = 4
    calls: int = 8
    """Big Embed calls sent at once in a round."""
    texts_per_call: int = 128
    load_callers: int = 64
    load_s: float = 3.0
    """The standard load's window after each round's big calls."""
    settle_s: float = 1.0
    """Wait before each RSS reading, for freed memory to be returned and threads to stop."""
    plateau: float = 0.02
    """A round that grows the RSS by less than this share of the last reading ends the bursts."""
    deadline_s: float = 60.0
    seed: int = 0


def spread_texts(n: int, max_tokens: int, seed: int) -> list[str]:
    """`n` texts of log-uniform token lengths from SHORTEST to past `max_tokens` (truncated there).

    Each word of workloads.WORDS is one WordPiece token of BERT's uncased vocabulary, so the lengths hold in
    tokens for the default model; another tokenizer may split words, which only shifts the spread.
    """
    rng = np.random.default_rng(seed)
    high = max(SHORTEST, max_tokens) + PAST_LIMIT
    lengths = np.exp(rng.uniform(np.log(SHORTEST), np.log(high), size=n)).astype(np.int64)
    words = np.array(WORDS)
    return [" ".join(rng.choice(words, size=max(1, int(k) - SPECIAL_TOKENS))) for k in lengths]


async def _burst(client: AsyncClient, info: ServerInfo, s: MemorySettings, seed: int) -> int:
    """One round's big calls, all at once; returns the texts sent. A call that fails, or is still refused
    at its deadline, fails the measurement: memory after a burst the server did not run would say nothing.
    """
    texts = spread_texts(s.calls * s.texts_per_call, info.max_tokens, seed)
    calls = [texts[i : i + s.texts_per_call] for i in range(0, len(texts), s.texts_per_call)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.deadline_s

    async def send(call: list[str]) -> None:
        while True:
            try:
                await client.embed(call, encoding="f16", deadline=max(0.1, deadline - loop.time()))
                return
            except ResourceExhausted:
                # Refused at the door (more queued work than the server takes: a slow or busy machine).
                # That cost the server nothing, and the burst needs only every call's shapes to run.
                if loop.time() + REFUSED_BACKOFF_S >= deadline:
                    raise
                await asyncio.sleep(REFUSED_BACKOFF_S)

    try:
        await asyncio.gather(*(send(c) for c in calls))
    except RecserveError as exc:
        raise TargetError(f"memory burst: a big Embed call failed: {exc}") from None
    return len(texts)


async def measure_memory(
    client: AsyncClient,
    pid: int | None,
    info: ServerInfo,
    workload: Workload,
    s: MemorySettings,
    progress: ProgressLine | None = None,
) -> MemoryResult:
    """Idle RSS of the server `pid` behind `client` (started and warmed up, no load yet), then burst rounds
    until the RSS plateaus. `workload` is the standard load's (one text a call); its calls must succeed."""
    await asyncio.sleep(s.settle_s)
    idle = rss_mib(pid)
    target = as_target(client)
    load = LoadSettings(warmup_s=0.0, window_s=s.load_s, max_windows=1, deadline_s=s.deadline_s)
    plan = load.plan("closed", concurrency=s.load_callers, seed=workload.spec.seed)
    loop = asyncio.get_running_loop()
    rounds: list[MemoryRound] = []
    last, plateaued = idle, False
    for index in range(s.max_rounds):
        started = loop.time()
        async with RssWatch(pid) as watch:
            texts = await _burst(client, info, s, s.seed + index)
            step = await run_step(plan, target, workload)
        if step.measured.failed:
            raise TargetError(f"memory burst: {step.measured.failed} calls of the standard load failed")
        await asyncio.sleep(s.settle_s)
        now = rss_mib(pid)
        rounds.append(
            MemoryRound(
                texts=texts,
                seconds=round(loop.time() - started, 3),
                load_texts_per_s=step.measured.texts_per_s,
                rss_mib=now,
                rss_peak_mib=watch.peak,
            )
        )
        if progress is not None:
            progress.finish(
                f"memory: round {index + 1}: {texts} mixed-length texts, then {s.load_callers} callers at "
                f"{step.measured.texts_per_s:.1f} texts/s; RSS {now} MiB (peak {watch.peak})"
            )
        if now is None or last is None:
            break  # no /proc for this pid: nothing to plateau on
        grew = (now - last) / last if last else 0.0
        last = now
        if index + 1 >= s.min_rounds and grew < s.plateau:
            plateaued = True
            break
    peaks = [r.rss_peak_mib for r in rounds if r.rss_peak_mib is not None]
    post = rounds[-1].rss_mib if rounds else None
    settings = to_json(s)
    assert isinstance(settings, dict)
    return MemoryResult(
        pid=pid,
        idle_rss_mib=idle,
        post_burst_rss_mib=post,
        peak_rss_mib=max(peaks, default=None),
        ratio=round(post / idle, 3) if post is not None and idle else None,
        plateaued=plateaued,
        rounds=tuple(rounds),
        settings=settings,
    )


def memory_summary(result: MemoryResult) -> dict[str, SummaryItem]:
    """Issue 15's row: post-burst RSS over idle, against its target."""
    ratio = result.ratio
    ending = "plateaued" if result.plateaued else "had not plateaued"
    return {
        "memory_ratio": SummaryItem(
            title="Post-burst RSS over idle",
            value=ratio,
            digits=2,
            unit="x",
            target=f"<= {POST_BURST_TARGET}x",
            met=None if ratio is None else ratio <= POST_BURST_TARGET,
            how=(
                f"the server's RSS after {len(result.rounds)} rounds of mixed-length bursts "
                f"({result.post_burst_rss_mib} MiB; {ending}) over its RSS idle after start and warm-up "
                f"({result.idle_rss_mib} MiB); below"
            ),
        )
    }


def memory_section(result: MemoryResult) -> list[str]:
    """The memory section of BENCHMARKS.md: the method in a paragraph, then one row per round."""
    s = result.settings
    rows = [["idle", "-", "-", "-", _mib(result.idle_rss_mib), "-"]]
    for index, r in enumerate(result.rounds, 1):
        rows.append(
            [
                str(index),
                str(r.texts),
                f"{r.load_texts_per_s:.1f}",
                f"{r.seconds:.1f}",
                _mib(r.rss_mib),
                _mib(r.rss_peak_mib),
            ]
        )
    return [
        "A fresh default server: its RSS (VmRSS) once started, warmed up and settled, then after each burst "
        f"round. A round sends {s['calls']} Embed calls of {s['texts_per_call']} texts at once, lengths "
        f"log-uniform from {SHORTEST} tokens to past the model's limit (a new seed each round, so batches "
        f"of many distinct shapes run), then {s['load_s']:g} s of the standard load "
        f"({s['load_callers']} callers, one text a call), and reads the RSS {s['settle_s']:g} s later. "
        f"Rounds go on until one grows the RSS by less than {s['plateau']:.0%} ({s['min_rounds']} to "
        f"{s['max_rounds']} rounds). **Idle {_mib(result.idle_rss_mib)} MiB, after the bursts "
        f"{_mib(result.post_burst_rss_mib)} MiB: {_mib(result.ratio, 2)}x** "
        f"(peak {_mib(result.peak_rss_mib)} MiB"
        + ("" if result.plateaued else "; the RSS had not plateaued by the last round")
        + ").",
        "",
        *report.md_table(
            ["round", "burst texts", "then texts/s", "seconds", "RSS MiB", "peak RSS MiB"], rows
        ),
    ]


def _mib(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
