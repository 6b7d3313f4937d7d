"""Runs `recserve export` in-process (the export command only, so other subcommands need not import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recserve.export import command


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recserve export")
    command.configure(parser)
    return parser


def run_export(*argv: str | Path) -> int:
    return command.run(export_parser().parse_args([str(a) for a in argv]))
