"""`recserve bench suite`: the standard benchmark of one model repository on this machine (`make bench`).

It starts its own servers (child processes), so the numbers are reproducible from one command:
the raw limit first (nothing else on the cores); lone calls interleaved between the raw model, the bare gRPC
baseline (bare.py) and the default server; the default server's closed-loop sweep and open-loop sweep at
fractions of the peak; paired rounds for the efficiency figure (a raw pass, then a window on the default
server and on one that runs one batch at a time); then a server with batching off (max_batch_size=1) at
the comparison points.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc
import numpy as np

from recserve.benchmarks import report, stats
from recserve.benchmarks.loadgen import LoadSettings
from recserve.benchmarks.runner import (
    EXIT_TARGET,
    EXIT_USAGE,
    ProgressLine,
    TargetError,
    check_target,
    connected,
    load_workload,
    series_entry,
    sweep,
)
from recserve.benchmarks.workloads import Workload, WorkloadSpec
from recserve.client import AsyncClient, ServerInfo
from recserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from recserve.benchmarks.baseline import RawModel
    from recserve.benchmarks.servers import LocalServer

EFFICIENCY_TARGET = 0.9
PADDING_TARGET = 1.15
LONE_OVERHEAD_TARGET_MS = 2.0


@dataclass(frozen=True)
class SuiteConfig:
    model_repo: Path
    out: Path
    markdown: Path
    threads: int
    load: LoadSettings
    workload: WorkloadSpec
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1)
    compare: tuple[int, ...] = (1, 64)
    raw_repeats: int = 3
    rounds: int = 6
    singles: int = 200
    p99_target_ms: float = 100.0
    progress: bool = True
    command: str = ""


DEFAULT = "batching on"
# The lone calls' references: the model in this process, and a gRPC server with nothing but the model.
RAW = "raw"
BARE = "bare gRPC"
# Lone calls left out of the figures while connections and caches settle.
LONE_WARMUP_CALLS = 20
# The paired rounds' second server: the default one with --max-concurrent-batches 1.
ONE_AT_A_TIME = "one batch at a time"


async def lone_calls(
    cfg: SuiteConfig, workload: Workload, model: RawModel, targets: Sequence[tuple[str, AsyncClient]]
) -> dict[str, Any]:
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
    raw_p50 = latency[RAW]["p50"]
    return {
        "calls": len(seconds[RAW]),
        "latency_ms": latency,
        "overhead_ms": {
            name: round(p50 - raw_p50, 3)
            for name in names[1:]
            if (p50 := latency[name]["p50"]) is not None and raw_p50 is not None
        },
    }


def lone_section(lone: dict[str, Any]) -> list[str]:
    rows = []
    for name, lat in lone["latency_ms"].items():
        over = lone["overhead_ms"].get(name)
        rows.append(
            [name, str(lat["p50"]), str(lat["p90"]), str(lat["p99"]), "-" if over is None else f"{over:+}"]
        )
    return [
        f"{lone['calls']} texts of the workload, one call at a time, each to the raw model in the "
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
    raw_pass: Callable[[], Awaitable[dict[str, Any]]],
    progress: ProgressLine | None,
) -> dict[str, Any]:
    """Efficiency measured so that a drifting machine cancels out: raw and served taken minutes apart on a
    shared VM differ by +-15%, so each round runs a raw pass, then one window at the load point on every
    target (their order rotating each round), and the ratio is of the totals over all rounds.
    """
    callers = max(cfg.compare)
    plan = replace(cfg.load, max_windows=1).plan("closed", concurrency=callers, seed=cfg.workload.seed)
    rounds = []
    for index in range(cfg.rounds):
        raw = (await raw_pass())["texts_per_s"]
        served: dict[str, dict[str, Any]] = {}
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
            served[name] = {
                "texts_per_s": step["texts_per_s"],
                "latency_ms": step["latency_ms"],
                "failed": step["failed"],
                "server": step.get("server"),
            }
        rounds.append({"raw_texts_per_s": raw, "served": served})
    raw_total = sum(r["raw_texts_per_s"] for r in rounds)
    names = [name for name, _, _ in targets]
    return {
        "callers": callers,
        "rounds": rounds,
        "efficiency": {
            name: round(sum(r["served"][name]["texts_per_s"] for r in rounds) / raw_total, 3)
            if raw_total
            else None
            for name in names
        },
    }


def paired_section(paired: dict[str, Any]) -> list[str]:
    names = list(paired["efficiency"])
    rows = []
    for index, rnd in enumerate(paired["rounds"], 1):
        raw = rnd["raw_texts_per_s"]
        cells = [str(index), f"{raw:.1f}"]
        for name in names:
            tps = rnd["served"][name]["texts_per_s"]
            cells.append(f"{tps:.1f} ({tps / raw:.2f})" if raw else f"{tps:.1f}")
        rows.append(cells)
    rows.append(["all", "", *(f"**{paired['efficiency'][n]}**" for n in names)])
    header = ["round", "raw texts/s", *(f"{n}: texts/s (x raw)" for n in names)]
    return [
        f"Each round: one raw pass over the workload, then one window of {paired['callers']} callers on each "
        "server (the order rotates), the other server idle. The last row is total served over total raw. "
        f"`{ONE_AT_A_TIME}` is the default server with `--max-concurrent-batches 1`: one batch at a time on "
        "every thread, instead of a batch that starts while another runs sharing the threads with it.",
        "",
        *report.md_table(header, rows),
    ]


def _closed_at(steps: list[dict[str, Any]], callers: int) -> dict[str, Any] | None:
    return next((s for s in steps if s["mode"] == "closed" and s["concurrency"] == callers), None)


def _item(title: str, value: float | None, how: str, **kw: Any) -> dict[str, Any]:
    return {"title": title, "value": value, "how": how, **kw}


def summarise(
    cfg: SuiteConfig,
    on: list[dict[str, Any]],
    off: list[dict[str, Any]],
    paired: dict[str, Any],
    lone: dict[str, Any],
) -> dict[str, Any]:
    """The headline figures of BENCHMARKS.md, each with its target where the issues set one."""
    load_c = max(cfg.compare)
    busy = _closed_at(on, load_c)
    # The most the server delivered in any step: an open-loop step can beat every closed-loop one.
    peak = max((s["calls_per_s"] for s in on), default=0.0)
    out: dict[str, Any] = {}
    eff = paired["efficiency"][DEFAULT]
    out["efficiency"] = _item(
        f"Efficiency at {load_c} callers",
        eff,
        f"served texts/s with {load_c} callers, one text per call, over the raw limit's texts/s, totals of "
        f"{len(paired['rounds'])} paired rounds (below)",
        target=f">= {EFFICIENCY_TARGET}",
        met=eff is not None and eff >= EFFICIENCY_TARGET,
    )
    if busy is not None:
        pad = (busy.get("server") or {}).get("padding_ratio")
        out["padding"] = _item(
            f"Padding ratio at {load_c} callers",
            pad,
            "padded / real tokens over the batches the server ran (its metrics)",
            target=f"<= {PADDING_TARGET}",
            met=pad is not None and pad <= PADDING_TARGET,
        )
    overhead = lone["overhead_ms"].get(DEFAULT)
    if overhead is not None:
        out["lone_overhead"] = _item(
            "Lone-call overhead",
            overhead,
            f"p50 of a lone one-text call ({lone['latency_ms'][DEFAULT]['p50']} ms) minus the raw single "
            f"inference p50 of the same texts ({lone['latency_ms'][RAW]['p50']} ms), interleaved (below)",
            unit=" ms",
            digits=3,
            target=f"<= {LONE_OVERHEAD_TARGET_MS} ms",
            met=overhead <= LONE_OVERHEAD_TARGET_MS,
        )
    floor = lone["overhead_ms"].get(BARE)
    if floor is not None:
        out["lone_floor"] = _item(
            "Lone-call overhead of the bare gRPC baseline",
            floor,
            "the same for a grpc.aio server with nothing but the model: what gRPC, the client and thread "
            "wake-ups add before any server logic",
            unit=" ms",
            digits=3,
        )
    out["peak"] = _item(
        "Peak throughput",
        peak,
        "highest delivered calls/s of any step, closed or open loop",
        unit=" calls/s",
        digits=1,
    )
    within = [
        s
        for s in on
        if s["mode"] == "open"
        and s["failed"] == 0
        and s["latency_ms"]["p99"] is not None
        and s["latency_ms"]["p99"] <= cfg.p99_target_ms
    ]
    best = max(within, key=lambda s: s["rate"], default=None)
    out["open_rate_fraction"] = _item(
        f"Highest open-loop rate with p99 <= {cfg.p99_target_ms:g} ms, as a fraction of peak",
        round(best["rate"] / peak, 3) if best and peak else None,
        (
            f"{best['rate']:g} calls/s (Poisson) kept p99 at {best['latency_ms']['p99']} ms with no errors; "
            f"peak {peak:g} calls/s"
            if best
            else "no open-loop step met the bound"
        ),
        digits=3,
    )
    off_busy = _closed_at(off, load_c)
    if busy is not None and off_busy is not None and off_busy["texts_per_s"]:
        out["batching_gain"] = _item(
            f"Batching gain at {load_c} callers",
            round(busy["texts_per_s"] / off_busy["texts_per_s"], 2),
            "texts/s with batching on over texts/s with max_batch_size=1",
            unit="x",
        )
    return out


def comparison_section(cfg: SuiteConfig, on: list[dict[str, Any]], off: list[dict[str, Any]]) -> list[str]:
    rows = []
    for callers in cfg.compare:
        a, b = _closed_at(on, callers), _closed_at(off, callers)
        if a is None or b is None:
            continue
        gain = f"{a['texts_per_s'] / b['texts_per_s']:.2f}x" if b["texts_per_s"] else "-"
        rows.append(
            [
                str(callers),
                f"{a['texts_per_s']:.1f}",
                f"{b['texts_per_s']:.1f}",
                gain,
                str(a["latency_ms"]["p50"]),
                str(b["latency_ms"]["p50"]),
                str(a["latency_ms"]["p99"]),
                str(b["latency_ms"]["p99"]),
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


async def run_suite(cfg: SuiteConfig, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    from recserve.benchmarks.baseline import RawModel

    workload = load_workload(cfg.workload, err)
    if workload is None:
        return EXIT_USAGE
    progress = ProgressLine(err) if cfg.progress else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    doc = report.new_document("suite", cfg.command, settings)
    doc["workload"] = workload.describe()
    doc["reproduce_hint"] = "`make bench` runs this suite on the default model (MODEL_REPO in the Makefile)."
    if progress is not None:
        progress.finish(
            f"raw limit: {len(workload.texts)} texts, {cfg.threads} threads, {cfg.raw_repeats} passes"
        )
    model = await asyncio.to_thread(RawModel, cfg.model_repo, threads=cfg.threads, query=workload.texts[0])
    try:
        return await _measure(cfg, workload, model, doc, progress, err)
    finally:
        model.close()


async def _measure(
    cfg: SuiteConfig,
    workload: Workload,
    model: RawModel,
    doc: dict[str, Any],
    progress: ProgressLine | None,
    err: TextIO,
) -> int:
    from recserve.benchmarks.baseline import raw_limit
    from recserve.benchmarks.servers import ServerStartError, local_server

    def measure_raw(repeats: int, singles: int) -> Awaitable[dict[str, Any]]:
        return asyncio.to_thread(raw_limit, model, workload.texts, repeats=repeats, singles=singles)

    raw = doc["raw"] = await measure_raw(cfg.raw_repeats, cfg.singles)
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

    try:
        async with started(DEFAULT) as (srv, client, info):
            async with started(BARE, bare=True) as (_, bare_client, _):
                if progress is not None:
                    progress.finish(f"lone calls: {cfg.singles} texts, each to {RAW}, {BARE} and {DEFAULT}")
                lone = doc["lone"] = await lone_calls(
                    cfg, workload, model, [(BARE, bare_client), (DEFAULT, client)]
                )
            kw: dict[str, Any] = {
                "metrics_url": srv.metrics_url,
                "progress": progress,
                "raw_texts_per_s": raw["texts_per_s"],
                "series": DEFAULT,
            }
            on = await sweep(
                client, [cfg.load.plan("closed", concurrency=c, seed=seed) for c in closed_c], workload, **kw
            )
            peak = max(s["calls_per_s"] for s in on)
            rates = sorted({round(f * peak, 1) for f in cfg.open_fractions if f * peak >= 0.1})
            on += await sweep(
                client,
                [cfg.load.plan("open", rate=r, arrival="poisson", seed=seed) for r in rates],
                workload,
                **kw,
            )
            doc["series"].append(series_entry(DEFAULT, srv.address, info, on))
            async with started(ONE_AT_A_TIME, "--max-concurrent-batches", "1") as (one, one_client, _):
                paired = doc["paired"] = await paired_rounds(
                    cfg,
                    workload,
                    [(DEFAULT, client, srv.metrics_url), (ONE_AT_A_TIME, one_client, one.metrics_url)],
                    lambda: measure_raw(1, 1),
                    progress,
                )
        async with started("batching off", "--max-batch-size", "1") as (srv, client, info_off):
            kw.update(metrics_url=srv.metrics_url, series="batching off")
            off = await sweep(
                client,
                [cfg.load.plan("closed", concurrency=c, seed=seed) for c in cfg.compare],
                workload,
                **kw,
            )
            doc["series"].append(series_entry("batching off", srv.address, info_off, off))
    except (TargetError, ServerStartError) as exc:
        print(f"recserve bench: {exc}", file=err)
        return EXIT_TARGET
    doc["summary"] = summarise(cfg, on, off, paired, lone)
    doc["sections"] = {
        "Lone calls, interleaved": lone_section(lone),
        f"Efficiency at {paired['callers']} callers, paired rounds": paired_section(paired),
        "Batching on against off": comparison_section(cfg, on, off),
    }
    paths = report.write_all(doc, cfg.out, cfg.markdown, cfg.p99_target_ms)
    report.print_tables(doc)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
