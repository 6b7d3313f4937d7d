"""`recserve bench`: `run` load-tests a target (recserve, or a server of another protocol: protocols.py);
`suite` benchmarks a model repository on this machine and writes BENCHMARKS.md; `overload` and `soak`
measure a target past and below its capacity; `gpu-check` checks fp16 on a CUDA GPU; `recommend` measures
the catalog build and Recommend with and without rerank.

`configure` imports nothing beyond argparse: `recserve --help` and `recserve serve` never pay for the harness.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  recserve bench run --target 127.0.0.1:50051 --mode closed --concurrency 1,4,16,64 --duration 10
  recserve bench run --mode open --rate 50,100,200 --arrival poisson --workload title --out bench-out
  recserve bench run --rpc score --candidates 32 --workload query --mode closed --concurrency 8
  recserve bench run --model-repo models/all-MiniLM-L6-v2 --batching-off   # + raw limit, batching off
  recserve bench suite --model-repo models/all-MiniLM-L6-v2 --out benchmarks/results --markdown BENCHMARKS.md
  recserve bench overload --model-repo models/all-MiniLM-L6-v2       # or --target HOST:PORT --pid PID
  recserve bench soak --target 127.0.0.1:50051 --pid 4242 --minutes 10 --fraction 0.7
  recserve bench fleet --model-repo models/all-MiniLM-L6-v2 --out benchmarks/fleet   # 1..3 local replicas
  recserve bench run --target openai+http://127.0.0.1:8080 --concurrency 1,16,64      # TEI, vLLM, infinity
  recserve bench run --target kserve-v2://127.0.0.1:8001 --model my-encoder           # Triton, KServe
  recserve bench suite --model-repo models/all-MiniLM-L6-v2 --peer tei=tei+http://127.0.0.1:8080
  recserve bench gpu-check --model-repo models/all-MiniLM-L6-v2 --out benchmarks/gpu  # CUDA + onnxruntime-gpu
  recserve bench recommend --model-repo models/all-MiniLM-L6-v2 --out benchmarks/recommend
"""


RUN_DESCRIPTION = """\
Load-test a target: a recserve server, or one of another protocol (OpenAI-compatible or TEI embeddings over
HTTP, KServe v2 over gRPC), named by its URL: closed loop (N callers) or open loop (a fixed or Poisson
schedule, latency from the scheduled send time), with a recserve server's own metrics beside the client's
figures. The target is checked (recserve: health + Info; others: their readiness and one probe call)
before any load is sent."""
SUITE_DESCRIPTION = """\
The standard benchmark of a model repository on this machine: the raw in-process limit, then servers it
starts itself (batching on, batching off) under closed- and open-loop sweeps; writes the JSON, the plots
and a Markdown summary (BENCHMARKS.md)."""


def _add_load_flags(p: argparse.ArgumentParser, duration: float, warmup: float) -> None:
    g = p.add_argument_group("each step")
    g.add_argument(
        "--warmup", type=float, default=warmup, help=f"seconds of warm-up per step (default {warmup:g})"
    )
    g.add_argument(
        "--duration",
        type=float,
        default=duration,
        help=f"seconds per measurement window (default {duration:g})",
    )
    g.add_argument(
        "--max-windows", type=int, default=3, help="windows per step until throughput is stable (3)"
    )
    g.add_argument(
        "--tolerance", type=float, default=0.05, help="stable: two windows within this fraction (0.05)"
    )
    g.add_argument("--deadline", type=float, default=10.0, help="gRPC deadline of each call, seconds (10)")
    g.add_argument("--max-calls", type=int, default=1_000_000, help="hard cap on calls per step (1000000)")
    g.add_argument("--max-in-flight", type=int, default=4096, help="open loop: cap on calls in flight (4096)")


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (reproducible from --seed)")
    g.add_argument(
        "--workload",
        default="mix",
        help="token lengths: mix (log-normal, mean ~36, 4..200), query, title, description, fixed:N, "
        "or file:PATH (one text per line, or JSONL with a text field) (default mix)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of texts, RPC mix and Poisson arrivals (0)")
    g.add_argument("--encoding", choices=("f16", "f32", "float"), default="f16", help="Embed vectors (f16)")


# The soak's mixed workload: mostly Embed, with Score against a text query and against a user history.
MIXED_RPC = "embed=0.6,score=0.3,history=0.1"
OVERLOAD_DESCRIPTION = """\
What a target does past its capacity: capacity first (a closed loop of 64 callers, one text a call), then
open-loop steps (Poisson) at multiples of it with a per-call deadline, each reporting goodput (OK answers
within the deadline), the calls by status, the latency of OK, refused and admitted calls and the server's
RSS; then a one-text caller beside a stream of 2,000-text calls. The issue's targets are met/missed rows."""
SOAK_DESCRIPTION = """\
A long open loop below capacity with a mixed workload (not CI: `make bench-soak`): the server's RSS, open
file descriptors and threads before and after, and the latency of the first window against the last."""


def _add_server_flags(p: argparse.ArgumentParser, cores: int) -> None:
    g = p.add_argument_group("server (one of --target and --model-repo)")
    g.add_argument("--target", help="HOST:PORT speaking recserve.v1 (127.0.0.1:50051)")
    g.add_argument("--pid", type=int, help="with --target: the server's process id here, for /proc readings")
    g.add_argument(
        "--metrics-url",
        default="auto",
        help="with --target: its Prometheus endpoint; auto = http://HOST:8000/metrics if it answers; none",
    )
    g.add_argument("--model-repo", type=Path, help="start a local server of this repository instead")
    g.add_argument("--threads", type=int, default=cores, help=f"ORT threads of the local server ({cores})")


def _add_capacity_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity")
    g.add_argument("--capacity", type=float, help="calls/s to take as the capacity instead of measuring it")
    g.add_argument("--capacity-callers", type=int, default=64, help="closed-loop callers measuring it (64)")
    g.add_argument("--capacity-duration", type=float, default=5.0, help="seconds of its window (5)")


def _configure_overload(sub: Any, cores: int) -> None:
    p = sub.add_parser(
        "overload", help="goodput and refusals past capacity, fairness", description=OVERLOAD_DESCRIPTION
    )
    _add_server_flags(p, cores)
    _add_capacity_flags(p)
    g = p.add_argument_group("levels")
    g.add_argument("--levels", default="1,1.5,2,3", help="open-loop rates, multiples of capacity (1,1.5,2,3)")
    g.add_argument("--deadline", type=float, default=2.0, help="gRPC deadline of each call, seconds (2)")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per step (2)")
    g.add_argument("--duration", type=float, default=10.0, help="seconds of each level's window (10)")
    g.add_argument("--max-in-flight", type=int, default=4096, help="cap on calls in flight (4096)")
    f = p.add_argument_group("fairness probe")
    f.add_argument("--probe-texts", type=int, default=2000, help="texts per big Embed call (2000)")
    f.add_argument("--probe-callers", type=int, default=3, help="callers sending big calls (3)")
    f.add_argument("--probe-duration", type=float, default=10.0, help="seconds one-text calls are timed (10)")
    f.add_argument("--probe-deadline", type=float, default=60.0, help="deadline of the probe's calls (60)")
    f.add_argument("--no-probe", action="store_true", help="skip the fairness probe")
    _add_workload_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("bench-out/overload"), help="JSON, logs (bench-out/...)")
    o.add_argument("--markdown", type=Path, help="Markdown summary path (OUT/summary.md)")
    o.add_argument("--quiet", action="store_true", help="no live progress line")


def _configure_soak(sub: Any, cores: int) -> None:
    p = sub.add_parser("soak", help="a long run below capacity: leaks, drift", description=SOAK_DESCRIPTION)
    _add_server_flags(p, cores)
    _add_capacity_flags(p)
    g = p.add_argument_group("load")
    g.add_argument("--fraction", type=float, default=0.7, help="open-loop rate, a fraction of capacity (0.7)")
    g.add_argument("--minutes", type=float, default=10.0, help="length of the soak (10)")
    g.add_argument("--window", type=float, default=60.0, help="seconds per window; first vs last (60)")
    g.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up before the first window (5)")
    g.add_argument("--deadline", type=float, default=2.0, help="gRPC deadline of each call, seconds (2)")
    g.add_argument("--max-in-flight", type=int, default=4096, help="cap on calls in flight (4096)")
    g.add_argument("--rpc", default=MIXED_RPC, help=f"the RPC mix ({MIXED_RPC})")
    _add_workload_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("bench-out/soak"), help="JSON, Markdown (bench-out/soak)")
    o.add_argument("--quiet", action="store_true", help="no live progress line")


FLEET_DESCRIPTION = """\
Local replicas of a model repository behind one round-robin client: 1, 2, ... N replicas, a closed loop
each (aggregate texts/s, each replica's calls and CPU) and a paper model of bigger nodes; then one replica
under a load step (idle, a multiple of its capacity, idle) with its backlog gauge over time and when the
shipped HPA (deploy/) would have scaled. Writes fleet.json, FLEET.md and backlog.png to --out."""


def _configure_fleet(sub: Any, cores: int) -> None:
    p = sub.add_parser(
        "fleet",
        help="replicas behind one client; the backlog under a load step",
        description=FLEET_DESCRIPTION,
    )
    p.add_argument("--model-repo", type=Path, required=True, help="model repository the replicas serve")
    g = p.add_argument_group("replicas")
    g.add_argument("--replicas", type=int, default=3, help="measure 1, 2, ... up to this many replicas (3)")
    g.add_argument("--callers", type=int, default=64, help="closed-loop callers through the one client (64)")
    g.add_argument("--threads", type=int, default=cores, help=f"ORT threads of each replica ({cores})")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per replica count (2)")
    g.add_argument("--duration", type=float, default=10.0, help="seconds of each count's window (10)")
    g.add_argument(
        "--model-cores", default="4,8,16,32", help="cores of the nodes in the paper model (4,8,16,32)"
    )
    s = p.add_argument_group("load step (one replica)")
    s.add_argument("--level", type=float, default=2.0, help="rate, a multiple of one replica's capacity (2)")
    s.add_argument("--idle", type=float, default=5.0, help="seconds idle before and after the step (5)")
    s.add_argument("--step-duration", type=float, default=20.0, help="seconds of the step (20)")
    s.add_argument("--step-deadline", type=float, default=2.0, help="gRPC deadline of the step's calls (2)")
    s.add_argument("--scrape-every", type=float, default=0.5, help="seconds between backlog scrapes (0.5)")
    h = p.add_argument_group("HPA model")
    h.add_argument(
        "--deploy-dir",
        type=Path,
        default=Path("deploy"),
        help="manifests: base/hpa.yaml, the ServiceMonitor, the adapter rule (deploy)",
    )
    h.add_argument("--sync-period", type=float, default=15.0, help="HPA controller sync period, s (15)")
    _add_workload_flags(p)
    o = p.add_argument_group("output")
    o.add_argument(
        "--out", type=Path, default=Path("bench-out/fleet"), help="fleet.json, FLEET.md, backlog.png"
    )
    o.add_argument("--markdown", type=Path, help="Markdown summary path (OUT/FLEET.md)")
    o.add_argument("--quiet", action="store_true", help="no live progress line")


GPU_CHECK_DESCRIPTION = """\
Issue 14's GPU check, on a machine with a CUDA GPU and onnxruntime-gpu (a few minutes): fp16 parity on the
CUDA provider for every parity text against the fp32 variant on the CPU (and the PyTorch reference where it
is here), batch invariance, that the server's runner uses IO binding, the raw fp16 throughput and the served
throughput at 64 callers. Writes gpu-check.json and GPU-CHECK.md; refuses in one line (exit 2) without a
CUDA provider or a GPU. --device cpu is a dry run of the same steps on the CPU provider."""


def _configure_recommend(sub: Any, cores: int) -> None:
    from recserve.benchmarks import recommend_bench

    p = sub.add_parser(
        "recommend",
        help="catalog build against the raw limit; Recommend with and without rerank",
        description=(recommend_bench.__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-repo", type=Path, required=True, help="the embedding model's repository")
    p.add_argument(
        "--cross-repo",
        type=Path,
        help="a cross-encoder repository for rerank (default: a random one of the embedder's shape, exported"
        " once under --out)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/recommend"), help="RECOMMEND.md, JSON, logs")
    p.add_argument("--items", type=int, default=4000, help="catalog items (4000)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per served step (10)")
    p.add_argument("--threads", type=int, default=cores, help=f"ORT threads, server and in process ({cores})")
    p.add_argument(
        "--sizes",
        default="100000,1000000",
        help="synthetic catalog sizes served for the large-catalog step; empty skips it (%(default)s)",
    )


def _configure_gpu_check(sub: Any, cores: int) -> None:
    p = sub.add_parser(
        "gpu-check", help="fp16 on CUDA: parity, IO binding, throughput", description=GPU_CHECK_DESCRIPTION
    )
    p.add_argument(
        "--model-repo", type=Path, required=True, help="model repository with fp16 and fp32 variants"
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench-out/gpu"), help="gpu-check.json, GPU-CHECK.md, logs"
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default); cpu: a dry run of the steps on the CPU provider, not a GPU's figures",
    )
    p.add_argument("--callers", type=int, default=64, help="closed-loop callers of the served step (64)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up of the served step (5)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the served step's window (20)")
    p.add_argument("--threads", type=int, default=cores, help=f"ORT threads, server and in process ({cores})")
    p.add_argument(
        "--reference",
        default="auto",
        help="the PyTorch reference: auto (the manifest's checkpoint, where torch and it are here), none, "
        "or a checkpoint DIR (auto)",
    )
    _add_workload_flags(p)
    p.add_argument("--quiet", action="store_true", help="no live progress line")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(
        dest="bench_command", required=True, metavar="{run,suite,overload,soak,fleet,gpu-check,recommend}"
    )
    cores = os.cpu_count() or 1

    run = sub.add_parser(
        "run",
        help="load-test a target",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.epilog = EXAMPLES
    t = run.add_argument_group("target")
    t.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="recserve: HOST:PORT or grpc://HOST:PORT; others: openai+http://HOST:PORT (POST "
        "/v1/embeddings), tei+http://HOST:PORT (POST /embed), kserve-v2://HOST:PORT (127.0.0.1:50051)",
    )
    t.add_argument(
        "--model",
        help="the served model to call: recserve (default: the server's default), openai+http and kserve-v2 "
        "(default: the only one it lists)",
    )
    t.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    t.add_argument(
        "--tls-ca", "--root-cert", dest="root_cert", type=Path, help="PEM CA bundle for TLS (implies --tls)"
    )
    t.add_argument("--tls-cert", type=Path, help="PEM client certificate for mutual TLS (with --tls-key)")
    t.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    t.add_argument("--token-file", type=Path, help="file with the bearer token the target wants")
    t.add_argument(
        "--metrics-url",
        default="auto",
        help="the server's Prometheus endpoint; auto = http://HOST:8000/metrics if it answers; none = skip",
    )
    m = run.add_argument_group("load")
    m.add_argument(
        "--mode", choices=("closed", "open"), default="closed", help="closed or open loop (closed)"
    )
    m.add_argument("--concurrency", help="closed loop: callers per step, comma-separated (1,4,16,64)")
    m.add_argument("--rate", help="open loop: calls/s per step, comma-separated (required with --mode open)")
    m.add_argument("--arrival", choices=("poisson", "fixed"), help="open loop: arrival process (poisson)")
    m.add_argument(
        "--rpc",
        default="embed",
        help="embed, score (a query and K candidates), history (a user history of H items and K candidates), "
        "or a weighted mix such as embed=0.8,score=0.2 (embed)",
    )
    m.add_argument("--texts-per-call", type=int, help="Embed: texts per call (1)")
    m.add_argument("--candidates", type=int, help="Score: candidates K per call (16)")
    m.add_argument("--history", type=int, help="history: user history items H per call (8)")
    _add_workload_flags(run)
    _add_load_flags(run, duration=5.0, warmup=2.0)
    b = run.add_argument_group("baselines")
    b.add_argument("--model-repo", type=Path, help="also measure the raw limit of this model in process")
    b.add_argument(
        "--batching-off", action="store_true", help="also run the steps on a local server with batching off"
    )
    b.add_argument(
        "--threads", type=int, default=cores, help=f"ORT threads of the raw limit and local servers ({cores})"
    )
    o = run.add_argument_group("output")
    o.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="directory for JSON, plots, logs (bench-out)"
    )
    o.add_argument("--markdown", type=Path, help="Markdown summary path (OUT/summary.md)")
    o.add_argument("--quiet", action="store_true", help="no live progress line")

    suite = sub.add_parser(
        "suite",
        help="the standard benchmark of a model repository (make bench)",
        description=SUITE_DESCRIPTION,
    )
    suite.add_argument("--model-repo", type=Path, required=True, help="model repository to serve and measure")
    suite.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON, plots, logs")
    suite.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"), help="summary (BENCHMARKS.md)")
    suite.add_argument("--concurrency", default="1,4,16,64,256", help="closed-loop sweep (1,4,16,64,256)")
    suite.add_argument(
        "--open-fractions",
        default="0.25,0.5,0.6,0.7,0.8,0.9,1.0,1.1",
        help="open-loop rates as fractions of the closed-loop peak (0.25,...,1.1)",
    )
    suite.add_argument("--compare", default="1,64", help="callers for batching on against off (1,64)")
    suite.add_argument(
        "--threads", type=int, default=cores, help=f"ORT threads, server and raw limit ({cores})"
    )
    suite.add_argument(
        "--raw-repeats", type=int, default=3, help="passes of the raw limit; the median counts (3)"
    )
    suite.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="paired rounds (a raw pass, then a window per server) behind the efficiency figure (6)",
    )
    suite.add_argument(
        "--singles",
        type=int,
        default=200,
        help="texts timed one by one: the raw single latency, and the interleaved lone calls (200)",
    )
    suite.add_argument(
        "--p99-target-ms", type=float, default=100.0, help="p99 bound of the open-loop figure (100)"
    )
    suite.add_argument("--quiet", action="store_true", help="no live progress line")
    suite.add_argument("--no-overload", action="store_true", help="skip the overload section")
    suite.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also measure a running server of any protocol `bench run --target` takes, under NAME "
        "(e.g. tei=openai+http://127.0.0.1:8080); repeat for more",
    )
    _add_workload_flags(suite)
    _add_load_flags(suite, duration=5.0, warmup=2.0)
    _configure_overload(sub, cores)
    _configure_soak(sub, cores)
    _configure_fleet(sub, cores)
    _configure_gpu_check(sub, cores)
    _configure_recommend(sub, cores)
    parser.set_defaults(_bench_argv=None)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from recserve.benchmarks import flags
    from recserve.benchmarks.config import EXIT_TARGET, EXIT_USAGE, ConfigError
    from recserve.benchmarks.servers import ServerStartError
    from recserve.benchmarks.targets import TargetError

    try:
        if args.bench_command == "run":
            from recserve.benchmarks.execute import execute

            return asyncio.run(execute(flags.run_config(args, args._bench_argv)))
        if args.bench_command == "overload":
            from recserve.benchmarks.overload import run_overload

            return asyncio.run(run_overload(flags.overload_config(args, args._bench_argv)))
        if args.bench_command == "soak":
            from recserve.benchmarks.soak import run_soak

            return asyncio.run(run_soak(flags.soak_config(args, args._bench_argv)))
        if args.bench_command == "fleet":
            from recserve.benchmarks.fleet import run_fleet

            return asyncio.run(run_fleet(flags.fleet_config(args, args._bench_argv)))
        if args.bench_command == "gpu-check":
            from recserve.benchmarks.gpu_check import Refusal, run_gpu_check

            try:
                return asyncio.run(run_gpu_check(flags.gpu_check_config(args, args._bench_argv)))
            except Refusal as exc:
                print(f"recserve bench gpu-check: {exc}", file=sys.stderr)
                return EXIT_USAGE
        if args.bench_command == "recommend":
            from recserve.benchmarks.recommend_bench import RecommendBenchConfig, run_recommend_bench

            sizes = tuple(int(size) for size in args.sizes.split(",") if size.strip())
            cfg = RecommendBenchConfig(
                args.model_repo,
                args.out,
                args.cross_repo,
                args.items,
                args.seconds,
                args.threads,
                sizes=sizes,
            )
            run_recommend_bench(cfg, flags.command_line(args._bench_argv))
            return 0
        from recserve.benchmarks.suite import run_suite

        return asyncio.run(run_suite(flags.suite_config(args, args._bench_argv)))
    except ConfigError as exc:
        print(f"recserve bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TargetError, ServerStartError) as exc:
        print(f"recserve bench: {exc}", file=sys.stderr)
        return EXIT_TARGET
    except KeyboardInterrupt:
        print("recserve bench: interrupted", file=sys.stderr)
        return 130
