"""`recserve serve`: flags map one-to-one onto ServerSettings fields and RECSERVE_* environment variables."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from recserve.server.settings import ServerSettings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Every flag can also be set as an environment variable RECSERVE_<FLAG_NAME>; flags win."
    for name, field in ServerSettings.model_fields.items():
        annotation = field.annotation
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {default})"
        choices = None
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(args)
        if annotation is bool:
            parser.add_argument(
                _flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        parser.add_argument(
            _flag(name),
            default=argparse.SUPPRESS,
            choices=choices,
            required=False,
            metavar=None if choices else name.upper(),
            help=help_text,
        )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from recserve.manifest import ManifestError
    from recserve.server.logs import configure_logging
    from recserve.server.runtime import RuntimeSelectionError

    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _flag(str(first["loc"][0])) if first["loc"] else "settings"
        print(f"recserve serve: {where}: {first['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    from recserve.server.app import serve

    try:
        return asyncio.run(serve(settings))
    except (ManifestError, RuntimeSelectionError, OSError) as exc:
        print(f"recserve serve: {exc}", file=sys.stderr)
        return 2
