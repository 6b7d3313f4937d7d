"""`recserve bench suite`: the standard benchmark of one model repository on this machine (`make bench`).

It starts its own servers (child processes), so the numbers are reproducible from one command:
the raw limit first (nothing else on the cores); lone calls interleaved between the raw model, the bare gRPC
baseline (bare.py) and the default server; the default server's closed-loop sweep and open-loop sweep at
fractions of the peak; paired rounds for the efficiency figure (a raw pass, then a window on the default
server and on one that runs one batch at a time); then a server with batching off (max_batch_size=1) at
the comparison points; last, unless turned off, the overload section (overload.py) on a fresh default
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

import grpc
import numpy as np

from recserve.benchmarks import report, stats
from recserve.benchmarks.config import OverloadSettings, SuiteConfig, settings, workload_of
from recserve.benchmarks.overload import Subject, measure_overload, overload_sections, overload_summary
from recserve.benchmarks.results import (
    Document,
    LoneCalls,
    PairedRounds,
    RawLimit,
    Round,
    Series,
    Served,
    StepResult,
    SummaryItem,
)
from recserve.benchmarks.sweep import ProgressLine, sweep
from recserve.benchmarks.targets import TargetError, check_target, connected
from recserve.benchmarks.workloads import Workload
from recserve.client import AsyncClient, ServerInfo
from recserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from recserve.benchmarks.baseline import RawModel
    from recserve.benchmarks.servers import LocalServer

EFFICIENCY_TARGET = 0.9
PADDING_TARGET = 1.15
LONE_OVERHEAD_TARGET_MS = 2.0


DEFAULT = "batching on"
# The lone calls' references: the model in this process, and a gRPC server with nothing but the model.
RAW = "raw"
BARE = "bare gRPC"
# Lone calls left out of the figures while connections and caches settle.
LONE_WARMUP_CALLS = 20
# The paired rounds' second server: the default one with --max-concurrent-batches 1.
ONE_AT_A_TIME = "one batch at a time"
BATCHING_OFF = "batching off"
# The overload section's server: the default one, started fresh so that no earlier section's load lingers.
OVERLOAD = "overload"


async def lone_calls(
    cfg: SuiteConfig, workload: Workload, model: RawModel, targets: Sequence[tuple[str, AsyncClient]]
) -> LoneCalls:
    """The lone-call overhead with the machine's drift taken out: each text goes, one call at a time, to the
    raw model in this process and to every target, in an order that rotates per text. A VM that drifts by
    +-15% from minute to minute moves a 10 ms figure by more than the 2 ms this measures; here all three see
    the same minutes. Every party stops its ORT threads spinning after a run (runtime.py), so none of them
    slows the next.
    """
    embeds = [m for m in workload.messages if isinstance(m, pb.EmbedRequest)]
    messages = embeds[: LONE_WARMUP_CALLS + cfg.singles]
    names = [RAW, *(name for name, _ in targets)]
    stubs = dict(targets)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index, message in enumerate(messages):
        turn = index % len(names)
        for name in [*names[turn:], *names[:turn]]:
            started = time.perf_counter()
            if name == RAW:
                # On this thread, blocking the loop on purpose: the calls take turns, nothing else is
                # waiting, and a hop to a worker thread would add to the reference what it is compared with.
                model.run(list(message.texts))
            else:
                try:
                    await stubs[name].stub.Embed(message, timeout=cfg.load.deadline_s)
                except grpc.aio.AioRpcError as exc:
                    failure = f"{exc.code().name} {exc.details()}"
                    raise TargetError(f"{name}: a lone call failed: {failure}") from None
            if index >= LONE_WARMUP_CALLS:
                seconds[name].append(time.perf_counter() - started)
    latency = {name: stats.latency_summary(np.array(seconds[name])) for name in names}
    raw_p50 = latency[RAW].p50
    return LoneCalls(
        calls=len(seconds[RAW]),
        latency_ms=latency,
        overhead_ms={
            name: round(p50 - raw_p50, 3)
            for name in names[1:]
            if (p50 := latency[name].p50) is not None and raw_p50 is not None
        },
    )


def lone_section(lone: LoneCalls) -> list[str]:
    rows = []
    for name, lat in lone.latency_ms.items():
        over = lone.overhead_ms.get(name)
        rows.append([name, str(lat.p50), str(lat.p90), str(lat.p99), "-" if over is None else f"{over:+}"])
    return [
        f"{lone.calls} texts of the workload, one call at a time, each to the raw model in the "
        f"benchmark's process, to `{BARE}` (a grpc.aio server that only runs the raw model in one executor "
        "hop: no validation, batcher, metrics or logs) and to the default server, in an order that rotates "
        "per text. Overhead is p50 minus the raw p50.",
        "",
        *report.md_table(["", "p50 ms", "p90 ms", "p99 ms", "overhead ms"], rows),
    ]


async def paired_rounds(
    cfg: SuiteConfig,
    workload: Workload,
    targets: Sequence[tuple[str, AsyncClient, str | None]],
    raw_pass: Callable[[], Awaitable[RawLimit]],
    progress: ProgressLine | None,
) -> PairedRounds:
    """Efficiency measured so that a drifting machine cancels out: raw and served taken minutes apart on a
    shared VM differ by +-15%, so each round runs a raw pass, then one window at the load point on every
    target (their order rotating each round), and the ratio is of the totals over all rounds.
    """
    callers = max(cfg.compare)
    plan = replace(cfg.load, max_windows=1).plan("closed", concurrency=callers, seed=cfg.workload.seed)
    rounds = []
    for index in range(cfg.rounds):
        raw = (await raw_pass()).texts_per_s
        served: dict[str, Served] = {}
        turn = index % len(targets)
        for name, client, metrics_url in [*targets[turn:], *targets[:turn]]:
            (step,) = await sweep(
                client,
                [plan],
                workload,
                metrics_url=metrics_url,
                progress=progress,
                raw_texts_per_s=raw,
                series=f"round {index + 1}, {name}",
            )
            m = step.measured
            served[name] = Served(
                texts_per_s=m.texts_per_s, latency_ms=m.latency_ms, failed=m.failed, server=step.server
            )
        rounds.append(Round(raw_texts_per_s=raw, served=served))
    raw_total = sum(r.raw_texts_per_s for r in rounds)
    names = [name for name, _, _ in targets]
    return PairedRounds(
        callers=callers,
        rounds=tuple(rounds),
        efficiency={
            name: round(sum(r.served[name].texts_per_s for r in rounds) / raw_total, 3) if raw_total else None
            for name in names
        },
    )


def paired_section(paired: PairedRounds) -> list[str]:
    names = list(paired.efficiency)
    rows = []
    for index, rnd in enumerate(paired.rounds, 1):
        raw = rnd.raw_texts_per_s
        cells = [str(index), f"{raw:.1f}"]
        for name in names:
            tps = rnd.served[name].texts_per_s
            cells.append(f"{tps:.1f} ({tps / raw:.2f})" if raw else f"{tps:.1f}")
        rows.append(cells)
    rows.append(["all", "", *(f"**{paired.efficiency[n]}**" for n in names)])
    header = ["round", "raw texts/s", *(f"{n}: texts/s (x raw)" for n in names)]
    return [
        f"Each round: one raw pass over the workload, then one window of {paired.callers} callers on each "
        "server (the order rotates), the other server idle. The last row is total served over total raw. "
        f"`{ONE_AT_A_TIME}` is the default server with `--max-concurrent-batches 1`: one batch at a time on "
        "every thread, instead of a batch that starts while another runs sharing the threads with it.",
        "",
        *report.md_table(header, rows),
    ]


def _closed_at(steps: Sequence[StepResult], callers: int) -> StepResult | None:
    return next((s for s in steps if s.mode == "closed" and s.concurrency == callers), None)


def summarise(
    cfg: SuiteConfig,
    on: Sequence[StepResult],
    off: Sequence[StepResult],
    paired: PairedRounds,
    lone: LoneCalls,
) -> dict[str, SummaryItem]:
    """The headline figures of BENCHMARKS.md, each with its target where the issues set one."""
    load_c = max(cfg.compare)
    busy = _closed_at(on, load_c)
    # The most the server delivered in any step: an open-loop step can beat every closed-loop one.
    peak = max((s.measured.calls_per_s for s in on), default=0.0)
    out: dict[str, SummaryItem] = {}
    eff = paired.efficiency[DEFAULT]
    out["efficiency"] = SummaryItem(
        title=f"Efficiency at {load_c} callers",
        value=eff,
        how=f"served texts/s with {load_c} callers, one text per call, over the raw limit's texts/s, totals "
        f"of {len(paired.rounds)} paired rounds (below)",
        target=f">= {EFFICIENCY_TARGET}",
        met=eff is not None and eff >= EFFICIENCY_TARGET,
    )
    if busy is not None:
        pad = busy.server.padding_ratio if busy.server else None
        out["padding"] = SummaryItem(
            title=f"Padding ratio at {load_c} callers",
            value=pad,
            how="padded / real tokens over the batches the server ran (its metrics)",
            target=f"<= {PADDING_TARGET}",
            met=pad is not None and pad <= PADDING_TARGET,
        )
    overhead = lone.overhead_ms.get(DEFAULT)
    if overhead is not None:
        out["lone_overhead"] = SummaryItem(
            title="Lone-call overhead",
            value=overhead,
            how=f"p50 of a lone one-text call ({lone.latency_ms[DEFAULT].p50} ms) minus the raw single "
            f"inference p50 of the same texts ({lone.latency_ms[RAW].p50} ms), interleaved (below)",
            unit=" ms",
            digits=3,
            target=f"<= {LONE_OVERHEAD_TARGET_MS} ms",
            met=overhead <= LONE_OVERHEAD_TARGET_MS,
        )
    floor = lone.overhead_ms.get(BARE)
    if floor is not None:
        out["lone_floor"] = SummaryItem(
            title="Lone-call overhead of the bare gRPC baseline",
            value=floor,
            how="the same for a grpc.aio server with nothing but the model: what gRPC, the client and thread "
            "wake-ups add before any server logic",
            unit=" ms",
            digits=3,
        )
    out["peak"] = SummaryItem(
        title="Peak throughput",
        value=peak,
        how="highest delivered calls/s of any step, closed or open loop",
        unit=" calls/s",
        digits=1,
    )
    within = [
        s
        for s in on
        if s.mode == "open"
        and s.measured.failed == 0
        and (p99 := s.measured.latency_ms.p99) is not None
        and p99 <= cfg.p99_target_ms
    ]
    best = max(within, key=lambda s: s.offered, default=None)
    out["open_rate_fraction"] = SummaryItem(
        title=f"Highest open-loop rate with p99 <= {cfg.p99_target_ms:g} ms, as a fraction of peak",
        value=round(best.offered / peak, 3) if best and peak else None,
        how=(
            f"{best.offered:g} calls/s (Poisson) kept p99 at {best.measured.latency_ms.p99} ms with no "
            f"errors; peak {peak:g} calls/s"
            if best
            else "no open-loop step met the bound"
        ),
        digits=3,
    )
    off_busy = _closed_at(off, load_c)
    if busy is not None and off_busy is not None and off_busy.measured.texts_per_s:
        out["batching_gain"] = SummaryItem(
            title=f"Batching gain at {load_c} callers",
            value=round(busy.measured.texts_per_s / off_busy.measured.texts_per_s, 2),
            how="texts/s with batching on over texts/s with max_batch_size=1",
            unit="x",
        )
    return out


def comparison_section(cfg: SuiteConfig, on: Sequence[StepResult], off: Sequence[StepResult]) -> list[str]:
    rows = []
    for callers in cfg.compare:
        a, b = _closed_at(on, callers), _closed_at(off, callers)
        if a is None or b is None:
            continue
        ma, mb = a.measured, b.measured
        gain = f"{ma.texts_per_s / mb.texts_per_s:.2f}x" if mb.texts_per_s else "-"
        rows.append(
            [
                str(callers),
                f"{ma.texts_per_s:.1f}",
                f"{mb.texts_per_s:.1f}",
                gain,
                str(ma.latency_ms.p50),
                str(mb.latency_ms.p50),
                str(ma.latency_ms.p99),
                str(mb.latency_ms.p99),
            ]
        )
    header = [
        "callers",
        "on texts/s",
        "off texts/s",
        "gain",
        "on p50 ms",
        "off p50 ms",
        "on p99 ms",
        "off p99 ms",
    ]
    return report.md_table(header, rows)


def overload_settings(cfg: SuiteConfig) -> OverloadSettings:
    """The overload section's settings: the defaults of `bench overload`, timed by the suite's steps (each
    level, the capacity window and the probe one window of --duration after --warmup)."""
    load = cfg.load
    return OverloadSettings(
        capacity_window_s=load.window_s,
        warmup_s=load.warmup_s,
        window_s=load.window_s,
        max_in_flight=load.max_in_flight,
        probe_window_s=load.window_s,
    )


async def run_suite(cfg: SuiteConfig, err: TextIO | None = None) -> int:
    """The suite after its flags were checked: returns the exit code. Raises ConfigError when the workload
    cannot be built, TargetError or ServerStartError when a server it starts cannot take the load."""
    err = err or sys.stderr
    from recserve.benchmarks.baseline import RawModel

    workload = workload_of(cfg.workload)
    progress = ProgressLine(err) if cfg.progress else None
    doc = replace(
        report.new_document("suite", cfg.command, settings(cfg)),
        workload=workload.describe(),
        reproduce_hint="`make bench` runs this suite on the default model (MODEL_REPO in the Makefile).",
    )
    if progress is not None:
        progress.finish(
            f"raw limit: {len(workload.texts)} texts, {cfg.threads} threads, {cfg.raw_repeats} passes"
        )
    model = await asyncio.to_thread(RawModel, cfg.model_repo, threads=cfg.threads, query=workload.texts[0])
    return await _measure(cfg, workload, model, doc, progress)


async def _measure(
    cfg: SuiteConfig,
    workload: Workload,
    model: RawModel,
    doc: Document,
    progress: ProgressLine | None,
) -> int:
    from recserve.benchmarks.baseline import raw_limit
    from recserve.benchmarks.servers import local_server

    async def measure_raw(repeats: int, singles: int) -> RawLimit:
        return await asyncio.to_thread(raw_limit, model, workload.texts, repeats=repeats, singles=singles)

    raw = await measure_raw(cfg.raw_repeats, cfg.singles)
    seed = cfg.workload.seed
    closed_c = sorted(set(cfg.concurrency) | set(cfg.compare))

    @contextlib.asynccontextmanager
    async def started(
        name: str, *extra: str, bare: bool = False
    ) -> AsyncIterator[tuple[LocalServer, AsyncClient, ServerInfo]]:
        """A server of this suite in a child process, with its log under out/logs, connected and checked."""
        log_path = cfg.out / "logs" / f"server-{name.replace(' ', '-')}.log"
        server = local_server(cfg.model_repo, threads=cfg.threads, log_path=log_path, extra=extra, bare=bare)
        async with server as srv, connected(srv.address) as client:
            yield srv, client, await check_target(client, srv.address)

    async def served_sweep(
        client: AsyncClient,
        metrics_url: str | None,
        series: str,
        callers: Sequence[int],
        rates: Sequence[float],
    ) -> list[StepResult]:
        """Closed-loop steps at `callers`, then open-loop (Poisson) steps at `rates`, beside the raw limit."""
        plans = [cfg.load.plan("closed", concurrency=c, seed=seed) for c in callers]
        plans += [cfg.load.plan("open", rate=r, arrival="poisson", seed=seed) for r in rates]
        return await sweep(
            client,
            plans,
            workload,
            metrics_url=metrics_url,
            progress=progress,
            raw_texts_per_s=raw.texts_per_s,
            series=series,
        )

    async with started(DEFAULT) as (srv, client, info):
        async with started(BARE, bare=True) as (_, bare_client, _):
            if progress is not None:
                progress.finish(f"lone calls: {cfg.singles} texts, each to {RAW}, {BARE} and {DEFAULT}")
            lone = await lone_calls(cfg, workload, model, [(BARE, bare_client), (DEFAULT, client)])
        on = await served_sweep(client, srv.metrics_url, DEFAULT, closed_c, ())
        peak = max(s.measured.calls_per_s for s in on)
        rates = sorted({round(f * peak, 1) for f in cfg.open_fractions if f * peak >= 0.1})
        on += await served_sweep(client, srv.metrics_url, DEFAULT, (), rates)
        on_series = Series(name=DEFAULT, target=srv.address, server=info, steps=tuple(on))
        async with started(ONE_AT_A_TIME, "--max-concurrent-batches", "1") as (one, one_client, _):
            paired = await paired_rounds(
                cfg,
                workload,
                [(DEFAULT, client, srv.metrics_url), (ONE_AT_A_TIME, one_client, one.metrics_url)],
                lambda: measure_raw(1, 1),
                progress,
            )
    async with started(BATCHING_OFF, "--max-batch-size", "1") as (srv, client, info_off):
        off = await served_sweep(client, srv.metrics_url, BATCHING_OFF, cfg.compare, ())
        off_series = Series(name=BATCHING_OFF, target=srv.address, server=info_off, steps=tuple(off))
    overload = None
    if cfg.overload:
        async with started(OVERLOAD) as (srv, client, info_over):
            subject = Subject(srv.address, client, info_over, srv.metrics_url, srv.pid)
            overload = await measure_overload(subject, workload, overload_settings(cfg), progress)
    done = replace(
        doc,
        raw=raw,
        lone=lone,
        paired=paired,
        series=(on_series, off_series),
        summary=summarise(cfg, on, off, paired, lone) | (overload_summary(overload) if overload else {}),
        sections={
            "Lone calls, interleaved": lone_section(lone),
            f"Efficiency at {paired.callers} callers, paired rounds": paired_section(paired),
            "Batching on against off": comparison_section(cfg, on, off),
            **(overload_sections(overload) if overload else {}),
        },
        overload=overload,
    )
    report.publish(done, cfg.out, cfg.markdown, cfg.p99_target_ms)
    return 0
