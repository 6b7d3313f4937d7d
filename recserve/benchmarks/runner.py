"""`recserve bench run`: validate, check the target, sweep, scrape, compare with the raw limit, report.

Order matters: flags are checked first (no network), then the target (health + Info, one call each), and
only then is load sent. Every failure before the load is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

from recserve.benchmarks import report
from recserve.benchmarks.loadgen import BoundaryHook, LoadSettings, StepPlan, run_step
from recserve.benchmarks.scrape import ScrapeError, Snapshot, fetch_async, server_view
from recserve.benchmarks.workloads import RpcKind, Workload, WorkloadError, WorkloadSpec, build_workload
from recserve.client import (
    SERVICE_NAME,
    AsyncClient,
    DeadlineExceeded,
    NotFound,
    RecserveError,
    ServerInfo,
    Unavailable,
    Unimplemented,
)

EXIT_USAGE = 2
EXIT_TARGET = 3
DEFAULT_METRICS_PORT = 8000


class ConfigError(ValueError):
    """An invalid flag or flag combination (found before anything is sent)."""


class TargetError(RuntimeError):
    """The target cannot be load-tested: unreachable, not our API, or not SERVING."""


@dataclass(frozen=True)
class RunConfig:
    target: str
    mode: Literal["closed", "open"]
    concurrency: tuple[int, ...]
    rates: tuple[float, ...]
    arrival: Literal["poisson", "fixed"]
    workload: WorkloadSpec
    load: LoadSettings
    out: Path
    markdown: Path | None = None
    metrics_url: str | None = "auto"
    tls: bool = False
    root_cert: Path | None = None
    model_repo: Path | None = None
    batching_off: bool = False
    threads: int = 1
    progress: bool = True
    command: str = ""
    notes: list[str] = field(default_factory=list)

    def plans(self) -> list[StepPlan]:
        seed = self.workload.seed
        if self.mode == "closed":
            return [self.load.plan("closed", concurrency=c, seed=seed) for c in self.concurrency]
        return [self.load.plan("open", rate=r, arrival=self.arrival, seed=seed) for r in self.rates]


# --- flags -> config ------------------------------------------------------------------------------------


def int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{flag}: expected integers >= 1, got {text!r}")
    return values


def float_list(flag: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ConfigError(f"{flag}: expected numbers > 0, got {text!r}")
    return values


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def load_settings_from_args(args: Any) -> LoadSettings:
    positive("--warmup", args.warmup, allow_zero=True)
    positive("--duration", args.duration)
    positive("--deadline", args.deadline)
    if args.max_windows < 1:
        raise ConfigError("--max-windows must be >= 1")
    if not 0 <= args.tolerance < 1:
        raise ConfigError("--tolerance must be in [0, 1)")
    if args.max_calls < 1 or args.max_in_flight < 1:
        raise ConfigError("--max-calls and --max-in-flight must be >= 1")
    return LoadSettings(
        warmup_s=args.warmup,
        window_s=args.duration,
        max_windows=args.max_windows,
        tolerance=args.tolerance,
        deadline_s=args.deadline,
        max_calls=args.max_calls,
        max_in_flight=args.max_in_flight,
    )


def workload_from_args(args: Any, rpc: dict[RpcKind, float]) -> WorkloadSpec:
    """The workload flags; flags that do not apply to the chosen RPCs are errors, not silently ignored."""
    if args.texts_per_call is not None and "embed" not in rpc:
        raise ConfigError("--texts-per-call applies to --rpc embed only")
    if args.candidates is not None and not {"score", "history"} & set(rpc):
        raise ConfigError("--candidates applies to --rpc score or history only")
    if args.history is not None and "history" not in rpc:
        raise ConfigError("--history applies to --rpc history only")
    spec = WorkloadSpec(lengths=args.workload, seed=args.seed, rpc=rpc, encoding=args.encoding)
    for name, value in (
        ("texts_per_call", args.texts_per_call),
        ("candidates", args.candidates),
        ("history", args.history),
    ):
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
            spec = replace(spec, **{name: value})
    return spec


def config_from_args(args: Any, argv: Sequence[str] | None = None) -> RunConfig:
    """Checks every flag and combination; raises ConfigError with a one-line message."""
    from recserve.benchmarks.workloads import parse_length_spec, parse_rpc_mix

    if args.mode == "closed":
        if args.rate is not None or args.arrival is not None:
            raise ConfigError("--rate and --arrival apply to --mode open; closed loop takes --concurrency")
        concurrency = int_list("--concurrency", args.concurrency or "1,4,16,64")
        rates: tuple[float, ...] = ()
    else:
        if args.concurrency is not None:
            raise ConfigError("--concurrency applies to --mode closed; open loop takes --rate")
        if args.rate is None:
            raise ConfigError("--mode open needs --rate (calls/s, e.g. --rate 50,100,200)")
        concurrency, rates = (), float_list("--rate", args.rate)
    load = load_settings_from_args(args)
    try:
        rpc = parse_rpc_mix(args.rpc)
        workload = workload_from_args(args, rpc)
        parse_length_spec(workload.lengths)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from None
    if args.root_cert is not None and not args.root_cert.is_file():
        raise ConfigError(f"--root-cert {args.root_cert} is not a file")
    if args.batching_off and args.model_repo is None:
        raise ConfigError("--batching-off starts a second server, so it needs --model-repo")
    if args.model_repo is not None:
        check_repo(args.model_repo)
    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    if ":" not in args.target:
        raise ConfigError(f"--target must be HOST:PORT, got {args.target!r}")
    return RunConfig(
        target=args.target,
        mode=args.mode,
        concurrency=concurrency,
        rates=rates,
        arrival=args.arrival or "poisson",
        workload=workload,
        load=load,
        out=args.out,
        markdown=args.markdown,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
        tls=args.tls or args.root_cert is not None,
        root_cert=args.root_cert,
        model_repo=args.model_repo,
        batching_off=args.batching_off,
        threads=args.threads,
        progress=not args.quiet,
        command=command_line(argv),
    )


def check_repo(repo: Path) -> None:
    from recserve.manifest import Manifest, ManifestError

    try:
        Manifest.load(repo)
    except ManifestError as exc:
        raise ConfigError(f"--model-repo: {exc}") from None


def command_line(argv: Sequence[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    return "recserve " + shlex.join(words)


# --- the target -----------------------------------------------------------------------------------------


async def check_target(client: AsyncClient, target: str, deadline: float = 5.0) -> ServerInfo:
    """Health, then Info: raises TargetError saying what is wrong, before any load is sent."""
    try:
        status = await client.health(SERVICE_NAME, deadline=deadline)
    except Unavailable as exc:
        if "HTTP/2" in exc.details or "http1" in exc.details.lower():
            # Something listens there, but it does not speak HTTP/2 (e.g. the metrics port, a web server).
            raise TargetError(f"{target} is not a gRPC server ({exc.details})") from None
        raise TargetError(f"cannot reach {target}: {exc.details}") from None
    except DeadlineExceeded:
        raise TargetError(f"{target} did not answer a health check within {deadline:g} s") from None
    except Unimplemented:
        raise TargetError(f"{target} serves no grpc.health.v1 health: not a recserve server") from None
    except NotFound:
        raise TargetError(
            f"{target} has no health status for {SERVICE_NAME}: not a recserve server"
        ) from None
    except RecserveError as exc:
        raise TargetError(
            f"{target}: the health check failed ({exc}); is it a recserve gRPC server?"
        ) from None
    if status != "SERVING":
        raise TargetError(f"{target} reports {status} for {SERVICE_NAME}, not SERVING: no load sent")
    try:
        info = await client.info(deadline=deadline)
    except Unimplemented:
        raise TargetError(
            f"{target} does not implement {SERVICE_NAME}/Info: not the recserve v1 API"
        ) from None
    except RecserveError as exc:
        raise TargetError(f"{target}: Info failed ({exc})") from None
    if info.task not in ("embedding", "cross-encoder") or info.dimension < 1:
        raise TargetError(
            f"{target}: Info describes no usable model (task {info.task!r}, dimension {info.dimension})"
        )
    return info


def check_workload_fits(spec: WorkloadSpec, info: ServerInfo, target: str) -> None:
    """Combinations the target itself rules out, found from Info before any load."""
    if info.task == "cross-encoder" and {"embed", "history"} & set(spec.rpc):
        raise TargetError(
            f"{target} serves a cross-encoder: only --rpc score applies (no Embed, no user history)"
        )
    limit = info.limits.max_texts_per_call
    per_call = max(
        spec.texts_per_call if "embed" in spec.rpc else 0,
        1 + spec.candidates if "score" in spec.rpc else 0,
        spec.history + spec.candidates if "history" in spec.rpc else 0,
    )
    if limit and per_call > limit:
        raise TargetError(f"{target} takes at most {limit} texts per call; this workload sends {per_call}")


# --- steps with the server's view -----------------------------------------------------------------------


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


async def resolve_metrics(url: str | None, target: str, notes: list[str]) -> str | None:
    """The metrics URL to scrape, or None. An explicit URL must work; "auto" tries the default port."""
    if url is None:
        return None
    explicit = url != "auto"
    if not explicit:
        host = target.rsplit(":", 1)[0]
        url = f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"
    try:
        await fetch_async(url)
    except ScrapeError as exc:
        if explicit:
            raise TargetError(f"--metrics-url: {exc}") from None
        notes.append(f"no server metrics (tried {url}; pass --metrics-url): server-side figures are missing")
        return None
    return url


async def sweep(
    client: AsyncClient,
    plans: Sequence[StepPlan],
    workload: Workload,
    *,
    metrics_url: str | None,
    progress: ProgressLine | None,
    raw_texts_per_s: float | None = None,
    series: str = "",
) -> list[dict[str, Any]]:
    """Runs the steps in order against one target; each step gets the server's view and the raw ratio."""
    results = []
    for plan in plans:
        snaps: dict[int, Snapshot] = {}
        hook = None if metrics_url is None else _scraper(metrics_url, snaps)
        step = await run_step(plan, client.stub, workload, progress=progress, on_boundary=hook)
        first, last = step["boundaries"]
        if first in snaps and last in snaps:
            step["server"] = server_view(snaps[first], snaps[last])
        if raw_texts_per_s:
            step["ratio_to_raw"] = round(step["texts_per_s"] / raw_texts_per_s, 4)
        results.append(step)
        if progress is not None:
            lat = step["latency_ms"]
            progress.finish(
                f"{series + ': ' if series else ''}{step['label']}: {step['calls_per_s']:.1f} calls/s, "
                f"{step['texts_per_s']:.1f} texts/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
                f"{step['failed']} failed of {step['sent']}"
            )
    return results


def _scraper(url: str, into: dict[int, Snapshot]) -> BoundaryHook:
    async def hook(boundary: int) -> None:
        with contextlib.suppress(ScrapeError):  # a missed scrape loses the server view, not the step
            into[boundary] = await fetch_async(url)

    return hook


@contextlib.asynccontextmanager
async def connected(
    target: str, tls: bool = False, root_cert: Path | None = None
) -> AsyncIterator[AsyncClient]:
    roots = await asyncio.to_thread(root_cert.read_bytes) if root_cert is not None else None
    async with AsyncClient(target, tls=tls, root_certificates=roots) as client:
        yield client


def series_entry(name: str, target: str, info: ServerInfo, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "target": target, "server": asdict(info), "steps": steps}


def load_workload(spec: WorkloadSpec, err: TextIO) -> Workload | None:
    """The texts of `spec`, or None once the reason they cannot be built is printed (exit EXIT_USAGE)."""
    try:
        return build_workload(spec)
    except (WorkloadError, OSError) as exc:
        print(f"recserve bench: {exc}", file=err)
        return None


async def execute(config: RunConfig, err: TextIO | None = None) -> int:
    """`bench run` after its flags were checked: returns the exit code."""
    err = err or sys.stderr
    from recserve.benchmarks.servers import ServerStartError, local_server

    workload = load_workload(config.workload, err)
    if workload is None:
        return EXIT_USAGE
    progress = ProgressLine(err) if config.progress else None
    notes = list(config.notes)
    doc = report.new_document("run", config.command, _settings(config))
    doc["workload"] = workload.describe()
    try:
        async with connected(config.target, config.tls, config.root_cert) as client:
            info = await check_target(client, config.target)
            check_workload_fits(config.workload, info, config.target)
            metrics_url = await resolve_metrics(config.metrics_url, config.target, notes)
            raw = await _raw_limit(config, workload, info, notes)
            doc["raw"] = raw
            raw_tps = raw["texts_per_s"] if raw else None
            steps = await sweep(
                client,
                config.plans(),
                workload,
                metrics_url=metrics_url,
                progress=progress,
                raw_texts_per_s=raw_tps,
            )
            doc["series"].append(series_entry("target", config.target, info, steps))
        if config.batching_off and config.model_repo is not None:
            log = config.out / "server-batching-off.log"
            async with (
                local_server(
                    config.model_repo, threads=config.threads, log_path=log, extra=["--max-batch-size", "1"]
                ) as srv,
                connected(srv.address) as client,
            ):
                off_info = await check_target(client, srv.address)
                steps = await sweep(
                    client,
                    config.plans(),
                    workload,
                    metrics_url=srv.metrics_url,
                    progress=progress,
                    raw_texts_per_s=raw_tps,
                    series="batching off",
                )
                doc["series"].append(series_entry("batching off", srv.address, off_info, steps))
    except (TargetError, ServerStartError) as exc:
        print(f"recserve bench: {exc}", file=err)
        return EXIT_TARGET
    doc["notes"] = notes
    doc["summary"] = run_summary(doc)
    paths = report.write_all(doc, config.out, config.markdown)
    report.print_tables(doc)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    bad = [s["label"] for ser in doc["series"] for s in ser["steps"] if not all(s["consistency"].values())]
    if bad:
        print(
            f"recserve bench: inconsistent figures in {', '.join(bad)} (a harness bug; see results.json)",
            file=err,
        )
        return 1
    return 0


def run_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a run: each series' best throughput and, beside it, the raw limit ratio."""
    out: dict[str, Any] = {}
    for series in doc["series"]:
        ok = [s for s in series["steps"] if s["completed"]]
        if not ok:
            continue
        best = max(ok, key=lambda s: s["texts_per_s"])
        lat = best["latency_ms"]
        out[f"{series['name']}_peak"] = {
            "title": f"Peak throughput ({series['name']})",
            "value": best["texts_per_s"],
            "unit": " texts/s",
            "digits": 1,
            "how": f"{best['label']}: {best['calls_per_s']} calls/s, p50 {lat['p50']}, p99 {lat['p99']} ms",
        }
        if best.get("ratio_to_raw") is not None:
            out[f"{series['name']}_raw_ratio"] = {
                "title": f"Peak over the raw limit ({series['name']})",
                "value": best["ratio_to_raw"],
                "how": f"{best['texts_per_s']} texts/s over {doc['raw']['texts_per_s']} in process",
            }
    return out


async def _raw_limit(
    config: RunConfig, workload: Workload, info: ServerInfo, notes: list[str]
) -> dict[str, Any] | None:
    if config.model_repo is None:
        return None
    from recserve.benchmarks.baseline import RawModel, raw_limit
    from recserve.manifest import Manifest

    manifest = Manifest.load(config.model_repo)
    if manifest.source.weights_sha256 != info.weights_sha256:
        notes.append(
            f"the raw limit runs {manifest.model_name} from --model-repo, but the target serves "
            f"{info.model_name} (weights {info.weights_sha256[:12]}): the ratios compare different models"
        )

    def measure(repo: Path) -> dict[str, Any]:
        with RawModel(repo, threads=config.threads, query=workload.texts[0]) as model:
            return raw_limit(model, workload.texts)

    return await asyncio.to_thread(measure, config.model_repo)


def _settings(config: RunConfig) -> dict[str, Any]:
    out = asdict(config)
    out.pop("notes")
    settings: dict[str, Any] = _jsonable(out)
    return settings


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
