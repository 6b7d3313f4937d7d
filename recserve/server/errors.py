"""The server's error taxonomy. The transport maps each class to one gRPC status code (server/service.py)."""

from __future__ import annotations


class ServeError(Exception):
    """Base of the errors a caller may see; the message is safe to send to the client."""

    # The failure reason label used by metrics (recserve_failures_total{reason=...}).
    reason = "internal"


class InvalidArgument(ServeError):
    reason = "invalid"


class NotFound(ServeError):
    reason = "not_found"


class Overloaded(ServeError):
    """The bounded queue is full: fail fast, the caller should back off or go elsewhere."""

    reason = "overloaded"


class DeadlineExceeded(ServeError):
    reason = "deadline"


class Cancelled(ServeError):
    reason = "cancelled"


class Unavailable(ServeError):
    """Draining, not yet warm, or the batch loop died."""

    reason = "unavailable"


class Internal(ServeError):
    """A bug or a runtime failure; the client gets a generic message, the details go to the log."""

    reason = "internal"
