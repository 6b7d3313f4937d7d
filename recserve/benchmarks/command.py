"""`recserve bench`: `run` load-tests any target that speaks the recserve API; `suite` benchmarks a model
repository on this machine and writes BENCHMARKS.md.

`configure` imports nothing beyond argparse: `recserve --help` and `recserve serve` never pay for the harness.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXAMPLES = """examples:
  recserve bench run --target 127.0.0.1:50051 --mode closed --concurrency 1,4,16,64 --duration 10
  recserve bench run --mode open --rate 50,100,200 --arrival poisson --workload title --out bench-out
  recserve bench run --rpc score --candidates 32 --workload query --mode closed --concurrency 8
  recserve bench run --model-repo models/all-MiniLM-L6-v2 --batching-off   # + raw limit, batching off
  recserve bench suite --model-repo models/all-MiniLM-L6-v2 --out benchmarks/results --markdown BENCHMARKS.md
"""


RUN_DESCRIPTION = """\
Load-test any target that speaks the recserve v1 API: closed loop (N callers) or open loop (a fixed or
Poisson schedule, latency from the scheduled send time), with the server's own metrics beside the client's
figures. The target is checked (health + Info) before any load is sent."""
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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{run,suite}")
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
        "--target", default="127.0.0.1:50051", help="HOST:PORT speaking recserve.v1 (127.0.0.1:50051)"
    )
    t.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --root-cert)")
    t.add_argument("--root-cert", type=Path, help="PEM root certificates for TLS (implies --tls)")
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
        default="0.25,0.5,0.7,0.8,0.9,1.0,1.1",
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
    _add_workload_flags(suite)
    _add_load_flags(suite, duration=5.0, warmup=2.0)
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
