"""The seam between the serving core and a model: what the engine, batcher and app need of it, nothing more.

`recserve.server.runtime` implements it with ONNX Runtime and the repository's fast tokenizer;
`tests/support/fake_model.py` implements it with deterministic vectors, so the gRPC, lifecycle and batcher
tests need no exported model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from recserve.manifest import Manifest
from recserve.tensors import Encoded, FloatArray


class Tokenizer(Protocol):
    """Tokenises for the model, truncating at its max length, never padding; called from worker threads
    (and from the loop for a short call while the model is idle)."""

    def encode(self, texts: Sequence[str]) -> list[Encoded]: ...

    def encode_pairs(self, query: str, candidates: Sequence[str]) -> list[Encoded]:
        """(query, candidate) pairs, for a cross-encoder."""
        ...


class Backend(Protocol):
    """Runs one batch, blocking, in one of `concurrent_batches` executor threads."""

    @property
    def precision(self) -> str:
        """The variant running ("fp32", ...), for Info and metrics."""
        ...

    @property
    def provider(self) -> str:
        """The execution provider in use, for Info and metrics."""
        ...

    @property
    def concurrent_batches(self) -> int:
        """How many batches may run at once."""
        ...

    @property
    def verified_sha256(self) -> str | None:
        """sha256 of the served model file, computed at load and equal to the manifest's; None when not
        verified (skipped, or a model without a file), for Info."""
        ...

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        """One row per item of `batch`, in order: the pooled (not normalised) vector, or the logits."""
        ...

    def warm_up(self, batch: Sequence[Encoded]) -> None:
        """Runs `batch` once, before the server says SERVING, so the first real calls are not slow."""
        ...

    def stop_running(self) -> None:
        """Makes the batches running now fail soon (thread-safe), for a shutdown past its grace period."""
        ...


@dataclass(frozen=True)
class Model:
    """A loaded model: what it is (the manifest), how texts become tokens, and what runs them."""

    manifest: Manifest
    tokenizer: Tokenizer
    backend: Backend
