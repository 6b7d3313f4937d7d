"""Structured logs: one line per event, JSON or key=value, carrying the `extra` fields (request id, ...).

Library warnings (`warnings.warn`) and exceptions nobody caught (main thread, other threads, unraisable
ones) go through the same handler, so every line the server writes to stderr stays machine-readable.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from types import TracebackType
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=` and is printed.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

log = logging.getLogger("recserve.uncaught")


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            exc_type, exc, _ = record.exc_info
            if exc_type is not None:
                fields["exc_type"] = exc_type.__name__
                fields["exc_message"] = str(exc)
            # The traceback stays inside this one line: JSON escapes its newlines (and _value() quotes it).
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_value(v)}" for k, v in fields.items())


def _value(value: object) -> object:
    """A key=value value: quoted (JSON) when it holds whitespace, so a multi-line text stays on one line."""
    if isinstance(value, str) and any(c.isspace() for c in value):
        return json.dumps(value)
    return value


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning, as one log line instead of two raw lines on stderr."""
    logging.getLogger("py.warnings").warning(
        str(message), extra={"category": category.__name__, "source": f"{filename}:{lineno}"}
    )


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    log.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    thread = args.thread.name if args.thread is not None else None
    log.error(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"in_thread": thread},
    )


def _unraisable(args: Any) -> None:  # sys.UnraisableHookArgs is not a public type
    if args.exc_value is None:
        return
    log.error(
        args.err_msg or "exception ignored",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"object": repr(args.object)},
    )


def configure_logging(fmt: str, level: str) -> None:
    """One handler on the root logger, writing one line per event to stderr; routes warnings and stray
    exceptions to it.

    NOTE: asyncio's default loop exception handler already logs through the `asyncio` logger, so the
    server sets none of its own. What native libraries (ONNX Runtime, gRPC core) print to the file
    descriptor directly does not pass through Python and cannot be routed here.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    warnings.showwarning = _show_warning
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable
