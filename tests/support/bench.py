"""`recserve bench ...` in the test's process, through the real argument parser, as the CLI runs it."""

from __future__ import annotations

import argparse

from recserve.benchmarks import command


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recserve bench")
    command.configure(parser)
    args = parser.parse_args(argv)
    args._bench_argv = ["bench", *argv]
    return command.run(args)
