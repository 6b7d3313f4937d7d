"""`recserve bench soak` (`make bench-soak`, not CI): a long open loop below capacity with the mixed
workload, and what it leaves behind in the server process.

The capacity is measured first (a closed loop of 64 callers on the same mixed workload, or `--capacity`);
then one open-loop step (Poisson) at `--fraction` of it runs for `--minutes`, cut into windows of
`--window` seconds that all run (no stop once stable). Reported: the server's RSS, open file descriptors
and threads before and after (and at every window boundary), and the latency of the first window against
the last one (the drift). Written as JSON and Markdown to `--out`, never to BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TextIO

from recserve.benchmarks import report
from recserve.benchmarks.config import SoakConfig, settings, workload_of
from recserve.benchmarks.loadgen import LoadSettings, run_step
from recserve.benchmarks.overload import Subject, inconsistent, measure_capacity, open_subject
from recserve.benchmarks.process import read_process
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import Drift, Figures, ProcessSample, SoakResult, SummaryItem
from recserve.benchmarks.sweep import ProgressLine
from recserve.benchmarks.workloads import Workload


def _minus(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or b is None else round(a - b, digits)


def _change(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def drift(first: Figures, last: Figures) -> Drift:
    a, b = first.latency_ms, last.latency_ms
    return Drift(
        first_p50_ms=a.p50,
        first_p99_ms=a.p99,
        last_p50_ms=b.p50,
        last_p99_ms=b.p99,
        p50_ms=_minus(b.p50, a.p50),
        p99_ms=_minus(b.p99, a.p99),
    )


async def soak(
    subject: Subject, workload: Workload, cfg: SoakConfig, progress: ProgressLine | None
) -> SoakResult:
    capacity = await measure_capacity(
        subject,
        workload,
        given=cfg.capacity_per_s,
        callers=cfg.capacity_callers,
        warmup_s=cfg.warmup_s,
        window_s=cfg.capacity_window_s,
        max_in_flight=cfg.max_in_flight,
        progress=progress,
        what=f"the mixed workload ({workload.spec.rpc})",
    )
    rate = float(f"{cfg.fraction * capacity.calls_per_s:.6g}")
    seconds = cfg.warmup_s + cfg.windows * cfg.window_s
    load = LoadSettings(
        warmup_s=cfg.warmup_s,
        window_s=cfg.window_s,
        max_windows=cfg.windows,
        deadline_s=cfg.deadline_s,
        max_in_flight=cfg.max_in_flight,
        # Never the bound of a soak: twice the calls the schedule holds.
        max_calls=max(1_000_000, int(2 * rate * seconds)),
    )
    plan = replace(load.plan("open", rate=rate, arrival="poisson", seed=workload.spec.seed), all_windows=True)
    samples: list[ProcessSample] = []

    async def at_boundary(boundary: int) -> None:
        samples.append(read_process(subject.pid))

    if progress is not None:
        progress.finish(
            f"soak: {rate:g} calls/s ({cfg.fraction:g} of {capacity.calls_per_s:g}) for {cfg.windows} "
            f"windows of {cfg.window_s:g} s"
        )
    before = read_process(subject.pid)
    target = as_target(subject.client)
    step = await run_step(plan, target, workload, progress=progress, on_boundary=at_boundary)
    after = read_process(subject.pid)
    windows = step.window_figures
    assert windows, "a soak step keeps its windows"
    return SoakResult(
        fraction=cfg.fraction,
        capacity=capacity,
        rate_per_s=rate,
        window_s=cfg.window_s,
        windows=len(windows),
        before=before,
        after=after,
        samples=tuple(samples),
        rss_growth_mib=_minus(after.rss_mib, before.rss_mib, 1),
        fds_change=_change(before.open_fds, after.open_fds),
        threads_change=_change(before.threads, after.threads),
        first=windows[0],
        last=windows[-1],
        drift=drift(windows[0], windows[-1]),
        step=step,
    )


def soak_summary(result: SoakResult) -> dict[str, SummaryItem]:
    """The soak's headline figures; the issue sets no targets for them."""
    b, a, d = result.before, result.after, result.drift
    unknown = " (unknown: no /proc readings of the server)" if b.pid is None else ""
    return {
        "soak_rss_growth": SummaryItem(
            title="Soak: RSS growth",
            value=result.rss_growth_mib,
            how=f"VmRSS after minus before: {b.rss_mib} -> {a.rss_mib} MiB{unknown}",
            unit=" MiB",
            digits=1,
        ),
        "soak_fds_change": SummaryItem(
            title="Soak: open file descriptors, change",
            value=result.fds_change,
            how=f"entries of /proc/PID/fd: {b.open_fds} -> {a.open_fds}{unknown}",
            digits=0,
        ),
        "soak_threads_change": SummaryItem(
            title="Soak: threads, change",
            value=result.threads_change,
            how=f"Threads of /proc/PID/status: {b.threads} -> {a.threads}{unknown}",
            digits=0,
        ),
        "soak_p99_drift": SummaryItem(
            title="Soak: p99 drift, last window minus first",
            value=d.p99_ms,
            how=f"p99 {d.first_p99_ms} -> {d.last_p99_ms} ms; p50 {d.first_p50_ms} -> {d.last_p50_ms} ms "
            f"(windows of {result.window_s:g} s)",
            unit=" ms",
            digits=1,
        ),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def soak_lines(result: SoakResult, cfg: SoakConfig) -> list[str]:
    b, a = result.before, result.after
    process = [
        ["RSS MiB", _fmt(b.rss_mib), _fmt(a.rss_mib), _fmt(result.rss_growth_mib)],
        ["open file descriptors", _int(b.open_fds), _int(a.open_fds), _int(result.fds_change)],
        ["threads", _int(b.threads), _int(a.threads), _int(result.threads_change)],
    ]
    rows = []
    step_windows = result.step.window_figures or ()
    for k, fig in enumerate(step_windows):
        # samples[0] is taken as the first window opens, samples[k + 1] as window k closes.
        rss = result.samples[k + 1].rss_mib if k + 1 < len(result.samples) else None
        lat = fig.latency_ms
        rows.append(
            [
                str(k + 1),
                str(fig.sent),
                str(fig.completed),
                str(fig.failed),
                f"{fig.calls_per_s:.1f}",
                _fmt(lat.p50),
                _fmt(lat.p99),
                _fmt(rss),
            ]
        )
    d = result.drift
    cap = result.capacity
    return [
        f"Open loop (Poisson) at {result.fraction:g} of the capacity ({cap.calls_per_s:g} calls/s: "
        f"{cap.how}): **{result.rate_per_s:g} calls/s** of the mixed workload (RPC mix "
        f"{dict(cfg.workload.rpc)}) for {result.windows} windows of {result.window_s:g} s after "
        f"{cfg.warmup_s:g} s of warm-up, every call with a {cfg.deadline_s:g} s deadline. Before: just "
        "before the load; after: once its last calls were answered.",
        "",
        *report.md_table(["server process", "before", "after", "change"], process),
        "",
        f"Drift, last window minus first: p50 {_fmt(d.p50_ms)} ms ({_fmt(d.first_p50_ms)} -> "
        f"{_fmt(d.last_p50_ms)}), p99 {_fmt(d.p99_ms)} ms ({_fmt(d.first_p99_ms)} -> {_fmt(d.last_p99_ms)}).",
        "",
        *report.md_table(
            ["window", "sent", "ok", "failed", "calls/s", "p50 ms", "p99 ms", "RSS MiB at its end"], rows
        ),
    ]


async def run_soak(cfg: SoakConfig, err: TextIO | None = None) -> int:
    """`bench soak` after its flags were checked: returns the exit code. Raises ConfigError when the
    workload cannot be built, TargetError or ServerStartError when the target cannot take the load."""
    err = err or sys.stderr
    from recserve.benchmarks.targets import check_workload_fits

    workload = workload_of(cfg.workload)
    progress = ProgressLine(err) if cfg.progress else None
    notes: list[str] = []
    doc = report.new_document("soak", cfg.command, settings(cfg))
    async with open_subject(cfg.server, cfg.out / "logs" / "server.log", notes) as subject:
        check_workload_fits(cfg.workload, subject.info, subject.address)
        result = await soak(subject, workload, cfg, progress)
    done = replace(
        doc,
        workload=workload.describe(),
        summary=soak_summary(result),
        sections={"Soak": soak_lines(result, cfg)},
        soak=result,
        notes=tuple(notes),
    )
    report.publish(done, cfg.out, None)
    steps = [result.step] + ([result.capacity.step] if result.capacity.step is not None else [])
    return inconsistent(steps, err)
