"""The server's error taxonomy. Each class carries its gRPC status code's name; the transport (service.py)
looks it up by isinstance, so a new subclass inherits a code and can never miss the mapping.

NOTE: the code is a name, not a `grpc.StatusCode`, so that the batcher and the engine stay free of grpc.
"""

from __future__ import annotations

from typing import ClassVar


class ServeError(Exception):
    """Base of the errors a caller may see; the message is safe to send to the client."""

    # The name of a grpc.StatusCode member.
    code: ClassVar[str] = "INTERNAL"
    # The failure reason label used by metrics (recserve_failures_total{reason=...}).
    reason: ClassVar[str] = "internal"


class InvalidArgument(ServeError):
    code = "INVALID_ARGUMENT"
    reason = "invalid"


class NotFound(ServeError):
    """An unknown model or catalog; the message lists the names that exist."""

    code = "NOT_FOUND"
    reason = "not_found"


class Overloaded(ServeError):
    """No room in the bounded queue: fail fast, the caller should back off or go elsewhere."""

    code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class DeadlineExceeded(ServeError):
    code = "DEADLINE_EXCEEDED"
    reason = "deadline"


class Unavailable(ServeError):
    """Draining, not yet warm, or the batch loop died."""

    code = "UNAVAILABLE"
    reason = "unavailable"


class Internal(ServeError):
    """A bug or a runtime failure; the client gets a generic message, the details go to the log."""
