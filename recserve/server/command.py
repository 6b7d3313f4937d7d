"""`recserve serve`: flags map one-to-one onto ServerSettings fields and RECSERVE_* environment variables."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from typing import Any

from pydantic.fields import FieldInfo

from recserve.server.settings import ServerSettings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Every flag can also be set as an environment variable RECSERVE_<FLAG_NAME>; flags win."
    for name, field in ServerSettings.model_fields.items():
        annotation = field.annotation
        default = field.get_default(call_default_factory=True)
        # NOTE: argparse formats help with %; a literal one must be doubled.
        help_text = f"{field.description} (default: {default})".replace("%", "%%")
        choices = None
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(args)
        if annotation is bool:
            parser.add_argument(
                _flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        if typing.get_origin(annotation) is list:
            parser.add_argument(
                _flag(name), action="append", default=argparse.SUPPRESS, metavar=name.upper(), help=help_text
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

    from recserve.catalog.errors import CatalogError
    from recserve.manifest import ManifestError
    from recserve.server.logs import configure_logging
    from recserve.server.security import SecurityError

    try:
        from recserve.server.runtime import RuntimeSelectionError
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        # NOTE: the base install names no runtime, so that the CPU and GPU builds never meet in one venv.
        print(
            "recserve serve: onnxruntime is not installed: pip install 'recserve[cpu]' (or 'recserve[gpu]')",
            file=sys.stderr,
        )
        return 2

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
        code = asyncio.run(serve(settings))
    except (ManifestError, CatalogError, RuntimeSelectionError, SecurityError, OSError) as exc:
        print(f"recserve serve: {exc}", file=sys.stderr)
        return 2
    # NOTE: the server has stopped and said so, and nothing it holds needs tearing down. The interpreter's
    # exit would join the model's threads first, and after a grace period that ran out one may still be
    # inside its last operator: with a 1 s grace the exit came 1.1-2.2 s after SIGTERM on a 2-core VM, and
    # 1.07 s without the join.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The generated settings table in docs/serving.md sits between these markers (`make docs` rewrites it).
SETTINGS_BEGIN = "<!-- settings:begin -->"
SETTINGS_END = "<!-- settings:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    if field.default_factory is list:
        return "none"
    if field.default_factory is not None:
        # NOTE: calling the factory would print this machine's value (e.g. its core count) into the docs.
        doc = (field.default_factory.__doc__ or "").strip().splitlines()
        return doc[0] if doc else "computed at start-up"
    default = field.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def settings_markdown() -> str:
    """Every ServerSettings field as a Markdown table: flag, environment variable, default, description."""
    prefix = str(ServerSettings.model_config.get("env_prefix", ""))
    rows = ["| flag | environment | default | what it is for |", "|---|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        flag = f"`{_flag(name)}`"
        if field.annotation is bool:
            flag += f" / `--no-{name.replace('_', '-')}`"
        description = field.description or ""
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = typing.get_args(field.annotation)
            description += "; one of " + ", ".join(f"`{choice}`" for choice in choices)
        env = f"`{prefix}{name.upper()}`"
        rows.append(f"| {flag} | {env} | {_cell(_default_text(field))} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def replace_settings_block(document: str) -> str:
    """`document` with the text between the settings markers replaced by a fresh settings_markdown()."""
    head, begin, rest = document.partition(SETTINGS_BEGIN)
    _, end, tail = rest.partition(SETTINGS_END)
    if not begin or not end:
        raise ValueError(f"the document has no {SETTINGS_BEGIN} ... {SETTINGS_END} block")
    return f"{head}{SETTINGS_BEGIN}\n{settings_markdown()}{SETTINGS_END}{tail}"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recserve.server.command", description="Print or rewrite the docs' settings table."
    )
    parser.add_argument("--settings-markdown", action="store_true", required=True, help="the settings table")
    parser.add_argument("--write", metavar="FILE", help="rewrite FILE's marked block instead")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(settings_markdown())
        return 0
    from pathlib import Path

    path = Path(args.write)
    path.write_text(replace_settings_block(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
