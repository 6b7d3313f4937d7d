"""`recserve bench fleet` (`make bench-fleet`): local replicas behind one round-robin client, and the backlog
gauge of one replica under a load step, with when an HPA would have scaled.

1. Replicas: 1, 2, ... N local `recserve serve` processes of `--model-repo`, added one at a time; for each
   count a closed loop (64 callers, one text a call) through one client whose target lists them all
   (`recserve.client`: round robin, retries, health checking). Reported: aggregate texts/s, each replica's
   calls (its own metrics) and CPU (/proc/PID/stat), and the load generator's CPU. On one machine the
   replicas share its cores, so the aggregate cannot scale; the per-core rate feeds a paper model of a bigger
   node, given as computed rows.
2. Load step on one replica: idle, an open loop (Poisson) at `--level` x its capacity measured in 1., idle
   again, with recserve_backlog_seconds scraped every `--scrape-every` seconds; then a model of the shipped
   HPA (deploy/base/hpa.yaml, the ServiceMonitor's scrape interval, the adapter's averaging window) over
   every phase of scrapes and syncs: how long after the step it would have scaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from recserve import threads
from recserve.benchmarks import report
from recserve.benchmarks.config import workload_of
from recserve.benchmarks.loadgen import LoadSettings, run_step
from recserve.benchmarks.overload import inconsistent
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import (
    BacklogSample,
    FleetResult,
    FleetStep,
    HpaSettings,
    HpaVerdict,
    LoadStep,
    ModelRow,
    ReplicaShare,
    ScalePolicy,
    SummaryItem,
    to_json,
)
from recserve.benchmarks.scrape import ScrapeError, Snapshot, fetch_async
from recserve.benchmarks.servers import LocalServer, local_server
from recserve.benchmarks.sweep import ProgressLine
from recserve.benchmarks.targets import TargetError, check_target, check_workload_fits
from recserve.benchmarks.workloads import Workload, WorkloadSpec
from recserve.client import AsyncClient
from recserve.server.metrics import Name, total

# The closed loop's calls may queue behind 63 others on a shared machine: only a broken server misses it.
CLOSED_DEADLINE_S = 30.0
# Kubernetes' defaults where the manifests say nothing (kube-controller-manager flags; HPA v2 behaviour).
DEFAULT_SYNC_PERIOD_S = 15.0
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCRAPE_INTERVAL_S = 30.0
ASSUMED_TARGET_S = 0.05
DEFAULT_SCALE_UP = (
    ScalePolicy(kind="Percent", value=100, period_s=15),
    ScalePolicy(kind="Pods", value=4, period_s=15),
)
# The phases of scrapes and syncs are unknown: the model tries every one on a grid of this step.
PHASE_STEP_S = 0.5
HPA_FILE = Path("base/hpa.yaml")
SERVICE_MONITOR_FILE = Path("components/monitoring/servicemonitor.yaml")
ADAPTER_FILE = Path("prometheus-adapter/values.yaml")


@dataclass(frozen=True)
class FleetConfig:
    """What `bench fleet` was asked to do, once its flags are checked (flags.fleet_config)."""

    model_repo: Path
    replicas: int
    callers: int
    threads: int
    warmup_s: float
    window_s: float
    level: float
    idle_s: float
    load_s: float
    step_deadline_s: float
    scrape_every_s: float
    deploy_dir: Path
    sync_period_s: float
    model_cores: tuple[int, ...]
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    out: Path = Path("bench-out/fleet")
    markdown: Path | None = None
    progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class _Mark:
    at: float
    cpu: tuple[float | None, ...]
    client_cpu: float
    snaps: tuple[Snapshot | None, ...]


async def _mark(servers: Sequence[LocalServer]) -> _Mark:
    loop = asyncio.get_running_loop()
    cpu = tuple(None if s.pid is None else threads.process_cpu(s.pid) for s in servers)
    at, client_cpu = loop.time(), time.process_time()

    async def snap(url: str | None) -> Snapshot | None:
        if url is None:
            return None
        try:
            return await fetch_async(url)
        except ScrapeError:
            return None

    snaps = await asyncio.gather(*(snap(s.metrics_url) for s in servers))
    return _Mark(at, cpu, client_cpu, tuple(snaps))


def _ok_embeds(snap: Snapshot | None) -> float | None:
    return None if snap is None else snap.total(total(Name.REQUESTS), rpc="Embed", code="OK")


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- 1. replicas behind one client -----------------------------------------------------------------------


async def measure_replicas(
    servers: Sequence[LocalServer],
    workload: Workload,
    cfg: FleetConfig,
    start_s: float,
    progress: ProgressLine | None,
) -> FleetStep:
    """One closed-loop window through one client over every server in `servers`."""
    load = LoadSettings(
        warmup_s=cfg.warmup_s, window_s=cfg.window_s, max_windows=1, deadline_s=CLOSED_DEADLINE_S
    )
    plan = load.plan("closed", concurrency=cfg.callers, seed=workload.spec.seed)
    marks: dict[int, _Mark] = {}

    async def at_boundary(k: int) -> None:
        marks[k] = await _mark(servers)

    name = f"{len(servers)} replica(s)"
    async with AsyncClient([s.address for s in servers], deadline=CLOSED_DEADLINE_S) as client:
        info = await check_target(client, name)
        check_workload_fits(workload.spec, info, name)
        step = await run_step(plan, as_target(client), workload, progress=progress, on_boundary=at_boundary)
    first, last = step.boundaries
    a, b = marks[first], marks[last]
    seconds = max(b.at - a.at, 1e-9)
    shares = []
    for i, srv in enumerate(servers):
        calls = _minus(_ok_embeds(b.snaps[i]), _ok_embeds(a.snaps[i]))
        cpu = _minus(b.cpu[i], a.cpu[i])
        shares.append(
            ReplicaShare(
                address=srv.address,
                pid=srv.pid,
                ok_calls=None if calls is None else round(calls),
                cpu_cores=None if cpu is None else round(cpu / seconds, 3),
            )
        )
    cores = [s.cpu_cores for s in shares]
    result = FleetStep(
        replicas=len(servers),
        texts_per_s=step.measured.texts_per_s,
        server_cores=None if None in cores else round(sum(c or 0.0 for c in cores), 3),
        client_cores=round((b.client_cpu - a.client_cpu) / seconds, 3),
        shares=tuple(shares),
        start_s=round(start_s, 2),
        step=step,
    )
    if progress is not None:
        m = step.measured
        progress.finish(
            f"{name}: {m.texts_per_s:.1f} texts/s, p99 {m.latency_ms.p99} ms, {m.failed} failed of {m.sent}; "
            f"calls per replica {[s.ok_calls for s in shares]}, cores {cores}, client {result.client_cores}"
        )
    return result


def paper_model(
    steps: Sequence[FleetStep], cores: Sequence[int]
) -> tuple[float | None, tuple[ModelRow, ...]]:
    """One replica's texts/s per core it used here, times the cores of bigger nodes; and the GPU row."""
    one = steps[0]
    used = one.shares[0].cpu_cores if one.shares else None
    per_core = round(one.texts_per_s / used, 1) if used else None
    rows = []
    for n in cores:
        rows.append(
            ModelRow(
                node=f"CPU node, {n} cores",
                cores=n,
                texts_per_s=None if per_core is None else round(per_core * n, 1),
                how=f"model: {per_core} texts/s per core x {n} cores, i.e. replicas side by side, each on "
                "cores of its own, every core as fast as here and nothing else on the node (the callers "
                "elsewhere); an upper bound, not measured",
            )
        )
    rows.append(
        ModelRow(
            node="GPU node",
            cores=None,
            texts_per_s=None,
            how="not measured here (no GPU on this machine). Decided by the GPU's texts/s in batches (the "
            "raw limit of `recserve bench suite` on that node) and, since tokenising, batching and gRPC stay "
            "on the CPU, by the node's cores over the CPU seconds each text costs outside the model; the "
            "lower of the two bounds a replica",
        )
    )
    return per_core, tuple(rows)


# --- 2. the load step and the HPA model -------------------------------------------------------------------


def _duration_s(text: Any) -> float | None:
    """Seconds of a Kubernetes or Prometheus duration ("15s", "1m", "30"); None if it is not one."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(text))
    if match is None:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def _quantity(text: Any) -> float | None:
    """A Kubernetes quantity ("50m", "0.05", "2") as a number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|k|M)?\s*", str(text))
    if match is None:
        return None
    scale = {"m": 0.001, "k": 1e3, "M": 1e6, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def _load_yaml(path: Path) -> Any:
    import yaml  # type: ignore[import-untyped]

    return yaml.safe_load(path.read_text())


def read_hpa(deploy_dir: Path, sync_period_s: float, notes: list[str]) -> HpaSettings:
    """The shipped HPA's settings, the ServiceMonitor's scrape interval and the adapter's averaging window;
    Kubernetes' defaults (and a stated target) for whatever is missing, each with a note."""
    sources: list[str] = []
    target, metric = ASSUMED_TARGET_S, Name.BACKLOG_SECONDS
    min_r, max_r, window, select = 1, 10, 0.0, "Max"
    policies: tuple[ScalePolicy, ...] = DEFAULT_SCALE_UP
    tolerance = DEFAULT_TOLERANCE
    try:
        hpa = _load_yaml(deploy_dir / HPA_FILE)
        spec = hpa["spec"]
        (entry,) = [m for m in spec["metrics"] if m.get("type") == "Pods"]
        metric = entry["pods"]["metric"]["name"]
        target = _quantity(entry["pods"]["target"]["averageValue"]) or target
        min_r, max_r = int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
        up = spec.get("behavior", {}).get("scaleUp", {})
        window = float(up.get("stabilizationWindowSeconds", 0))
        select = str(up.get("selectPolicy", "Max"))
        if "tolerance" in up:
            tolerance = _quantity(up["tolerance"]) or tolerance
        if up.get("policies"):
            policies = tuple(
                ScalePolicy(kind=str(p["type"]), value=int(p["value"]), period_s=float(p["periodSeconds"]))
                for p in up["policies"]
            )
        sources.append(str(deploy_dir / HPA_FILE))
    except (OSError, ImportError, KeyError, TypeError, ValueError) as exc:
        notes.append(
            f"HPA model: {deploy_dir / HPA_FILE} not read ({type(exc).__name__}: {exc}); assumed a target of "
            f"{ASSUMED_TARGET_S:g} s per pod, 1..10 replicas and Kubernetes' default scale-up behaviour"
        )
    scrape = DEFAULT_SCRAPE_INTERVAL_S
    try:
        monitor = _load_yaml(deploy_dir / SERVICE_MONITOR_FILE)
        scrape = _duration_s(monitor["spec"]["endpoints"][0]["interval"]) or scrape
        sources.append(str(deploy_dir / SERVICE_MONITOR_FILE))
    except (OSError, ImportError, KeyError, IndexError, TypeError, ValueError):
        notes.append(f"HPA model: no ServiceMonitor interval read; assumed Prometheus' default {scrape:g} s")
    average: float | None = None
    try:
        query = str(_load_yaml(deploy_dir / ADAPTER_FILE)["rules"]["custom"][0]["metricsQuery"])
        found = re.search(r"avg_over_time\(.*\[(\w+)\]\)", query)
        average = _duration_s(found.group(1)) if found else None
        sources.append(str(deploy_dir / ADAPTER_FILE))
    except (OSError, ImportError, KeyError, IndexError, TypeError, ValueError):
        notes.append("HPA model: no prometheus-adapter rule read; assumed it serves the latest sample")
    return HpaSettings(
        source=", ".join(sources) or "assumed (no manifests read)",
        metric=metric,
        target_average=target,
        tolerance=tolerance,
        sync_period_s=sync_period_s,
        scrape_interval_s=scrape,
        average_window_s=average,
        min_replicas=min_r,
        max_replicas=max_r,
        scale_up_window_s=window,
        scale_up_policies=policies,
        select_policy=select,
    )


def scale_up_limit(current: int, hpa: HpaSettings) -> int:
    """The most replicas one scale-up may reach from `current` under the behaviour's policies."""
    limits = [
        current + p.value if p.kind == "Pods" else math.ceil(current * (1 + p.value / 100))
        for p in hpa.scale_up_policies
    ]
    if hpa.select_policy == "Disabled" or not limits:
        return current
    pick = min(limits) if hpa.select_policy == "Min" else max(limits)
    return min(pick, hpa.max_replicas)


def hpa_model(
    samples: Sequence[BacklogSample], load_start_s: float, hpa: HpaSettings, step_s: float = PHASE_STEP_S
) -> HpaVerdict:
    """When an HPA with `hpa` first scales up after the step starts at `load_start_s`.

    The model: every pod sees what this replica saw (so the per-pod average is its gauge) and the fleet runs
    minReplicas pods. Prometheus samples the gauge every scrape interval (the latest recorded value at that
    moment; 0 outside the recording: idle); at each sync the HPA reads the mean of the samples in the
    averaging window (or the latest one), recommends ceil(current x value / target) when value / target is
    over 1 + tolerance, takes the lowest recommendation of the stabilization window, and scales when that is
    above current, by at most the policies allow. Scrape and sync phases are unknown, so every pair on a grid
    is tried; the result is over all of them.
    """
    points = sorted((s.t_s, s.backlog_s) for s in samples if s.backlog_s is not None)
    times = [t for t, _ in points]
    threshold = hpa.target_average * (1 + hpa.tolerance)
    end = times[-1] if times else load_start_s
    window = hpa.average_window_s or 0.0
    horizon = end + window + hpa.sync_period_s

    def gauge(t: float) -> float:
        if not points or t < times[0] or t > end:
            return 0.0
        lo, hi = 0, len(times) - 1
        while lo < hi:  # the last sample at or before t
            mid = (lo + hi + 1) // 2
            if times[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        return points[lo][1] or 0.0

    crossed = next((t - load_start_s for t, v in points if t >= load_start_s and (v or 0) > threshold), None)
    current = hpa.min_replicas
    decisions: list[float] = []
    reached: list[int] = []
    phases = 0
    scrape_grid = [k * step_s for k in range(max(1, round(hpa.scrape_interval_s / step_s)))]
    sync_grid = [k * step_s for k in range(max(1, round(hpa.sync_period_s / step_s)))]
    for scrape_phase in scrape_grid:
        for sync_phase in sync_grid:
            phases += 1
            history: list[tuple[float, int]] = []
            # The first sync at or after the step's start, then every sync period up to the horizon.
            k = math.ceil((load_start_s - sync_phase) / hpa.sync_period_s)
            while (sync := sync_phase + k * hpa.sync_period_s) <= horizon:
                k += 1
                last = scrape_phase + math.floor((sync - scrape_phase) / hpa.scrape_interval_s) * (
                    hpa.scrape_interval_s
                )
                if window:
                    n = max(1, math.floor(window / hpa.scrape_interval_s))
                    value = statistics.fmean(gauge(last - j * hpa.scrape_interval_s) for j in range(n))
                else:
                    value = gauge(last)
                ratio = value / hpa.target_average
                wanted = math.ceil(current * ratio) if ratio > 1 + hpa.tolerance else current
                history.append((sync, wanted))
                stable = min(w for at, w in history if at >= sync - hpa.scale_up_window_s)
                if sync - hpa.scale_up_window_s < history[0][0]:
                    stable = min(stable, current)  # the window reaches back to idle syncs
                if stable > current:
                    decisions.append(round(sync - load_start_s, 2))
                    reached.append(min(stable, scale_up_limit(current, hpa)))
                    break
    return HpaVerdict(
        threshold=round(threshold, 6),
        gauge_crossed_s=None if crossed is None else round(crossed, 2),
        phases=phases,
        scaled=len(decisions),
        earliest_s=min(decisions, default=None),
        median_s=round(statistics.median(decisions), 2) if decisions else None,
        latest_s=max(decisions, default=None),
        replicas_from=current,
        replicas_to_min=min(reached, default=None),
        replicas_to_max=max(reached, default=None),
        horizon_s=round(horizon - load_start_s, 2),
    )


async def load_step(
    server: LocalServer,
    workload: Workload,
    cfg: FleetConfig,
    capacity: float,
    hpa: HpaSettings,
    progress: ProgressLine | None,
) -> LoadStep:
    """Idle, `cfg.level` x `capacity` for `cfg.load_s`, idle; the backlog gauge every `cfg.scrape_every_s`."""
    assert server.metrics_url is not None
    url = server.metrics_url
    loop = asyncio.get_running_loop()
    samples: list[BacklogSample] = []
    t0 = loop.time()

    async def sampler() -> None:
        # NOTE: a fixed schedule from t0 (never "sleep after each scrape"), so the samples do not drift.
        k = 0
        while True:  # cancelled when the recording ends
            await asyncio.sleep(max(0.0, t0 + k * cfg.scrape_every_s - loop.time()))
            k += 1
            try:
                value: float | None = (await fetch_async(url, cfg.scrape_every_s)).total(Name.BACKLOG_SECONDS)
            except ScrapeError:
                value = None
            samples.append(BacklogSample(t_s=round(loop.time() - t0, 3), backlog_s=value))

    rate = float(f"{cfg.level * capacity:.6g}")
    plan = replace(
        LoadSettings(
            warmup_s=0.0,
            window_s=cfg.load_s,
            max_windows=1,
            deadline_s=cfg.step_deadline_s,
            max_calls=max(1_000_000, int(2 * rate * cfg.load_s)),
        ).plan("open", rate=rate, arrival="poisson", seed=workload.spec.seed),
        outcomes=True,
    )
    task = loop.create_task(sampler())
    try:
        await asyncio.sleep(cfg.idle_s)
        async with AsyncClient(server.address, deadline=cfg.step_deadline_s) as client:
            # run_step's schedule starts 10 ms after it is called.
            start = loop.time() + 0.01 - t0
            if progress is not None:
                progress.finish(
                    f"load step: {rate:g} calls/s ({cfg.level:g}x {capacity:g}) for {cfg.load_s:g} s"
                )
            step = await run_step(plan, as_target(client), workload, progress=progress)
        end = start + cfg.load_s
        await asyncio.sleep(max(0.0, t0 + end + cfg.idle_s - loop.time()))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    values = [s.backlog_s for s in samples if s.backlog_s is not None]
    verdict = hpa_model(samples, start, hpa)
    if progress is not None:
        progress.finish(
            f"load step: backlog peak {max(values, default=None)} s; HPA would scale {verdict.earliest_s}.."
            f"{verdict.latest_s} s after the step ({verdict.scaled} of {verdict.phases} phases)"
        )
    return LoadStep(
        capacity_per_s=capacity,
        level=cfg.level,
        rate_per_s=rate,
        idle_s=cfg.idle_s,
        load_s=cfg.load_s,
        load_start_s=round(start, 3),
        load_end_s=round(end, 3),
        scrape_every_s=cfg.scrape_every_s,
        samples=tuple(samples),
        peak_backlog_s=max(values, default=None),
        hpa=hpa,
        verdict=verdict,
        step=step,
    )


# --- the run and its report ------------------------------------------------------------------------------


async def measure_fleet(
    cfg: FleetConfig, workload: Workload, notes: list[str], progress: ProgressLine | None
) -> FleetResult:
    hpa = read_hpa(cfg.deploy_dir, cfg.sync_period_s, notes)
    loop = asyncio.get_running_loop()
    logs = cfg.out / "logs"
    steps: list[FleetStep] = []
    async with contextlib.AsyncExitStack() as first, contextlib.AsyncExitStack() as rest:
        servers: list[LocalServer] = []
        for i in range(cfg.replicas):
            began = loop.time()
            stack = first if i == 0 else rest
            servers.append(
                await stack.enter_async_context(
                    local_server(cfg.model_repo, threads=cfg.threads, log_path=logs / f"replica-{i + 1}.log")
                )
            )
            steps.append(await measure_replicas(servers, workload, cfg, loop.time() - began, progress))
        await rest.aclose()  # the load step runs on the first replica alone
        capacity = steps[0].step.measured.calls_per_s
        if capacity <= 0:
            raise TargetError("no call succeeded on one replica: no load step")
        step = await load_step(servers[0], workload, cfg, capacity, hpa, progress)
    per_core, model = paper_model(steps, cfg.model_cores)
    return FleetResult(
        callers=cfg.callers,
        threads=cfg.threads,
        usable_cores=report.usable_cores(),
        steps=tuple(steps),
        per_core_texts_per_s=per_core,
        model=model,
        load_step=step,
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fleet_summary(result: FleetResult) -> dict[str, SummaryItem]:
    out: dict[str, SummaryItem] = {}
    cores = result.usable_cores
    for s in result.steps:
        out[f"fleet_{s.replicas}_texts_per_s"] = SummaryItem(
            title=f"{s.replicas} replica(s) behind one round-robin client: aggregate throughput",
            value=s.texts_per_s,
            how=f"closed loop of {result.callers} callers, one text a call; measured on {cores} shared "
            f"cores: the replicas used {_fmt(s.server_cores, 2)} cores together, the load generator "
            f"{_fmt(s.client_cores, 2)}",
            unit=" texts/s",
            digits=1,
        )
    out["fleet_per_core"] = SummaryItem(
        title="One replica: texts/s per core it used",
        value=result.per_core_texts_per_s,
        how="the 1-replica throughput over that replica's CPU (utime + stime, /proc); the paper model's unit",
        unit=" texts/s",
        digits=1,
    )
    ls, v = result.load_step, result.load_step.verdict
    out["backlog_peak"] = SummaryItem(
        title=f"Backlog peak under {ls.level:g}x one replica's capacity",
        value=ls.peak_backlog_s,
        how=f"recserve_backlog_seconds scraped every {ls.scrape_every_s:g} s during {ls.load_s:g} s at "
        f"{ls.rate_per_s:g} calls/s",
        unit=" s",
        digits=3,
    )
    out["hpa_scale_after"] = SummaryItem(
        title="HPA (model): first scale-up after the step, median over phases",
        value=v.median_s,
        how=f"earliest {_fmt(v.earliest_s)} s, latest {_fmt(v.latest_s)} s over {v.phases} scrape/sync "
        f"phases ({v.scaled} scale within {v.horizon_s:g} s); a model of the shipped settings, not a cluster",
        unit=" s",
        digits=1,
    )
    return out


def replica_lines(result: FleetResult) -> list[str]:
    rows = []
    for s in result.steps:
        m = s.step.measured
        calls = sum(x.ok_calls or 0 for x in s.shares)
        shares = ", ".join(
            f"{x.ok_calls} ({(x.ok_calls or 0) / calls * 100:.0f}%)" if calls else str(x.ok_calls)
            for x in s.shares
        )
        rows.append(
            [
                str(s.replicas),
                f"{s.texts_per_s:.1f}",
                _fmt(m.latency_ms.p50),
                _fmt(m.latency_ms.p99),
                str(m.failed),
                shares,
                ", ".join(_fmt(x.cpu_cores, 2) for x in s.shares),
                _fmt(s.server_cores, 2),
                _fmt(s.client_cores, 2),
                f"{s.start_s:g}",
            ]
        )
    first = result.steps[0].step.plan
    return [
        f"Measured on this machine: **{result.usable_cores} cores, shared** by every replica and the load "
        f"generator. Each count is a closed loop of {result.callers} callers, one text a call (the workload "
        f"above), through one client whose target lists every replica (round robin, `recserve.client`), "
        f"{first.warmup_s:g} s of warm-up, then one window of {first.window_s:g} s. Replicas are added one "
        f"at a time, each a `recserve serve` with {result.threads} ORT threads. Calls per replica are from "
        'each replica\'s own `recserve_requests_total{rpc="Embed",code="OK"}`; cores are utime + stime of '
        "/proc/PID/stat over the window.",
        "",
        *report.md_table(
            [
                "replicas",
                "texts/s",
                "p50 ms",
                "p99 ms",
                "failed",
                "OK calls per replica (share)",
                "cores per replica",
                "server cores",
                "client cores",
                "start s",
            ],
            rows,
        ),
        "",
        f"On {result.usable_cores} shared cores the aggregate cannot scale with replicas: they take turns on "
        "the same cores, and the load generator takes its share too. What the table does show is that one "
        "client spreads its calls evenly over every replica. What more replicas buy on more cores is the "
        "paper model below, not a measurement.",
    ]


def model_lines(result: FleetResult) -> list[str]:
    rows = [[r.node, _fmt(r.texts_per_s), r.how] for r in result.model]
    return [
        f"**Computed, not measured.** The unit is one replica's texts/s per core it used here "
        f"({_fmt(result.per_core_texts_per_s)} texts/s per core: the 1-replica row's throughput over that "
        "replica's cores). Linear in cores, which real nodes rarely quite reach (memory bandwidth, turbo, "
        "hyper-threads counted as cores); check a real node with `recserve bench suite` on it.",
        "",
        *report.md_table(["node", "texts/s (model)", "how"], rows),
    ]


def backlog_lines(result: FleetResult) -> list[str]:
    ls, hpa, v = result.load_step, result.load_step.hpa, result.load_step.verdict
    o = ls.step.outcomes
    statuses = ", ".join(f"{k} {f.calls}" for k, f in o.statuses.items()) if o else "-"
    policies = ", ".join(f"{p.kind} {p.value} per {p.period_s:g} s" for p in hpa.scale_up_policies)
    average = (
        f"the mean of the last {hpa.average_window_s:g} s of samples"
        if hpa.average_window_s
        else "the latest"
    )
    verdict = (
        f"would have scaled **{_fmt(v.earliest_s)} to {_fmt(v.latest_s)} s after the step** (median "
        f"{_fmt(v.median_s)} s; in {v.scaled} of the {v.phases} phases), from {v.replicas_from} to "
        f"{v.replicas_to_min}..{v.replicas_to_max} pods"
        if v.scaled
        else f"would **not** have scaled within {v.horizon_s:g} s of the step"
    )
    return [
        f"One replica: {ls.idle_s:g} s idle, then an open loop (Poisson) of one-text calls at {ls.level:g}x "
        f"its capacity ({ls.capacity_per_s:g} calls/s, the 1-replica row above) = **{ls.rate_per_s:g} "
        f"calls/s** for {ls.load_s:g} s, each call with a {ls.step.plan.deadline_s:g} s deadline, then "
        f"{ls.idle_s:g} s idle. "
        f"`recserve_backlog_seconds` scraped every {ls.scrape_every_s:g} s ({len(ls.samples)} samples); peak "
        f"{_fmt(ls.peak_backlog_s, 3)} s. Calls by status: {statuses}.",
        "",
        f"**When an HPA would have scaled (a model, not a cluster).** Settings from {hpa.source}: metric "
        f"`{hpa.metric}`, target averageValue {hpa.target_average:g} per pod, tolerance {hpa.tolerance:g} "
        f"(so it scales above {v.threshold:g}), {hpa.min_replicas}..{hpa.max_replicas} replicas, scale-up "
        f"stabilization {hpa.scale_up_window_s:g} s, policies {policies} ({hpa.select_policy}); Prometheus "
        f"scrapes every {hpa.scrape_interval_s:g} s, the adapter serves {average}; the HPA controller syncs "
        f"every {hpa.sync_period_s:g} s (kube-controller-manager's default). Every pod is taken to see what "
        f"this replica saw (the step is {ls.level:g}x capacity per pod), and the gauge 0 outside the "
        f"recording (idle). The phases of scrapes and syncs are unknown, so all {v.phases} pairs on a "
        f"{PHASE_STEP_S:g} s grid are tried. The gauge itself crossed the threshold "
        f"{_fmt(v.gauge_crossed_s)} s after the step. The HPA {verdict}. Add the new "
        f"pods' start-up (load and warm-up; here a replica took "
        f"{result.steps[0].start_s:g} s to say SERVING) before they take load; the adapter's own caching and "
        "pod scheduling are not modelled.",
    ]


async def run_fleet(cfg: FleetConfig, err: TextIO | None = None) -> int:
    """`bench fleet` after its flags were checked: returns the exit code."""
    err = err or sys.stderr
    workload = workload_of(cfg.workload)
    progress = ProgressLine(err) if cfg.progress else None
    notes: list[str] = []
    settings = to_json(cfg)
    assert isinstance(settings, dict)
    doc = report.new_document("fleet", cfg.command, settings)
    result = await measure_fleet(cfg, workload, notes, progress)
    done = report.finish(
        replace(
            doc,
            workload=workload.describe(),
            summary=fleet_summary(result),
            sections={
                f"Replicas behind one round-robin client ({result.usable_cores} shared cores)": replica_lines(
                    result
                ),
                "Paper model: a bigger node, a GPU": model_lines(result),
                "Backlog under a load step, and the HPA": backlog_lines(result),
            },
            fleet=result,
            notes=tuple(notes),
        )
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    plots = (
        {"backlog": "backlog.png"} if report.plot_backlog(result.load_step, cfg.out / "backlog.png") else {}
    )
    paths = [
        report.write_json(done, cfg.out / "fleet.json"),
        report.write_markdown(done, cfg.markdown or cfg.out / "FLEET.md", plots, cfg.out),
        *(cfg.out / f for f in plots.values()),
    ]
    report.print_tables(done)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return inconsistent([*(s.step for s in result.steps), result.load_step.step], err)
