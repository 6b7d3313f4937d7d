"""The one path from tokens to vectors, in numpy: the shared types, padding into feeds, pooling, norms.

The server, the export's parity gate and the tests all go through these functions (via recserve.runner),
so what the gate measures is what serving computes.

NOTE: pooling runs here, not inside the ONNX graph: one exported graph then serves every pooling mode the
manifest may name, ONNX Runtime's transformer fusion matches the plain encoder unchanged, and normalisation
is a per-call option anyway. The cost is copying [batch, seq, hidden] floats out of the session instead of
[batch, hidden]: a few MB per batch, small next to the encoder's own work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from recserve.manifest import Pooling

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
# What a model takes: a text, or a (query, candidate) pair for a cross-encoder.
Item = str | tuple[str, str]
# ONNX graph inputs by name: input_ids, attention_mask and (for BERT) token_type_ids, [batch, longest].
Feeds = dict[str, IntArray]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenised text (or text pair), special tokens included, not padded."""

    ids: IntArray
    type_ids: IntArray
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class TokenizerEncoding(Protocol):
    """The part of a `tokenizers.Encoding` that becomes an Encoded."""

    @property
    def ids(self) -> list[int]: ...
    @property
    def type_ids(self) -> list[int]: ...
    @property
    def overflowing(self) -> list[object]: ...


def encoded(encoding: TokenizerEncoding) -> Encoded:
    """A fast tokenizer's output as the batcher queues it; `overflowing` is non-empty when it truncated."""
    return Encoded(
        ids=np.asarray(encoding.ids, dtype=np.int64),
        type_ids=np.asarray(encoding.type_ids, dtype=np.int64),
        truncated=bool(encoding.overflowing),
    )


def pad(batch: Sequence[Encoded], pad_token_id: int, inputs: Sequence[str]) -> tuple[Feeds, IntArray]:
    """Right-pads `batch` to its longest item: the graph's feeds (only the names in `inputs`) and the mask."""
    longest = max(item.length for item in batch)
    ids = np.full((len(batch), longest), pad_token_id, dtype=np.int64)
    types = np.zeros((len(batch), longest), dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, item in enumerate(batch):
        ids[row, : item.length] = item.ids
        types[row, : item.length] = item.type_ids
        mask[row, : item.length] = 1
    named = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: named[name] for name in inputs}, mask


def pool(hidden: FloatArray, mask: IntArray, mode: Pooling) -> FloatArray:
    """[batch, seq, hidden] token states and a [batch, seq] attention mask -> [batch, hidden] float32."""
    hidden = hidden.astype(np.float32, copy=False)
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0, :])
    keep = mask[:, :, None].astype(bool)
    if mode == "max":
        # Padded positions must never win the max, so they are set to -inf before reducing.
        pooled: FloatArray = np.where(keep, hidden, -np.inf).max(axis=1).astype(np.float32)
        return pooled
    summed = np.einsum("bsh,bs->bh", hidden, mask.astype(np.float32))
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
    mean: FloatArray = (summed / counts).astype(np.float32)
    return mean


def l2_normalize(vectors: FloatArray, eps: float = 1e-12) -> FloatArray:
    """Rows scaled to unit length; an all-zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit: FloatArray = (vectors / np.maximum(norms, eps)).astype(np.float32)
    return unit
