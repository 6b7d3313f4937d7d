"""The two ways an export ends early; export/command.py gives each its exit code."""

from __future__ import annotations


class ExportError(Exception):
    """Bad input (a path, a checkpoint, a flag): one line for the user, no traceback (exit 2)."""


class ParityFailure(Exception):
    """A variant (or the tokenizer) drifted from the PyTorch reference; the message names it (exit 1)."""
