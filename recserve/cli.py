"""The `recserve` command: `export`, `serve`, `bench` and `health` subcommands.

Each subcommand lives in its own module (`recserve.<pkg>.command`, or `recserve.health`) with
`configure(parser)` and `run(args) -> int`; only the chosen one runs, so `serve` never pays for (or needs)
torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from recserve import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "export": ("recserve.export.command", "Hugging Face checkpoint -> ONNX model repository"),
    "serve": ("recserve.server.command", "serve a model repository over gRPC"),
    "bench": ("recserve.benchmarks.command", "load-test a server and write a report"),
    "index": ("recserve.catalog.command", "embed a JSON Lines file of items into a catalog for Recommend"),
    "health": ("recserve.health", "ask a server's grpc.health.v1 for its status; exit 0 when SERVING"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"recserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).configure(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = importlib.import_module(args._module).run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
