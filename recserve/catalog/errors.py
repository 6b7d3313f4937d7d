"""The catalog's errors: what a build or an open refuses (one line each, for the command and the server's
start-up), and what a search refuses (ServeError subclasses, so the transport maps them to status codes).
"""

from __future__ import annotations

from collections.abc import Sequence

from recserve.server.errors import InvalidArgument, ServeError


class CatalogError(Exception):
    """A catalog cannot be built or opened; the message says what and where, in one line."""


class ItemsError(CatalogError):
    """The items file is not a valid catalog source (the message names the line)."""


class CatalogFormatError(CatalogError):
    """A catalog directory is missing, truncated, corrupt or of another format (the message names a file)."""


class ModelMismatch(CatalogError):
    """The catalog was embedded by another model than the one that would query it."""


class InvalidQuery(InvalidArgument):
    """A search that cannot be answered as asked: k out of range, a bad filter, a query of the wrong shape."""


class UnknownIds(ServeError, LookupError):
    """Ids the catalog does not hold. A LookupError (as a KeyError is), and NOT_FOUND to a gRPC caller."""

    code = "NOT_FOUND"
    reason = "not_found"

    # How many unknown ids the message lists; `ids` holds them all.
    SHOWN = 5

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[: self.SHOWN])
        more = len(self.ids) - self.SHOWN
        super().__init__(
            f"{len(self.ids)} id(s) not in the catalog: {shown}" + (f" (and {more} more)" if more > 0 else "")
        )
