"""`recserve bench ...` in the test's process, through the real argument parser, as the CLI runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from recserve.benchmarks import command
from recserve.benchmarks.config import SuiteConfig
from recserve.benchmarks.loadgen import LoadSettings
from recserve.benchmarks.workloads import WorkloadSpec


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recserve bench")
    command.configure(parser)
    args = parser.parse_args(argv)
    args._bench_argv = ["bench", *argv]
    return command.run(args)


def suite_config(tmp_path: Path, **kwargs: object) -> SuiteConfig:
    """A suite of short windows on one thread, writing under `tmp_path`; `kwargs` override the rest."""
    return SuiteConfig(
        model_repo=tmp_path,
        out=tmp_path,
        markdown=tmp_path / "BENCHMARKS.md",
        threads=1,
        load=LoadSettings(warmup_s=0.1, window_s=0.3, max_windows=1),
        workload=WorkloadSpec(),
        **kwargs,  # type: ignore[arg-type]
    )
