"""`recserve bench overload` (and the suite's overload section): what a target does past its capacity,
measured black-box, so it works against any recserve target.

1. Capacity: a closed loop of 64 callers, one text a call, over one short window: the OK calls/s it
   delivered (or `--capacity`).
2. Levels: an open loop (Poisson) of one-text calls at 1x, 1.5x, 2x and 3x that rate, each call with a 2 s
   deadline. Per level: the calls by status, goodput (OK answers within the deadline, counted from the
   scheduled send) and its ratio to the capacity, the latency of OK, refused (RESOURCE_EXHAUSTED) and
   admitted calls, and the server's RSS (local server or `--pid` only).
3. Fairness: one caller sending one-text calls back to back, alone (the reference), then beside a few
   callers sending 2,000-text Embed calls on a channel of their own.

The issue's targets are met/missed rows of the summary (`overload_summary`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import grpc
import grpc.aio
import numpy as np

from recserve.benchmarks import report, scrape, summary
from recserve.benchmarks.config import (
    OverloadConfig,
    OverloadSettings,
    TargetChoice,
    settings,
    workload_of,
)
from recserve.benchmarks.cpu import CpuWatch
from recserve.benchmarks.loadgen import LoadSettings, run_step
from recserve.benchmarks.process import SAMPLE_EVERY_S, RssWatch, rss_mib
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.recorder import OK
from recserve.benchmarks.results import (
    Capacity,
    FairnessProbe,
    OverloadLevel,
    OverloadResult,
    StepResult,
    SummaryItem,
)
from recserve.benchmarks.sweep import ProgressLine, sweep
from recserve.benchmarks.targets import (
    TargetError,
    check_target,
    check_workload_fits,
    connected,
    resolve_metrics,
)
from recserve.benchmarks.workloads import Workload
from recserve.client import AsyncClient, ServerInfo
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

GOODPUT_TARGET = 0.9
REFUSAL_P99_TARGET_MS = 10.0
# "RSS bounded": the peak over the levels at most this many times the RSS after the capacity step, whose
# 64 callers have already grown the server's arenas to its busiest batches.
RSS_GROWTH_TARGET = 1.25
REFUSED = "RESOURCE_EXHAUSTED"
EXCEEDED = "DEADLINE_EXCEEDED"
# The capacity step's calls may queue behind 63 others: a deadline that only a broken server misses.
CAPACITY_DEADLINE_S = 30.0
# The reference (one-text calls with no stream) needs only a short warm-up: nothing else is running.
REFERENCE_WARMUP_S = 1.0
# Distinct big calls: each is ~0.4 MB of text, so a few, cycled.
PROBE_RING = 4
# A big call that failed (refused, say) is resent after this pause, not at once in a hot loop.
FAILED_BACKOFF_S = 0.1


@dataclass(frozen=True)
class Subject:
    """The server under test: connected and checked, with where its metrics are and its pid (or None)."""

    address: str
    client: AsyncClient
    info: ServerInfo
    metrics_url: str | None
    pid: int | None

    def connect(self) -> AbstractAsyncContextManager[AsyncClient]:
        """Another channel to it, for callers that must not share the first one's connection."""
        return connected(self.address)


@contextlib.asynccontextmanager
async def open_subject(choice: TargetChoice, log_path: Path, notes: list[str]) -> AsyncIterator[Subject]:
    """A local server started from `choice.model_repo` (its pid known), or `choice.target`, checked."""
    if choice.model_repo is not None:
        from recserve.benchmarks.servers import local_server

        async with (
            local_server(choice.model_repo, threads=choice.threads, log_path=log_path) as srv,
            connected(srv.address) as client,
        ):
            info = await check_target(client, srv.address)
            yield Subject(srv.address, client, info, srv.metrics_url, srv.pid)
    else:
        assert choice.target is not None
        async with connected(choice.target) as client:
            info = await check_target(client, choice.target)
            metrics_url = await resolve_metrics(choice.metrics_url, choice.target, notes)
            if choice.pid is None:
                notes.append(
                    "no --pid: the server's RSS, open descriptors and threads are unknown (external target)"
                )
            yield Subject(choice.target, client, info, metrics_url, choice.pid)


def _rate(value: float) -> float:
    return float(f"{value:.6g}")


async def measure_capacity(
    subject: Subject,
    workload: Workload,
    *,
    given: float | None,
    callers: int,
    warmup_s: float,
    window_s: float,
    max_in_flight: int,
    progress: ProgressLine | None,
    what: str = "one text a call",
) -> Capacity:
    """The OK calls/s of a closed loop of `callers` over one window; `given` skips the measurement."""
    if given is not None:
        return Capacity(calls_per_s=given, how=f"given (--capacity {given:g}), not measured")
    load = LoadSettings(
        warmup_s=warmup_s,
        window_s=window_s,
        max_windows=1,
        deadline_s=CAPACITY_DEADLINE_S,
        max_in_flight=max_in_flight,
    )
    plan = load.plan("closed", concurrency=callers, seed=workload.spec.seed)
    (step,) = await sweep(
        as_target(subject.client),
        [plan],
        workload,
        metrics_url=subject.metrics_url,
        progress=progress,
        series="capacity",
    )
    rate = step.measured.calls_per_s
    if rate <= 0:
        raise TargetError(
            f"{subject.address}: no call succeeded while measuring capacity ({step.measured.errors}): "
            "no overload load sent"
        )
    how = (
        f"closed loop of {callers} callers, {what}, OK calls/s over one {window_s:g} s window after "
        f"{warmup_s:g} s of warm-up"
    )
    return Capacity(calls_per_s=rate, how=how, step=step)


async def overload_levels(
    subject: Subject,
    workload: Workload,
    s: OverloadSettings,
    capacity: float,
    progress: ProgressLine | None,
) -> list[OverloadLevel]:
    """One open-loop step per level, at level x capacity, with the calls by status and the RSS."""
    load = LoadSettings(
        warmup_s=s.warmup_s,
        window_s=s.window_s,
        max_windows=1,
        deadline_s=s.deadline_s,
        max_in_flight=s.max_in_flight,
    )
    levels = []
    for level in s.levels:
        rate = _rate(level * capacity)
        plan = replace(
            load.plan("open", rate=rate, arrival="poisson", seed=workload.spec.seed), outcomes=True
        )
        cpu = None if subject.pid is None else CpuWatch(subject.pid)
        async with RssWatch(subject.pid) as watch:
            (step,) = await sweep(
                as_target(subject.client),
                [plan],
                workload,
                metrics_url=subject.metrics_url,
                progress=progress,
                series=f"overload {level:g}x",
                on_boundary=None if cpu is None else cpu.at_boundary,
            )
        if cpu is not None:
            cpu.add(step)
        outcomes = step.outcomes
        assert outcomes is not None  # the plan asked for them
        ratio = round(outcomes.goodput_per_s / capacity, 3)
        levels.append(
            OverloadLevel(
                level=level,
                offered_per_s=rate,
                goodput_ratio=ratio,
                outcomes=outcomes,
                rss_end_mib=watch.end,
                rss_peak_mib=watch.peak,
                step=step,
                cpu=None if cpu is None else cpu.result(),
            )
        )
        if progress is not None:
            progress.finish(
                f"overload {level:g}x: goodput {outcomes.goodput_per_s:g}/s ({ratio:g} of capacity), "
                f"{outcomes.calls(REFUSED)} refused, {outcomes.calls(EXCEEDED)} past the deadline "
                f"of {outcomes.sent}"
            )
    return levels


class _Stream:
    """Callers sending big Embed calls back to back until stopped; each answer's time, status and texts."""

    def __init__(
        self,
        stub: pb_grpc.InferenceStub,
        messages: Sequence[pb.EmbedRequest],
        callers: int,
        deadline_s: float,
    ) -> None:
        self.stub = stub
        self.messages = messages
        self.callers = callers
        self.deadline_s = deadline_s
        self.ends: list[float] = []
        self.codes: list[int] = []
        self.texts: list[int] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._caller(i)) for i in range(self.callers)]

    async def _caller(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        k = index
        while True:  # until cancelled by stop()
            message = self.messages[k % len(self.messages)]
            k += 1
            code = OK
            try:
                await self.stub.Embed(message, timeout=self.deadline_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().value[0]
            self.ends.append(loop.time())
            self.codes.append(code)
            self.texts.append(len(message.texts))
            if code != OK:
                await asyncio.sleep(FAILED_BACKOFF_S)

    async def stop(self) -> None:
        """Cancels the calls in flight: they are load, not measured."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def answered_between(self, start: float, end: float) -> tuple[int, int, dict[str, int]]:
        return summary.answered_between(
            np.array(self.ends), np.array(self.codes, dtype=np.int64), np.array(self.texts), start, end
        )


async def _batched_texts(subject: Subject) -> float | None:
    """The texts the server has run in batches, from its metrics; None without them."""
    if subject.metrics_url is None:
        return None
    return scrape.batched_texts(await scrape.fetch_async(subject.metrics_url))


async def fairness_probe(
    subject: Subject, workload: Workload, s: OverloadSettings, progress: ProgressLine | None
) -> FairnessProbe:
    """One caller's one-text calls back to back: alone, then beside `probe_callers` callers sending
    `probe_texts`-text Embed calls on another channel (as other clients would)."""
    limit = subject.info.limits.max_texts_per_call
    texts = min(s.probe_texts, limit) if limit else s.probe_texts
    big = workload_of(replace(workload.spec, rpc={"embed": 1.0}, texts_per_call=texts, ring_calls=PROBE_RING))
    messages = [m for m in big.messages if isinstance(m, pb.EmbedRequest)]
    lone = LoadSettings(
        warmup_s=s.warmup_s, window_s=s.probe_window_s, max_windows=1, deadline_s=s.probe_deadline_s
    ).plan("closed", concurrency=1, seed=workload.spec.seed)
    target = as_target(subject.client)
    reference = await run_step(
        replace(lone, warmup_s=min(REFERENCE_WARMUP_S, s.warmup_s)), target, workload, progress=progress
    )
    loop = asyncio.get_running_loop()
    async with subject.connect() as stream_client:
        stream = _Stream(stream_client.stub, messages, s.probe_callers, s.probe_deadline_s)
        stream.start()
        try:
            # NOTE: the stream warms up alone, and the one-text caller starts with the window. Warmed up
            # beside it, its call could still be waiting when the window closed (a one-text call waits
            # some 20 s behind big ones on an unfair server) and the window would hold no call at all.
            await asyncio.sleep(s.warmup_s)
            before = await _batched_texts(subject)
            start = loop.time()
            beside = await run_step(replace(lone, warmup_s=0.0), target, workload, progress=progress)
            ended = loop.time()
            after = await _batched_texts(subject)
        finally:
            await stream.stop()
    calls, stream_texts, failed = stream.answered_between(start, ended)
    seconds = max(ended - start, 1e-9)
    model_texts_per_s = None
    if before is not None and after is not None:
        served = after - before - beside.measured.completed
        model_texts_per_s = round(max(served, 0.0) / seconds, 3)
    probe = FairnessProbe(
        texts_per_call=texts,
        stream_callers=s.probe_callers,
        deadline_s=s.probe_deadline_s,
        reference=reference,
        lone=beside,
        stream_seconds=round(seconds, 3),
        stream_calls=calls,
        stream_texts_per_s=round(stream_texts / seconds, 3),
        stream_failed=failed,
        model_texts_per_s=model_texts_per_s,
    )
    if progress is not None:
        progress.finish(
            f"fairness: one-text p99 {beside.measured.latency_ms.p99} ms beside {s.probe_callers} callers of "
            f"{texts}-text calls ({probe.stream_texts_per_s:g} texts/s); alone "
            f"{reference.measured.latency_ms.p99} ms"
        )
    return probe


async def measure_overload(
    subject: Subject, workload: Workload, s: OverloadSettings, progress: ProgressLine | None
) -> OverloadResult:
    """Capacity, the levels, then (unless `s.probe` is off) the fairness probe."""
    capacity = await measure_capacity(
        subject,
        workload,
        given=s.capacity_per_s,
        callers=s.capacity_callers,
        warmup_s=s.warmup_s,
        window_s=s.capacity_window_s,
        max_in_flight=s.max_in_flight,
        progress=progress,
    )
    before = rss_mib(subject.pid)
    levels = await overload_levels(subject, workload, s, capacity.calls_per_s, progress)
    peaks = [lv.rss_peak_mib for lv in levels if lv.rss_peak_mib is not None]
    fairness = await fairness_probe(subject, workload, s, progress) if s.probe else None
    return OverloadResult(
        deadline_s=s.deadline_s,
        capacity=capacity,
        levels=tuple(levels),
        rss_before_mib=before,
        rss_peak_mib=max(peaks, default=None),
        pid=subject.pid,
        fairness=fairness,
    )


def steps_of(result: OverloadResult) -> list[StepResult]:
    steps = [lv.step for lv in result.levels]
    if result.capacity.step is not None:
        steps.insert(0, result.capacity.step)
    if result.fairness is not None:
        steps += [result.fairness.reference, result.fairness.lone]
    return steps


# --- the report ------------------------------------------------------------------------------------------


def _cpu_text(levels: Sequence[OverloadLevel]) -> str:
    """Where the lowest level's goodput went, in cores, beside the first level's; empty without readings."""
    rated = [lv for lv in levels if lv.goodput_ratio is not None and lv.cpu is not None]
    if len(rated) < 2:
        return ""
    first, low = rated[0], min(rated, key=lambda lv: lv.goodput_ratio or 0.0)
    if low is first:
        return ""
    a, b = first.cpu, low.cpu
    assert a is not None and b is not None  # rated
    return (
        f"; the model's threads ran {b.cores(b.model_ms):.2f} cores at {low.level:g}x against "
        f"{a.cores(a.model_ms):.2f} at {first.level:g}x, while the server's other threads took "
        f"{b.cores(b.outside_model_ms):.2f} (against {a.cores(a.outside_model_ms):.2f}) and the load "
        f"generator {b.client_cores:.2f} (against {a.client_cores:.2f}) (below)"
    )


def overload_summary(result: OverloadResult) -> dict[str, SummaryItem]:
    """The issue's targets as met/missed rows, and the fairness figure beside them."""
    levels = result.levels
    deadline_ms = result.deadline_s * 1000
    cap = result.capacity.calls_per_s
    out: dict[str, SummaryItem] = {}
    ratios = [lv.goodput_ratio for lv in levels if lv.goodput_ratio is not None]
    ratio_text = ", ".join(f"{lv.level:g}x {lv.goodput_ratio}" for lv in levels)
    out["overload_goodput"] = SummaryItem(
        title="Overload: goodput over capacity, lowest level",
        value=min(ratios, default=None),
        how=f"OK answers within the {result.deadline_s:g} s deadline per second, over the capacity "
        f"({cap:g} calls/s); per level: {ratio_text}{_cpu_text(levels)}",
        digits=3,
        target=f">= {GOODPUT_TARGET} at every level",
        met=bool(levels) and len(ratios) == len(levels) and min(ratios) >= GOODPUT_TARGET,
    )
    p99s = [
        p99
        for lv in levels
        if (f := lv.outcomes.statuses.get(REFUSED)) is not None and (p99 := f.latency_ms.p99) is not None
    ]
    counts = ", ".join(f"{lv.level:g}x {lv.outcomes.calls(REFUSED)}" for lv in levels)
    out["overload_refusal_p99"] = SummaryItem(
        title="Overload: RESOURCE_EXHAUSTED answered in, p99, slowest level",
        value=max(p99s, default=None),
        how=f"from the scheduled send; refused calls per level: {counts}"
        + ("" if p99s else "; no call was refused at any level: the server shed no load"),
        unit=" ms",
        digits=3,
        target=f"< {REFUSAL_P99_TARGET_MS:g} ms",
        met=bool(p99s) and max(p99s) < REFUSAL_P99_TARGET_MS,
    )
    admitted = [p for lv in levels if (p := lv.outcomes.admitted_latency_ms.p99) is not None]
    admitted_text = ", ".join(f"{lv.level:g}x {lv.outcomes.admitted_latency_ms.p99} ms" for lv in levels)
    out["overload_admitted_p99"] = SummaryItem(
        title="Overload: admitted-call p99, slowest level",
        value=max(admitted, default=None),
        how="every answered call not refused with RESOURCE_EXHAUSTED, from the scheduled send (one past its "
        f"deadline counts when it failed); per level: {admitted_text}",
        unit=" ms",
        digits=1,
        target=f"< {deadline_ms:g} ms (the deadline)",
        met=bool(admitted) and max(admitted) < deadline_ms,
    )
    before, peak = result.rss_before_mib, result.rss_peak_mib
    rss_target = f"<= {RSS_GROWTH_TARGET:g}x the RSS after the capacity step"
    if before is None or peak is None:
        out["overload_rss"] = SummaryItem(
            title="Overload: server RSS, peak over the levels",
            value=None,
            how="unknown: no /proc readings of the server (an external target without --pid)",
            unit=" MiB",
            digits=1,
            target=rss_target,
            met=None,
        )
    else:
        out["overload_rss"] = SummaryItem(
            title="Overload: server RSS, peak over the levels",
            value=peak,
            how=f"VmRSS sampled every {SAMPLE_EVERY_S:g} s during the levels; {before:g} MiB after the "
            f"capacity step, so {peak / before:.2f}x",
            unit=" MiB",
            digits=1,
            target=f"{rss_target} ({before * RSS_GROWTH_TARGET:.1f} MiB)",
            met=peak <= before * RSS_GROWTH_TARGET,
        )
    fair = result.fairness
    if fair is not None:
        lone = fair.lone.measured
        stream_rate = (
            f"{fair.stream_texts_per_s:g} texts/s answered"
            if fair.model_texts_per_s is None
            else f"the server ran {fair.model_texts_per_s:g} of their texts/s"
        )
        out["fairness_lone_p99"] = SummaryItem(
            title=f"One-text p99 beside {fair.texts_per_call:,}-text calls",
            value=fair.lone.measured.latency_ms.p99,
            how=f"one caller, one-text calls back to back, beside {fair.stream_callers} callers sending "
            f"{fair.texts_per_call:,}-text Embed calls ({stream_rate}); the same "
            f"caller alone just before: p99 {fair.reference.measured.latency_ms.p99} ms"
            + (
                f"; beside the stream {lone.failed} of its calls failed: {lone.errors}" if lone.failed else ""
            ),
            unit=" ms",
            digits=1,
        )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(calls: int, share: float) -> str:
    return f"{calls} ({share * 100:.1f}%)"


def level_lines(result: OverloadResult) -> list[str]:
    levels = result.levels
    codes = ["OK", REFUSED, EXCEEDED]
    for lv in levels:
        codes += [c for c in lv.outcomes.statuses if c not in codes]
    header = [
        "level",
        "offered/s",
        "sent/s",
        "goodput/s",
        "x capacity",
        *codes,
        "OK p50 ms",
        "OK p99 ms",
        "refused p99 ms",
        "admitted p99 ms",
        "late",
        "RSS end MiB",
        "RSS peak MiB",
    ]
    with_cpu = any(lv.cpu is not None for lv in levels)
    if with_cpu:
        header += ["model cores", "server cores outside the model", "load generator cores"]
    rows = []
    for lv in levels:
        o = lv.outcomes
        ok = o.statuses.get("OK")
        ref = o.statuses.get(REFUSED)
        sched = lv.step.schedule
        rows.append(
            [
                f"{lv.level:g}x",
                f"{lv.offered_per_s:g}",
                _fmt(sched.sent_rate if sched else None),
                f"{o.goodput_per_s:g}",
                _fmt(lv.goodput_ratio, 3),
                *(_count(f.calls, f.share) if (f := o.statuses.get(c)) is not None else "0" for c in codes),
                _fmt(ok.latency_ms.p50 if ok else None),
                _fmt(ok.latency_ms.p99 if ok else None),
                _fmt(ref.latency_ms.p99 if ref else None, 2),
                _fmt(o.admitted_latency_ms.p99),
                "-" if sched is None else f"{sched.late_fraction * 100:.0f}%",
                _fmt(lv.rss_end_mib),
                _fmt(lv.rss_peak_mib),
            ]
        )
        if with_cpu:
            c = lv.cpu
            rows[-1] += (
                ["-"] * 3
                if c is None
                else [
                    _fmt(c.cores(c.model_ms), 2),
                    _fmt(c.cores(c.outside_model_ms), 2),
                    _fmt(c.client_cores, 2),
                ]
            )
    cap = result.capacity
    first = levels[0].step.plan if levels else None
    timing = (
        f"{first.warmup_s:g} s of warm-up, then one window of {first.window_s:g} s"
        if first is not None
        else "no levels"
    )
    rss = (
        f"{result.rss_before_mib:g} MiB after the capacity step"
        if result.rss_before_mib is not None
        else "unknown (no /proc readings of the server)"
    )
    lines = [
        f"Capacity: **{cap.calls_per_s:g} calls/s**, {cap.how}. Each level is an open loop of one-text Embed "
        f"calls (the workload above) on a Poisson schedule at a multiple of it, every call with a "
        f"{result.deadline_s:g} s deadline; {timing}. **Goodput**: OK answers arriving in the window within "
        "their deadline (counted from the scheduled send), per second. Status columns: calls sent in "
        "the window (share). Latencies run from the scheduled send; *refused* is RESOURCE_EXHAUSTED, "
        "*admitted* every other answered call. *Late*: calls the client itself sent over 5 ms behind "
        f"schedule. RSS: VmRSS of the server process at the end of the level and its peak (sampled every "
        f"{SAMPLE_EVERY_S:g} s); {rss}."
        + (
            " Cores, over the window, from /proc: the server's model threads (ONNX Runtime's pool "
            "included), its other threads (the event loop, gRPC, tokenising: where each refusal is "
            "answered), and the load generator (this process), which shares its "
            f"{report.usable_cores()} usable cores with the server here: what they take, the model cannot "
            "have."
            if with_cpu
            else ""
        ),
        "",
        *report.md_table(header, rows),
    ]
    behind = [f"{lv.level:g}x" for lv in levels if lv.step.schedule and lv.step.schedule.client_fell_behind]
    if behind:
        lines += [
            "",
            f"The client fell behind its schedule at {', '.join(behind)}: the offered rate was not fully "
            "sent, and late calls carry their lag in their latency.",
        ]
    return lines


def fairness_lines(fair: FairnessProbe) -> list[str]:
    rows = []
    for name, step in (("alone (reference)", fair.reference), ("beside the stream", fair.lone)):
        m = step.measured
        lat = m.latency_ms
        failures = ", ".join(f"{code} {n}" for code, n in m.errors.items())
        rows.append(
            [
                name,
                str(m.completed),
                _fmt(lat.p50),
                _fmt(lat.p99),
                _fmt(lat.max),
                f"{m.failed} ({failures})" if failures else str(m.failed),
            ]
        )
    failed = f"; failed: {fair.stream_failed}" if fair.stream_failed else ""
    ran = (
        "the server has no metrics endpoint to count its batched texts"
        if fair.model_texts_per_s is None
        else f"the server's batches ran **{fair.model_texts_per_s:g} texts/s** of the stream's texts then"
    )
    return [
        f"One caller sends one-text Embed calls back to back (the workload above, deadline "
        f"{fair.deadline_s:g} s): first alone, then beside {fair.stream_callers} callers on another channel "
        f"sending {fair.texts_per_call:,}-text Embed calls back to back, which had a warm-up of their own "
        "before the one-text caller started. The stream answered "
        f"{fair.stream_calls} big calls OK in the {fair.stream_seconds:g} s the one-text caller was "
        f"measured ({fair.stream_texts_per_s:g} texts/s in answers){failed}; {ran}. Latencies are of the "
        "one-text caller's OK calls; it sends its next call as soon as one fails, so `calls` counts the OK "
        "ones.",
        "",
        *report.md_table(["one-text caller", "calls", "p50 ms", "p99 ms", "max ms", "failed"], rows),
    ]


def overload_sections(result: OverloadResult) -> dict[str, list[str]]:
    sections = {"Overload": level_lines(result)}
    if result.fairness is not None:
        heading = f"Fairness: one-text calls beside {result.fairness.texts_per_call:,}-text calls"
        sections[heading] = fairness_lines(result.fairness)
    return sections


def inconsistent(steps: Sequence[StepResult], err: TextIO) -> int:
    """1 and a line on `err` if any step's figures do not add up (a harness bug), else 0."""
    bad = [s.label for s in steps if not s.consistency.ok]
    if bad:
        print(
            f"recserve bench: inconsistent figures in {', '.join(bad)} (a harness bug; see results.json)",
            file=err,
        )
        return 1
    return 0


async def run_overload(cfg: OverloadConfig, err: TextIO | None = None) -> int:
    """`bench overload` after its flags were checked: returns the exit code. Raises ConfigError when the
    workload cannot be built, TargetError or ServerStartError when the target cannot take the load."""
    err = err or sys.stderr
    workload = workload_of(cfg.workload)
    progress = ProgressLine(err) if cfg.progress else None
    notes: list[str] = []
    doc = report.new_document("overload", cfg.command, settings(cfg))
    async with open_subject(cfg.server, cfg.out / "logs" / "server.log", notes) as subject:
        check_workload_fits(cfg.workload, subject.info, subject.address)
        result = await measure_overload(subject, workload, cfg.settings, progress)
    done = replace(
        doc,
        workload=workload.describe(),
        summary=overload_summary(result),
        sections=overload_sections(result),
        overload=result,
        notes=tuple(notes),
    )
    report.publish(done, cfg.out, cfg.markdown)
    return inconsistent(steps_of(result), err)
