"""The load loops: closed (N callers, each waits for its answer) and open (calls sent on a schedule).

A step is a warm-up, then measurement windows repeated until two consecutive windows agree on throughput
(within a tolerance) or a cap is reached. Every loop is bounded in calls and in time and stops by itself.
What each call did goes to a recorder (recorder.py); the figures are computed from it (summary.py).

Definitions used in every report:
- a call belongs to the window in which it was sent, or, in the open loop, scheduled to be sent; its
  latency runs from that moment to its answer. An open-loop call that leaves late (client busy) or waits in
  the server's queue is therefore charged for it: no coordinated omission.
- sent = completed + failed, over the calls that belong to the measured windows (all of them are awaited).
- throughput counts the successful answers that arrive inside the measured windows, divided by their
  length: what the server delivered, which in the open loop may be less than what was offered.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Literal

import grpc
import numpy as np

from recserve.benchmarks import stats, summary
from recserve.benchmarks.protocols import Target
from recserve.benchmarks.recorder import CLIENT_ERROR, OK, Recorder, Windows
from recserve.benchmarks.results import Figures, StepResult, StepSettings
from recserve.benchmarks.workloads import Workload

_CANCELLED = grpc.StatusCode.CANCELLED.value[0]

# The live progress line looks at this many of the latest calls.
_RECENT = 2000

Progress = Callable[[str], None]
# Awaited at each window boundary k (k=0: the first window opens; k: window k-1 has just closed), before
# any drain wait: the place to scrape the server's metrics, so its view covers the same windows.
BoundaryHook = Callable[[int], Awaitable[None]]
Mode = Literal["closed", "open"]
Arrival = Literal["poisson", "fixed"]


@dataclass(frozen=True)
class LoadSettings:
    """How each step runs (shared by `run` and `suite`)."""

    warmup_s: float = 2.0
    window_s: float = 5.0
    max_windows: int = 3
    tolerance: float = 0.05
    deadline_s: float = 10.0
    max_calls: int = 1_000_000
    max_in_flight: int = 4096

    def plan(
        self,
        mode: Mode,
        *,
        concurrency: int = 1,
        rate: float = 0.0,
        arrival: Arrival = "poisson",
        seed: int = 0,
    ) -> StepPlan:
        return StepPlan(
            **asdict(self), mode=mode, concurrency=concurrency, rate=rate, arrival=arrival, seed=seed
        )


@dataclass(frozen=True)
class StepPlan(LoadSettings):
    """One step of a sweep: the load settings plus what is swept; every field is reported with its results."""

    mode: Mode = "closed"
    concurrency: int = 1
    rate: float = 0.0
    arrival: Arrival = "poisson"
    late_after_s: float = 0.005
    seed: int = 0
    # Opt-in figures, off for `run` and the suite's sweeps so their results keep their shape.
    outcomes: bool = False
    """Also the calls by status and the goodput (the overload steps)."""
    all_windows: bool = False
    """Run every window (no stop once stable) and keep each window's figures (the soak)."""

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"closed c={self.concurrency}"
        return f"open {self.rate:g}/s {self.arrival}"

    def max_seconds(self) -> float:
        """The longest the step can take: warm-up, every window, then the last calls' deadline."""
        return self.warmup_s + self.max_windows * self.window_s + self.deadline_s + 2.0

    def settings(self) -> StepSettings:
        return StepSettings(**{f.name: getattr(self, f.name) for f in fields(StepSettings)})


def gaps(rate: float, arrival: str, seed: int, block: int = 4096) -> Iterator[float]:
    """Seconds between consecutive sends: constant, or exponential (a Poisson process) from `seed`."""
    if arrival == "fixed":
        while True:
            yield 1.0 / rate
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.exponential(1.0 / rate, size=block).tolist()


class _Step:
    def __init__(
        self,
        plan: StepPlan,
        target: Target,
        workload: Workload,
        progress: Progress | None,
        on_boundary: BoundaryHook | None,
    ) -> None:
        self.plan = plan
        self.workload = workload
        self.progress = progress
        self.on_boundary = on_boundary
        self.loop = asyncio.get_running_loop()
        self.send = target.calls(workload).send
        self.ring = len(workload)
        # Embed replies report the exact token counts; the first reply to each call replaces the estimate.
        self.tokens_pending = {i for i, k in enumerate(workload.kinds) if k == "embed"}
        self.tokens = workload.tokens_per.copy()

        self.t0 = self.loop.time() + 0.01
        self.windows = Windows(self.t0 + plan.warmup_s, plan.window_s)
        self.stop_at = self.windows.bounds(plan.max_windows - 1)[1]
        self.recorder = Recorder(self.windows)
        self.outstanding: dict[int, int] = {}
        self.changed = asyncio.Event()
        self.room = asyncio.Event()
        self.calls = 0
        self.errors = 0
        self.in_flight = 0
        self.cap_hits = 0
        self.frontier = -math.inf  # open loop: every call scheduled before this has been sent
        self.tasks: set[asyncio.Task[None]] = set()

    def admit(self, i: int, sched: float, start: float) -> int:
        """Counts a call as sent, before it starts: the open loop's in-flight cap must see the calls it has
        launched as tasks that have not run yet, or a late sender would burst past the cap."""
        row = self.recorder.admit(sched, start, i)
        w = self.recorder.window[row]
        self.outstanding[w] = self.outstanding.get(w, 0) + 1
        self.in_flight += 1
        return row

    async def call(self, row: int) -> None:
        i = self.recorder.index[row]
        code = OK
        try:
            code, tokens = await self.send(i, self.plan.deadline_s)
            if code == OK and tokens is not None and i in self.tokens_pending:
                self.tokens_pending.discard(i)
                self.tokens[i] = tokens
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception:
            # Recorded, not raised: a closed-loop caller must outlive anything one call does.
            code = CLIENT_ERROR
        finally:
            self.recorder.finish(row, self.loop.time(), code)
            self.errors += code != OK
            self.in_flight -= 1
            w = self.recorder.window[row]
            self.outstanding[w] -= 1
            if self.outstanding[w] == 0:
                self.changed.set()
            if self.in_flight < self.plan.max_in_flight:
                self.room.set()

    async def closed_worker(self) -> None:
        n = self.ring
        while self.calls < self.plan.max_calls:
            now = self.loop.time()
            if now >= self.stop_at:
                return
            i = self.calls % n
            self.calls += 1
            await self.call(self.admit(i, now, now))

    async def open_dispatcher(self) -> None:
        n = self.ring
        plan = self.plan
        sched = self.t0
        next_gap = gaps(plan.rate, plan.arrival, plan.seed)
        try:
            while self.calls < plan.max_calls and sched < self.stop_at:
                delay = sched - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if sched >= self.stop_at:  # the step ended while we slept
                        break
                if self.in_flight >= plan.max_in_flight:
                    # Bounded memory: wait for room. The wait is charged to the calls (lag and latency).
                    self.cap_hits += 1
                    self.room.clear()
                    await self.room.wait()
                row = self.admit(self.calls % n, sched, self.loop.time())
                task = self.loop.create_task(self.call(row))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                self.calls += 1
                previous, sched = sched, sched + next(next_gap)
                self.frontier = sched
                if self.windows.of(sched) != self.windows.of(previous):
                    self.changed.set()
        finally:
            self.frontier = math.inf
            self.changed.set()

    def sent_through(self, t: float) -> bool:
        """Every call that belongs before `t` has been sent."""
        if self.plan.mode == "closed":
            return self.loop.time() >= t
        return self.frontier >= t

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        """Event-driven wait (no polling): re-checks whenever a window drains or the schedule moves on."""
        end = self.loop.time() + within
        while not predicate():
            self.changed.clear()
            remaining = end - self.loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    async def sleep_until(self, t: float) -> None:
        delay = t - self.loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def report_progress(self, interval: float = 0.5) -> None:
        assert self.progress is not None
        last_done, last_t = 0, self.loop.time()
        while True:  # cancelled when the step ends
            await asyncio.sleep(interval)
            now = self.loop.time()
            done = len(self.recorder.finished)
            speed = (done - last_done) / max(now - last_t, 1e-9)
            last_done, last_t = done, now
            recent = self.recorder.recent_latencies(_RECENT)
            p99 = f"{np.percentile(recent, 99) * 1000:.1f}" if recent.size else "-"
            k = self.windows.of(now)
            phase = "warm-up" if k < 0 else f"window {min(k, self.plan.max_windows - 1) + 1}"
            late = ""
            if self.plan.mode == "open":
                behind = int((self.recorder.recent_lags(_RECENT) > self.plan.late_after_s).sum())
                late = f"  late {behind}"
            self.progress(
                f"{self.plan.label:<22} {phase:<9} {speed:8.1f} calls/s  p99 {p99:>7} ms  "
                f"in flight {self.in_flight:<5} errors {self.errors}{late}"
            )

    def figures(self, first: int, last: int) -> Figures:
        table = self.recorder.table()
        return summary.figures(table, self.windows, first, last, self.workload.texts_per, self.tokens)

    async def run(self) -> StepResult:
        plan = self.plan
        if plan.mode == "closed":
            drivers = [self.loop.create_task(self.closed_worker()) for _ in range(plan.concurrency)]
        else:
            drivers = [self.loop.create_task(self.open_dispatcher())]
        reporter = self.loop.create_task(self.report_progress()) if self.progress else None
        windows: list[Figures] = []
        stable: bool | None = None
        try:
            await self.sleep_until(self.windows.start)
            if self.on_boundary is not None:
                await self.on_boundary(0)
            for k in range(plan.max_windows):
                _, end = self.windows.bounds(k)
                await self.sleep_until(end)
                if self.on_boundary is not None:
                    await self.on_boundary(k + 1)

                def drained(k: int = k, end: float = end) -> bool:
                    return self.sent_through(end) and self.outstanding.get(k, 0) == 0

                await self.wait_for(drained, plan.deadline_s + plan.window_s + 1.0)
                windows.append(self.figures(k, k))
                if k >= 1:
                    stable = stats.is_stable(windows[-2].calls_per_s, windows[-1].calls_per_s, plan.tolerance)
                    if stable and not plan.all_windows:
                        break
                if self.calls >= plan.max_calls:
                    break
            # Nothing new after the last measured window; the calls sent meanwhile still get awaited.
            self.stop_at = min(self.stop_at, self.windows.bounds(len(windows) - 1)[1])
            await asyncio.wait(drivers, timeout=plan.deadline_s + 1.0)
            stragglers = await self.finish(plan.deadline_s + 1.0)
        finally:
            for task in [*drivers, *self.tasks]:
                task.cancel()
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            await asyncio.gather(*drivers, *self.tasks, return_exceptions=True)
        return self.result(windows, stable, stragglers)

    def result(self, windows: list[Figures], stable: bool | None, stragglers: int) -> StepResult:
        plan = self.plan
        first, last = max(0, len(windows) - 2), len(windows) - 1
        measured = self.figures(first, last)
        table = self.recorder.table()
        start, end = self.windows.bounds(first, last)
        schedule = None
        if plan.mode == "open":
            schedule = summary.schedule(
                table,
                first,
                last,
                rate=plan.rate,
                late_after_s=plan.late_after_s,
                cap_hits=self.cap_hits,
                seconds=end - start,
            )
        open_loop = plan.mode == "open"
        return StepResult(
            measured=measured,
            label=plan.label,
            mode=plan.mode,
            concurrency=None if open_loop else plan.concurrency,
            rate=plan.rate if open_loop else None,
            arrival=plan.arrival if open_loop else None,
            windows=tuple(w.counts() for w in windows),
            windows_used=last - first + 1,
            boundaries=(first, last + 1),
            warmup=summary.warmup(table),
            stable=stable,
            bounded_by_calls=self.calls >= plan.max_calls,
            stragglers_cancelled=stragglers,
            plan=plan.settings(),
            schedule=schedule,
            consistency=summary.consistency(measured),
            outcomes=(
                summary.outcomes(table, self.windows, first, last, deadline_s=plan.deadline_s)
                if plan.outcomes
                else None
            ),
            window_figures=tuple(windows) if plan.all_windows else None,
            latency_distribution=stats.latency_distribution(summary.latencies(table, first, last)),
        )

    async def finish(self, grace: float) -> int:
        """Awaits the calls still in flight (they have deadlines); cancels any left after `grace` seconds."""
        pending = set(self.tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        return len(pending)


async def run_step(
    plan: StepPlan,
    target: Target,
    workload: Workload,
    *,
    progress: Progress | None = None,
    on_boundary: BoundaryHook | None = None,
) -> StepResult:
    """Runs one step against `target` (protocols.py: recserve, or a server of another protocol).

    `on_boundary(k)` is awaited at each window boundary; the result's `boundaries` names the two that enclose
    the windows it reports.
    """
    if plan.mode == "closed" and plan.concurrency < 1:
        raise ValueError("closed loop needs concurrency >= 1")
    if plan.mode == "open" and not plan.rate > 0:
        raise ValueError("open loop needs a rate > 0")
    if plan.max_windows < 1 or plan.window_s <= 0 or plan.warmup_s < 0:
        raise ValueError("a step needs max_windows >= 1, window_s > 0 and warmup_s >= 0")
    # Latency runs from the scheduled send, so a pause of this process counts against the server: what
    # exists before the load (workload, channels) is frozen, so that the collector's full passes stay short.
    gc.collect()
    gc.freeze()
    return await _Step(plan, target, workload, progress, on_boundary).run()
