"""CPU per call by thread group (issue 15): what a server's threads, by role, and the load generator spend
on a call, read from /proc at the boundaries of measured windows.

The server names its threads by role (recserve/threads.py); `CpuWatch` reads every thread of a server's
process, the process's own total and this process's CPU at each window boundary of the steps it is hooked
into (sweep's `on_boundary`), and keeps the span of each step's measured windows with the OK calls
answered in it. `per_call` turns such spans into milliseconds of CPU per call by group. The suite hooks it
into the default server's paired-round windows and one window of the bare gRPC baseline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recserve import threads
from recserve.benchmarks import report
from recserve.benchmarks.loadgen import StepPlan
from recserve.benchmarks.protocols import Target
from recserve.benchmarks.results import CpuPerCall, CpuSplit, StepResult, SummaryItem
from recserve.benchmarks.sweep import ProgressLine, sweep
from recserve.benchmarks.workloads import Workload

OUTSIDE_MODEL_TARGET_MS = 0.8
MODEL = threads.GROUPS[threads.MODEL]
# Every group but the model's, in the order of the section's table; `other` also holds threads that ended.
GROUPS = (threads.LOOP, "tokenize", "grpc", threads.OTHER, "search")


@dataclass(frozen=True)
class CpuReading:
    """A server process's CPU and this process's, at one moment."""

    at: float
    """time.monotonic()."""
    threads: Mapping[int, tuple[str, float]]
    """The server's live threads: id -> (group, CPU-seconds so far), as threads.cpu_by_thread reads them."""
    process: float | None
    """The server process's CPU-seconds, threads that ended included; None when unreadable."""
    client: float
    """This process's CPU-seconds (every thread: the load generator)."""


def read(pid: int) -> CpuReading:
    return CpuReading(
        at=time.monotonic(),
        threads=threads.cpu_by_thread(pid),
        process=threads.process_cpu(pid),
        client=time.process_time(),
    )


@dataclass(frozen=True)
class CpuWindow:
    """Two readings and the OK calls answered between them."""

    before: CpuReading
    after: CpuReading
    calls: int


def per_call(windows: Sequence[CpuWindow]) -> CpuPerCall:
    """Each group's CPU-seconds over the windows, summed, over their OK calls summed (in ms): a total over a
    total, so a long window weighs more than a short one.

    A thread's share is its CPU at `after` less its CPU at `before` (all of it, for a thread born in
    between), under its group at `after`. CPU that threads which ended in between used is the process's
    total less its live threads': it counts in `other` (a model thread lives as long as the server, so it
    is never the model's). Without a process total, the live threads' sum stands for it. ValueError when the
    windows hold no OK call.
    """
    if not sum(w.calls for w in windows):
        raise ValueError("no OK call to divide by")
    seconds = {group: 0.0 for group in (*GROUPS, MODEL)}
    ended = process = client = elapsed = 0.0
    calls = 0
    for w in windows:
        live = 0.0
        for tid, (group, cpu) in w.after.threads.items():
            earlier = w.before.threads.get(tid)
            # A lower reading is a new thread that took a dead one's id.
            used = cpu - earlier[1] if earlier is not None and earlier[1] <= cpu else cpu
            seconds[group] = seconds.get(group, 0.0) + used
            live += used
        total = live
        if w.before.process is not None and w.after.process is not None:
            total = w.after.process - w.before.process
        # Clock ticks are summed per thread and for the process apart: a nil difference can read a tick low.
        ended += max(0.0, total - live)
        process += total
        client += w.after.client - w.before.client
        elapsed += w.after.at - w.before.at
        calls += w.calls
    seconds[threads.OTHER] += ended

    def ms(cpu_s: float) -> float:
        # + 0.0: float noise of a difference that is nil (ticks summed) rounds to -0.0, which reads oddly.
        return round(1000.0 * cpu_s / calls, 4) + 0.0

    def cores(cpu_s: float) -> float:
        return round(cpu_s / elapsed, 3) if elapsed > 0 else 0.0

    return CpuPerCall(
        windows=len(windows),
        calls=calls,
        seconds=round(elapsed, 3),
        calls_per_s=round(calls / elapsed, 1) if elapsed > 0 else 0.0,
        group_ms={group: ms(s) for group, s in seconds.items()},
        ended_ms=ms(ended),
        outside_model_ms=ms(process - seconds[MODEL]),
        model_ms=ms(seconds[MODEL]),
        server_cores=cores(process),
        client_cores=cores(client),
        client_ms=ms(client),
    )


def arrived(step: StepResult) -> int:
    """The OK answers that arrived inside a step's measured windows: what its throughput counts."""
    m = step.measured
    return round(m.calls_per_s * m.window_s)


class CpuWatch:
    """Reads server `pid` at each window boundary of the steps it is hooked into (`at_boundary`, a
    loadgen.BoundaryHook); `add(step)` then keeps the span of the step's measured windows.

    NOTE: the reading is synchronous, on the load generator's loop: a few dozen small /proc files, well
    under a millisecond, at a boundary, where an executor hop would blur the moment it stands for.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.windows: list[CpuWindow] = []
        self._marks: dict[int, CpuReading] = {}

    async def at_boundary(self, boundary: int) -> None:
        self._marks[boundary] = read(self.pid)

    def add(self, step: StepResult) -> None:
        first, last = step.boundaries
        before, after = self._marks.get(first), self._marks.get(last)
        self._marks = {}
        # No thread read: not Linux, or the server is gone; no figure rather than zeros.
        if before is not None and after is not None and after.threads:
            self.windows.append(CpuWindow(before, after, arrived(step)))

    def result(self) -> CpuPerCall | None:
        """None without a window read or an OK call in them: no figure rather than a zero that passes."""
        return per_call(self.windows) if sum(w.calls for w in self.windows) else None


async def measure_window(
    target: Target,
    plan: StepPlan,
    workload: Workload,
    pid: int,
    *,
    series: str,
    progress: ProgressLine | None,
) -> CpuPerCall | None:
    """One step of `plan` against `target`, its server's CPU (process `pid`) read at the window bounds."""
    watch = CpuWatch(pid)
    (step,) = await sweep(
        target,
        [plan],
        workload,
        metrics_url=None,
        progress=progress,
        series=series,
        on_boundary=watch.at_boundary,
    )
    watch.add(step)
    return watch.result()


def split(callers: int, figures: Mapping[str, CpuPerCall | None]) -> CpuSplit:
    """The targets whose CPU per call was read (None: it was not)."""
    return CpuSplit(callers=callers, targets={name: f for name, f in figures.items() if f is not None})


def _ms(value: float) -> str:
    return f"{value:.3f}"


def cpu_summary(split: CpuSplit, server: str, floor: str) -> dict[str, SummaryItem]:
    """The issue's target on `server`'s CPU per call outside the model, and `floor`'s figure beside it."""
    out: dict[str, SummaryItem] = {}
    ours = split.targets.get(server)
    if ours is not None:
        groups = ", ".join(f"{g} {_ms(ours.group_ms[g])}" for g in GROUPS)
        out["cpu_outside_model"] = SummaryItem(
            title=f"CPU per call outside the model at {split.callers} callers",
            value=ours.outside_model_ms,
            unit=" ms",
            digits=3,
            target=f"<= {OUTSIDE_MODEL_TARGET_MS} ms",
            met=ours.outside_model_ms <= OUTSIDE_MODEL_TARGET_MS,
            how=f"CPU-seconds of every server thread but the model's over the OK calls, windows of the "
            f"paired rounds ({ours.windows}): {groups} ms; the model {_ms(ours.model_ms)} ms; the load "
            f"generator used {ours.client_cores} cores ({_ms(ours.client_ms)} ms per call) beside it (below)",
        )
    bare = split.targets.get(floor)
    if bare is not None:
        out["cpu_outside_model_floor"] = SummaryItem(
            title=f"CPU per call outside the model of the bare gRPC baseline at {split.callers} callers",
            value=bare.outside_model_ms,
            unit=" ms",
            digits=3,
            how="the same for a grpc.aio server with nothing but the model, one window: the floor of the "
            f"transport itself (its tokenizer runs on its model thread); the load generator used "
            f"{bare.client_cores} cores",
        )
    return out


def cpu_section(split: CpuSplit) -> list[str]:
    rows = [
        [
            name,
            str(c.windows),
            f"{c.calls_per_s:.1f}",
            *(_ms(c.group_ms[g]) for g in GROUPS),
            f"**{_ms(c.outside_model_ms)}**",
            _ms(c.model_ms),
            f"{c.server_cores:.2f}",
            f"{c.client_cores:.2f}",
            _ms(c.client_ms),
        ]
        for name, c in split.targets.items()
    ]
    header = [
        "",
        "windows",
        "calls/s",
        *(f"{g} ms" for g in GROUPS),
        "outside the model ms",
        "model ms",
        "server cores",
        "load generator cores",
        "load generator ms",
    ]
    return [
        f"Milliseconds of CPU (user + system, from /proc) per OK call at {split.callers} closed-loop "
        "callers, one text a call, by the role of the server's threads: the default server over its "
        "windows of the paired rounds, the bare gRPC baseline over one window of its own. Roles "
        "(recserve/threads.py): `loop` the main thread, which runs the event loop; the others by native "
        "thread name: `tokenize` the tokenizer threads (rs-tokenize), `model` the model's threads and ONNX "
        "Runtime's pool, which inherits their name (rs-model), `search` catalog search (rs-search), `grpc` "
        "gRPC's poller (grpc-poller) and its C++ threads (event_engine, grpc_*, lifeguard); `other` the "
        "rest (the metrics server's) and the threads that ended within the windows (the process's total "
        "less its live threads'). Outside the model is the whole process less the model's threads. The "
        "bare baseline tokenises on its model thread, so its outside-the-model figure is the floor of the "
        "transport itself (gRPC, protobuf, the event loop): compare it with the default server's less its "
        "tokenize column. The load generator (the benchmark's own process, every thread) shares the cores "
        "with the server: its CPU over the same spans, in cores and per call.",
        "",
        *report.md_table(header, rows),
    ]
