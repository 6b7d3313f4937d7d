"""A sweep: the steps run in order against one target, each with the server's view and its raw-limit ratio."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

from recserve.benchmarks.loadgen import BoundaryHook, StepPlan, run_step
from recserve.benchmarks.protocols import Target
from recserve.benchmarks.results import StepResult
from recserve.benchmarks.scrape import ScrapeError, Snapshot, fetch_async, server_view
from recserve.benchmarks.workloads import Workload


class ProgressLine:
    """The live progress line: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last = -math.inf

    def __call__(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            return
        now = asyncio.get_running_loop().time()
        if now - self._last >= self.every_s:
            self._last = now
            print(line, file=self.stream, flush=True)

    def finish(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(line, file=self.stream, flush=True)


async def sweep(
    target: Target,
    plans: Sequence[StepPlan],
    workload: Workload,
    *,
    metrics_url: str | None,
    progress: ProgressLine | None,
    raw_texts_per_s: float | None = None,
    series: str = "",
    on_boundary: BoundaryHook | None = None,
) -> list[StepResult]:
    """Runs the steps in order against one target; each step gets the server's view (when `metrics_url`
    names a recserve server's metrics) and the raw ratio. `on_boundary` is awaited at each window
    boundary of every step too, before the scrape (cpu.CpuWatch reads /proc there)."""
    results = []
    for plan in plans:
        snaps: dict[int, Snapshot] = {}
        hook = _then(on_boundary, None if metrics_url is None else _scraper(metrics_url, snaps))
        step = await run_step(plan, target, workload, progress=progress, on_boundary=hook)
        first, last = step.boundaries
        if first in snaps and last in snaps:
            step = replace(step, server=server_view(snaps[first], snaps[last]))
        if raw_texts_per_s:
            step = replace(step, ratio_to_raw=round(step.measured.texts_per_s / raw_texts_per_s, 4))
        results.append(step)
        if progress is not None:
            m = step.measured
            progress.finish(
                f"{series + ': ' if series else ''}{step.label}: {m.calls_per_s:.1f} calls/s, "
                f"{m.texts_per_s:.1f} texts/s, p50 {m.latency_ms.p50} ms, p99 {m.latency_ms.p99} ms, "
                f"{m.failed} failed of {m.sent}"
            )
    return results


def _scraper(url: str, into: dict[int, Snapshot]) -> BoundaryHook:
    async def hook(boundary: int) -> None:
        with contextlib.suppress(ScrapeError):  # a missed scrape loses the server view, not the step
            into[boundary] = await fetch_async(url)

    return hook


def _then(first: BoundaryHook | None, then: BoundaryHook | None) -> BoundaryHook | None:
    if first is None or then is None:
        return first or then

    async def hook(boundary: int) -> None:
        await first(boundary)
        await then(boundary)

    return hook
