"""The load loops: closed (N callers, each waits for its answer) and open (calls sent on a schedule).

A step is a warm-up, then measurement windows repeated until two consecutive windows agree on throughput
(within a tolerance) or a cap is reached. Every loop is bounded in calls and in time and stops by itself.

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
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from recserve.benchmarks import stats
from recserve.benchmarks.workloads import Workload
from recserve.v1 import inference_pb2 as pb

OK = 0
# The server answered, but with the wrong number of vectors or scores: counted as a failure.
MISMATCH = -1
CODE_NAMES: dict[int, str] = {c.value[0]: c.name for c in grpc.StatusCode} | {MISMATCH: "MISMATCHED_REPLY"}
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]

# What each prebuilt call returns, to check the count cheaply: packed bytes, float vectors, or scores.
_PACKED, _FLOATS, _SCORES = 0, 1, 2
_PACKED_WIDTH = {pb.VECTOR_ENCODING_PACKED_F16: 2, pb.VECTOR_ENCODING_PACKED_F32: 4}

Progress = Callable[[str], None]
# Awaited at each window boundary k (k=0: the first window opens; k: window k-1 has just closed), before
# any drain wait: the place to scrape the server's metrics, so its view covers the same windows.
BoundaryHook = Callable[[int], Awaitable[None]]


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

    def plan(self, mode: Literal["closed", "open"], **kw: Any) -> StepPlan:
        return StepPlan(mode=mode, **asdict(self), **kw)


@dataclass(frozen=True)
class StepPlan(LoadSettings):
    """One step of a sweep: the load settings plus what is swept; every field is reported with its results."""

    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 1
    rate: float = 0.0
    arrival: Literal["poisson", "fixed"] = "poisson"
    late_after_s: float = 0.005
    seed: int = 0

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"closed c={self.concurrency}"
        return f"open {self.rate:g}/s {self.arrival}"

    def max_seconds(self) -> float:
        """The longest the step can take: warm-up, every window, then the last calls' deadline."""
        return self.warmup_s + self.max_windows * self.window_s + self.deadline_s + 2.0


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
        stub: Any,
        workload: Workload,
        progress: Progress | None,
        on_boundary: BoundaryHook | None,
    ) -> None:
        self.plan = plan
        self.workload = workload
        self.progress = progress
        self.on_boundary = on_boundary
        self.loop = asyncio.get_running_loop()
        methods = {"embed": stub.Embed, "score": stub.Score, "history": stub.Score}
        self.methods = [methods[k] for k in workload.kinds]
        self.messages = workload.messages
        self.expect = workload.expect.tolist()
        self.check: list[tuple[int, int]] = []
        for kind, msg, n in zip(workload.kinds, workload.messages, self.expect, strict=True):
            if kind != "embed":
                self.check.append((_SCORES, n))
            elif isinstance(msg, pb.EmbedRequest) and msg.encoding in _PACKED_WIDTH:
                self.check.append((_PACKED, n * _PACKED_WIDTH[msg.encoding]))
            else:
                self.check.append((_FLOATS, n))
        # Embed replies report the exact token counts; the first reply to each call replaces the estimate.
        self.tokens_pending = {i for i, k in enumerate(workload.kinds) if k == "embed"}
        self.tokens = workload.tokens_per.copy()

        self.t0 = self.loop.time() + 0.01
        self.measure_start = self.t0 + plan.warmup_s
        self.stop_at = self.measure_start + plan.max_windows * plan.window_s
        self.r_sched: list[float] = []
        self.r_done: list[float] = []
        self.r_code: list[int] = []
        self.r_idx: list[int] = []
        self.d_sched: list[float] = []
        self.d_lag: list[float] = []
        self.sent: dict[int, int] = {}
        self.outstanding: dict[int, int] = {}
        self.changed = asyncio.Event()
        self.room = asyncio.Event()
        self.calls = 0
        self.errors = 0
        self.in_flight = 0
        self.cap_hits = 0
        self.frontier = -math.inf  # open loop: every call scheduled before this has been sent
        self.tasks: set[asyncio.Task[None]] = set()

    def window_of(self, t: float) -> int:
        """-1 for warm-up, else the measurement window index."""
        if t < self.measure_start:
            return -1
        return int((t - self.measure_start) // self.plan.window_s)

    def window_bounds(self, k: int) -> tuple[float, float]:
        start = self.measure_start + k * self.plan.window_s
        return start, start + self.plan.window_s

    def admit(self, sched: float) -> int:
        """Counts a call as sent, before it starts: the open loop's in-flight cap must see the calls it has
        launched as tasks that have not run yet, or a late sender would burst past the cap."""
        w = self.window_of(sched)
        self.sent[w] = self.sent.get(w, 0) + 1
        self.outstanding[w] = self.outstanding.get(w, 0) + 1
        self.in_flight += 1
        return w

    async def call(self, i: int, sched: float, w: int) -> None:
        code = OK
        try:
            resp = await self.methods[i](self.messages[i], timeout=self.plan.deadline_s)
            kind, n = self.check[i]
            if kind == _PACKED:
                got = len(resp.packed) == n * resp.dimension and resp.dimension > 0
            elif kind == _FLOATS:
                got = len(resp.vectors) == n
            else:
                got = len(resp.scores) == n
            if not got:
                code = MISMATCH
            elif i in self.tokens_pending:
                self.tokens_pending.discard(i)
                self.tokens[i] = sum(resp.token_counts)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        finally:
            self.r_sched.append(sched)
            self.r_done.append(self.loop.time())
            self.r_code.append(code)
            self.r_idx.append(i)
            self.errors += code != OK
            self.in_flight -= 1
            self.outstanding[w] -= 1
            if self.outstanding[w] == 0:
                self.changed.set()
            if self.in_flight < self.plan.max_in_flight:
                self.room.set()

    async def closed_worker(self) -> None:
        n = len(self.messages)
        while self.calls < self.plan.max_calls:
            now = self.loop.time()
            if now >= self.stop_at:
                return
            i = self.calls % n
            self.calls += 1
            await self.call(i, now, self.admit(now))

    async def open_dispatcher(self) -> None:
        n = len(self.messages)
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
                self.d_sched.append(sched)
                self.d_lag.append(self.loop.time() - sched)
                task = self.loop.create_task(self.call(self.calls % n, sched, self.admit(sched)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                self.calls += 1
                previous, sched = sched, sched + next(next_gap)
                self.frontier = sched
                if self.window_of(sched) != self.window_of(previous):
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
            done = len(self.r_done)
            speed = (done - last_done) / max(now - last_t, 1e-9)
            last_done, last_t = done, now
            tail = slice(max(0, done - 2000), done)
            recent = np.array(self.r_done[tail]) - np.array(self.r_sched[tail])
            p99 = f"{np.percentile(recent, 99) * 1000:.1f}" if recent.size else "-"
            k = self.window_of(now)
            phase = "warm-up" if k < 0 else f"window {min(k, self.plan.max_windows - 1) + 1}"
            late = ""
            if self.plan.mode == "open" and self.d_lag:
                behind = sum(1 for x in self.d_lag[-2000:] if x > self.plan.late_after_s)
                late = f"  late {behind}"
            self.progress(
                f"{self.plan.label:<22} {phase:<9} {speed:8.1f} calls/s  p99 {p99:>7} ms  "
                f"in flight {self.in_flight:<5} errors {self.errors}{late}"
            )

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        if plan.mode == "closed":
            drivers = [self.loop.create_task(self.closed_worker()) for _ in range(plan.concurrency)]
        else:
            drivers = [self.loop.create_task(self.open_dispatcher())]
        reporter = self.loop.create_task(self.report_progress()) if self.progress else None
        windows: list[dict[str, Any]] = []
        stable: bool | None = None
        try:
            await self.sleep_until(self.measure_start)
            if self.on_boundary is not None:
                await self.on_boundary(0)
            for k in range(plan.max_windows):
                _, end = self.window_bounds(k)
                await self.sleep_until(end)
                if self.on_boundary is not None:
                    await self.on_boundary(k + 1)

                def drained(k: int = k, end: float = end) -> bool:
                    return self.sent_through(end) and self.outstanding.get(k, 0) == 0

                await self.wait_for(drained, plan.deadline_s + plan.window_s + 1.0)
                windows.append(self.summarise([k]))
                if k >= 1:
                    stable = stats.is_stable(
                        windows[-2]["calls_per_s"], windows[-1]["calls_per_s"], plan.tolerance
                    )
                    if stable:
                        break
                if self.calls >= plan.max_calls:
                    break
            # Nothing new after the last measured window; the calls sent meanwhile still get awaited.
            self.stop_at = min(self.stop_at, self.window_bounds(len(windows) - 1)[1])
            await asyncio.wait(drivers, timeout=plan.deadline_s + 1.0)
            stragglers = await self.finish(plan.deadline_s + 1.0)
        finally:
            for task in [*drivers, *self.tasks]:
                task.cancel()
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            await asyncio.gather(*drivers, *self.tasks, return_exceptions=True)
        used = list(range(max(0, len(windows) - 2), len(windows)))
        result = self.summarise(used)
        result.update(
            label=plan.label,
            mode=plan.mode,
            concurrency=plan.concurrency if plan.mode == "closed" else None,
            rate=plan.rate if plan.mode == "open" else None,
            arrival=plan.arrival if plan.mode == "open" else None,
            windows=[{k: w[k] for k in ("calls_per_s", "sent", "completed", "failed")} for w in windows],
            windows_used=len(used),
            boundaries=[used[0], used[-1] + 1],
            warmup=self.warmup_summary(),
            stable=stable,
            bounded_by_calls=self.calls >= plan.max_calls,
            stragglers_cancelled=stragglers,
            plan={
                "warmup_s": plan.warmup_s,
                "window_s": plan.window_s,
                "max_windows": plan.max_windows,
                "tolerance": plan.tolerance,
                "deadline_s": plan.deadline_s,
                "max_calls": plan.max_calls,
            },
        )
        if plan.mode == "open":
            result["schedule"] = self.schedule_summary(used)
        result["consistency"] = stats.consistency(result)
        return result

    async def finish(self, grace: float) -> int:
        """Awaits the calls still in flight (they have deadlines); cancels any left after `grace` seconds."""
        pending = set(self.tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        return len(pending)

    def summarise(self, windows: list[int]) -> dict[str, Any]:
        """Figures over the given consecutive windows (see the module docstring for the definitions)."""
        start = self.window_bounds(windows[0])[0]
        end = self.window_bounds(windows[-1])[1]
        seconds = end - start
        sched = np.array(self.r_sched)
        done = np.array(self.r_done)
        codes = np.array(self.r_code, dtype=np.int64)
        idx = np.array(self.r_idx, dtype=np.int64)
        belongs = (sched >= start) & (sched < end)
        ok = codes == OK
        arrived = ok & (done >= start) & (done < end)
        texts = self.workload.texts_per
        failed = belongs & ~ok
        return {
            "window_s": round(seconds, 6),
            "sent": sum(self.sent.get(k, 0) for k in windows),
            "completed": int((belongs & ok).sum()),
            "failed": int(failed.sum()),
            "errors": stats.error_counts(codes[failed], CODE_NAMES),
            "calls_per_s": stats.rate(int(arrived.sum()), seconds),
            "texts_per_s": stats.rate(int(texts[idx[arrived]].sum()), seconds),
            "tokens_per_s": stats.rate(int(self.tokens[idx[arrived]].sum()), seconds),
            "latency_ms": stats.latency_summary(done[belongs & ok] - sched[belongs & ok]),
        }

    def warmup_summary(self) -> dict[str, Any]:
        """Warm-up calls are not measured, but their failures are shown: a server failing early is news."""
        sched = np.array(self.r_sched)
        codes = np.array(self.r_code, dtype=np.int64)[sched < self.measure_start]
        failed = codes[codes != OK]
        return {
            "sent": self.sent.get(-1, 0),
            "failed": int(failed.size),
            "errors": stats.error_counts(failed, CODE_NAMES),
        }

    def schedule_summary(self, windows: list[int]) -> dict[str, Any]:
        """How well the open loop kept its schedule over the measured windows."""
        start = self.window_bounds(windows[0])[0]
        end = self.window_bounds(windows[-1])[1]
        sched = np.array(self.d_sched)
        lag = np.array(self.d_lag)[(sched >= start) & (sched < end)]
        late = int((lag > self.plan.late_after_s).sum())
        frac = late / lag.size if lag.size else 0.0
        return {
            "target_rate": self.plan.rate,
            "sent_rate": stats.rate(lag.size, end - start),
            "late_after_ms": self.plan.late_after_s * 1000,
            "late_calls": late,
            "late_fraction": round(frac, 6),
            "lag_p50_ms": round(float(np.percentile(lag, 50)) * 1000, 3) if lag.size else None,
            "lag_p99_ms": round(float(np.percentile(lag, 99)) * 1000, 3) if lag.size else None,
            "lag_max_ms": round(float(lag.max()) * 1000, 3) if lag.size else None,
            "in_flight_cap_hits": self.cap_hits,
            # More than 1% of the calls left late: the client, not only the server, limited this step.
            "client_fell_behind": frac > 0.01 or self.cap_hits > 0,
        }


async def run_step(
    plan: StepPlan,
    stub: Any,
    workload: Workload,
    *,
    progress: Progress | None = None,
    on_boundary: BoundaryHook | None = None,
) -> dict[str, Any]:
    """Runs one step against `stub` (an InferenceStub on a grpc.aio channel); returns its JSON-ready figures.

    `on_boundary(k)` is awaited at each window boundary; the result's `boundaries` names the two that enclose
    the windows it reports.
    """
    if plan.mode == "closed" and plan.concurrency < 1:
        raise ValueError("closed loop needs concurrency >= 1")
    if plan.mode == "open" and not plan.rate > 0:
        raise ValueError("open loop needs a rate > 0")
    if plan.max_windows < 1 or plan.window_s <= 0 or plan.warmup_s < 0:
        raise ValueError("a step needs max_windows >= 1, window_s > 0 and warmup_s >= 0")
    return await _Step(plan, stub, workload, progress, on_boundary).run()
