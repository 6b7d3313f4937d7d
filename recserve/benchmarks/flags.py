"""Parsed flags -> a checked RunConfig or SuiteConfig; a mistake is a ConfigError before anything is sent."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from recserve.benchmarks import process
from recserve.benchmarks.config import (
    ConfigError,
    OverloadConfig,
    OverloadSettings,
    PeerSpec,
    RunConfig,
    SoakConfig,
    SuiteConfig,
    TargetChoice,
)
from recserve.benchmarks.loadgen import LoadSettings
from recserve.benchmarks.protocols import Endpoint, EndpointError, parse_endpoint
from recserve.benchmarks.workloads import (
    RpcKind,
    WorkloadError,
    WorkloadSpec,
    parse_length_spec,
    parse_rpc_mix,
)

if TYPE_CHECKING:
    from recserve.benchmarks.fleet import FleetConfig
    from recserve.benchmarks.gpu_check import GpuCheckConfig


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


def load_settings(args: argparse.Namespace) -> LoadSettings:
    """The flags of each step, shared by `run` and `suite`."""
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


def workload(args: argparse.Namespace, rpc: dict[RpcKind, float]) -> WorkloadSpec:
    """The workload flags; flags that do not apply to the chosen RPCs are errors, not silently ignored."""
    if args.texts_per_call is not None and "embed" not in rpc:
        raise ConfigError("--texts-per-call applies to --rpc embed only")
    if args.candidates is not None and not {"score", "history"} & set(rpc):
        raise ConfigError("--candidates applies to --rpc score or history only")
    if args.history is not None and "history" not in rpc:
        raise ConfigError("--history applies to --rpc history only")
    spec = WorkloadSpec(lengths=args.workload, seed=args.seed, rpc=rpc, encoding=args.encoding)
    for flag, value in (
        ("--texts-per-call", args.texts_per_call),
        ("--candidates", args.candidates),
        ("--history", args.history),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1")
    return replace(
        spec,
        texts_per_call=args.texts_per_call or spec.texts_per_call,
        candidates=args.candidates or spec.candidates,
        history=args.history or spec.history,
    )


def _lengths(spec: str) -> None:
    try:
        parse_length_spec(spec)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from None


def run_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> RunConfig:
    """`bench run`: checks every flag and combination; raises ConfigError with a one-line message."""
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
    load = load_settings(args)
    try:
        spec = workload(args, parse_rpc_mix(args.rpc))
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from None
    _lengths(spec.lengths)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together (mutual TLS)")
    for flag, path in (
        ("--tls-ca", args.root_cert),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--token-file", args.token_file),
    ):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path} is not a file")
    if args.batching_off and args.model_repo is None:
        raise ConfigError("--batching-off starts a second server, so it needs --model-repo")
    if args.model_repo is not None:
        check_repo(args.model_repo)
    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    endpoint = run_endpoint(args, spec)
    return RunConfig(
        target=endpoint.url,
        endpoint=endpoint,
        mode=args.mode,
        concurrency=concurrency,
        rates=rates,
        arrival=args.arrival or "poisson",
        workload=spec,
        load=load,
        out=args.out,
        markdown=args.markdown,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
        tls=args.tls or args.root_cert is not None or args.tls_cert is not None,
        root_cert=args.root_cert,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_file=args.token_file,
        model_repo=args.model_repo,
        batching_off=args.batching_off,
        threads=args.threads,
        progress=not args.quiet,
        command=command_line(argv),
    )


def endpoint(flag: str, text: str, rpc: set[str] | frozenset[str]) -> Endpoint:
    """A target URL (protocols.parse_endpoint) whose protocol carries every RPC of the workload."""
    try:
        parsed = parse_endpoint(text)
        parsed.check_rpcs(rpc)
    except EndpointError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    return parsed


def run_endpoint(args: argparse.Namespace, spec: WorkloadSpec) -> Endpoint:
    """`bench run --target`, with --model, and the flags that only some protocols take."""
    target = endpoint("--target", args.target, set(spec.rpc))
    if args.model is not None:
        if target.protocol == "tei+http":
            raise ConfigError(f"--model does not apply to {target.url}: TEI serves one model")
        if target.model is not None and target.model != args.model:
            raise ConfigError(f"--model {args.model} and the target's ?model={target.model} disagree")
        target = replace(target, model=args.model)
    if target.protocol != "recserve" and args.metrics_url not in ("auto", "none"):
        raise ConfigError(
            "--metrics-url reads a recserve server's metrics; other targets have no server view"
        )
    http = target.protocol in ("openai+http", "tei+http")
    if http and (args.tls or args.root_cert is not None or args.tls_cert is not None):
        raise ConfigError(f"--tls, --tls-ca and --tls-cert apply to gRPC targets; {target.url} is plain HTTP")
    return target


def peer_specs(values: Sequence[str]) -> tuple[PeerSpec, ...]:
    """`--peer NAME=URL`, repeated: distinct names, URLs of protocols that carry Embed (all do)."""
    from recserve.benchmarks.suite import PARTIES

    peers: list[PeerSpec] = []
    for value in values:
        name, sep, url = value.partition("=")
        name = name.strip()
        if not sep or not name or not url.strip():
            raise ConfigError(f"--peer {value!r}: expected NAME=URL, e.g. tei=openai+http://127.0.0.1:8080")
        if name in PARTIES or any(p.name == name for p in peers):
            raise ConfigError(f"--peer {value!r}: the name {name!r} is taken; name each server once")
        peers.append(PeerSpec(name, endpoint(f"--peer {name}", url, {"embed"})))
    return tuple(peers)


def suite_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> SuiteConfig:
    """`bench suite`: the same checks for its flags, before any server starts."""
    load = load_settings(args)
    _lengths(args.workload)
    check_repo(args.model_repo)
    fractions = float_list("--open-fractions", args.open_fractions)
    if min(args.threads, args.raw_repeats, args.rounds, args.singles) < 1:
        raise ConfigError("--threads, --raw-repeats, --rounds and --singles must be >= 1")
    positive("--p99-target-ms", args.p99_target_ms)
    peers = peer_specs(args.peer)
    return SuiteConfig(
        peers=peers,
        model_repo=args.model_repo,
        out=args.out,
        markdown=args.markdown,
        threads=args.threads,
        load=load,
        workload=WorkloadSpec(lengths=args.workload, seed=args.seed, encoding=args.encoding),
        concurrency=int_list("--concurrency", args.concurrency),
        open_fractions=fractions,
        compare=int_list("--compare", args.compare),
        raw_repeats=args.raw_repeats,
        rounds=args.rounds,
        singles=args.singles,
        p99_target_ms=args.p99_target_ms,
        overload=not args.no_overload,
        progress=not args.quiet,
        command=command_line(argv),
    )


DEFAULT_TARGET = "127.0.0.1:50051"


def target_choice(args: argparse.Namespace) -> TargetChoice:
    """`overload` and `soak`: --target (with --pid for /proc readings), or --model-repo for a local server."""
    if args.model_repo is not None:
        if args.target is not None:
            raise ConfigError("--target and --model-repo exclude each other (--model-repo starts a server)")
        if args.pid is not None:
            raise ConfigError("--pid applies to --target; the local server of --model-repo is read anyway")
        check_repo(args.model_repo)
        target = None
    else:
        parsed = endpoint("--target", args.target or DEFAULT_TARGET, {"embed"})
        if parsed.protocol != "recserve":
            raise ConfigError(
                f"--target {parsed.url}: bench {args.bench_command} measures a recserve server (its "
                "refusals, its process); load other servers with bench run or bench suite --peer"
            )
        target = parsed.address
    if args.pid is not None and (args.pid < 1 or not process.exists(args.pid)):
        raise ConfigError(f"--pid {args.pid}: no such process on this machine")
    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    return TargetChoice(
        target=target,
        model_repo=args.model_repo,
        pid=args.pid,
        threads=args.threads,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
    )


def _capacity_flags(args: argparse.Namespace, counts: dict[str, int] | None = None) -> None:
    """The flags of the capacity measurement that `bench overload` and `bench soak` share, and the
    command's own `counts` (flag -> value), all of which must be at least 1."""
    if args.capacity is not None:
        positive("--capacity", args.capacity)
    named = {"--capacity-callers": args.capacity_callers, **(counts or {})}
    named["--max-in-flight"] = args.max_in_flight
    if min(named.values()) < 1:
        flags = list(named)
        raise ConfigError(f"{', '.join(flags[:-1])} and {flags[-1]} must be >= 1")


def overload_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> OverloadConfig:
    """`bench overload`: every flag checked before the target is even asked for Info."""
    levels = float_list("--levels", args.levels)
    positive("--warmup", args.warmup, allow_zero=True)
    for flag, value in (
        ("--deadline", args.deadline),
        ("--duration", args.duration),
        ("--capacity-duration", args.capacity_duration),
        ("--probe-duration", args.probe_duration),
        ("--probe-deadline", args.probe_deadline),
    ):
        positive(flag, value)
    _capacity_flags(args, {"--probe-callers": args.probe_callers, "--probe-texts": args.probe_texts})
    _lengths(args.workload)
    return OverloadConfig(
        server=target_choice(args),
        workload=WorkloadSpec(lengths=args.workload, seed=args.seed, encoding=args.encoding),
        settings=OverloadSettings(
            levels=levels,
            deadline_s=args.deadline,
            capacity_per_s=args.capacity,
            capacity_callers=args.capacity_callers,
            capacity_window_s=args.capacity_duration,
            warmup_s=args.warmup,
            window_s=args.duration,
            max_in_flight=args.max_in_flight,
            probe=not args.no_probe,
            probe_texts=args.probe_texts,
            probe_callers=args.probe_callers,
            probe_window_s=args.probe_duration,
            probe_deadline_s=args.probe_deadline,
        ),
        out=args.out,
        markdown=args.markdown,
        progress=not args.quiet,
        command=command_line(argv),
    )


def soak_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> SoakConfig:
    """`bench soak`: the same checks, and at least two windows (the first is compared with the last)."""
    positive("--warmup", args.warmup, allow_zero=True)
    for flag, value in (
        ("--fraction", args.fraction),
        ("--minutes", args.minutes),
        ("--window", args.window),
        ("--deadline", args.deadline),
        ("--capacity-duration", args.capacity_duration),
    ):
        positive(flag, value)
    _capacity_flags(args)
    windows = round(args.minutes * 60 / args.window)
    if windows < 2:
        raise ConfigError(
            f"--minutes {args.minutes:g} holds {windows} window(s) of --window {args.window:g} s; "
            "a soak compares its first window with its last, so it needs at least 2"
        )
    try:
        rpc = parse_rpc_mix(args.rpc)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from None
    _lengths(args.workload)
    return SoakConfig(
        server=target_choice(args),
        workload=WorkloadSpec(lengths=args.workload, seed=args.seed, rpc=rpc, encoding=args.encoding),
        fraction=args.fraction,
        window_s=args.window,
        windows=windows,
        warmup_s=args.warmup,
        deadline_s=args.deadline,
        capacity_per_s=args.capacity,
        capacity_callers=args.capacity_callers,
        capacity_window_s=args.capacity_duration,
        max_in_flight=args.max_in_flight,
        out=args.out,
        progress=not args.quiet,
        command=command_line(argv),
    )


def fleet_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> FleetConfig:
    """`bench fleet`: every flag checked before the first replica starts."""
    from recserve.benchmarks.fleet import FleetConfig

    for flag, value in (
        ("--duration", args.duration),
        ("--level", args.level),
        ("--step-duration", args.step_duration),
        ("--step-deadline", args.step_deadline),
        ("--scrape-every", args.scrape_every),
        ("--sync-period", args.sync_period),
    ):
        positive(flag, value)
    positive("--warmup", args.warmup, allow_zero=True)
    positive("--idle", args.idle, allow_zero=True)
    if min(args.replicas, args.callers, args.threads) < 1:
        raise ConfigError("--replicas, --callers and --threads must be >= 1")
    check_repo(args.model_repo)
    _lengths(args.workload)
    return FleetConfig(
        model_repo=args.model_repo,
        replicas=args.replicas,
        callers=args.callers,
        threads=args.threads,
        warmup_s=args.warmup,
        window_s=args.duration,
        level=args.level,
        idle_s=args.idle,
        load_s=args.step_duration,
        step_deadline_s=args.step_deadline,
        scrape_every_s=args.scrape_every,
        deploy_dir=args.deploy_dir,
        sync_period_s=args.sync_period,
        model_cores=int_list("--model-cores", args.model_cores),
        workload=WorkloadSpec(lengths=args.workload, seed=args.seed, encoding=args.encoding),
        out=args.out,
        markdown=args.markdown,
        progress=not args.quiet,
        command=command_line(argv),
    )


def gpu_check_config(args: argparse.Namespace, argv: Sequence[str] | None = None) -> GpuCheckConfig:
    """`bench gpu-check`: the flags and the repository checked; the GPU itself is checked by the command."""
    from recserve.benchmarks.gpu_check import GpuCheckConfig

    positive("--warmup", args.warmup, allow_zero=True)
    positive("--duration", args.duration)
    if min(args.callers, args.threads) < 1:
        raise ConfigError("--callers and --threads must be >= 1")
    check_repo(args.model_repo)
    _lengths(args.workload)
    if args.reference not in ("auto", "none") and not Path(args.reference).is_dir():
        raise ConfigError(f"--reference {args.reference}: not a checkpoint directory (or auto, none)")
    return GpuCheckConfig(
        model_repo=args.model_repo,
        out=args.out,
        device=args.device,
        callers=args.callers,
        warmup_s=args.warmup,
        window_s=args.duration,
        threads=args.threads,
        reference=args.reference,
        workload=WorkloadSpec(lengths=args.workload, seed=args.seed, encoding=args.encoding),
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
