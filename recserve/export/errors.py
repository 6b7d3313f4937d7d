"""The two ways an export ends early, each with its own exit code."""

from __future__ import annotations


class ExportError(Exception):
    """Bad input (a path, a checkpoint, a flag): one line for the user, exit code 2, no traceback."""

    exit_code = 2


class ParityFailure(Exception):
    """A variant (or the tokenizer) drifted from the PyTorch reference: exit code 1, message names it."""

    exit_code = 1
