"""Pooling of encoder token states into one vector per text, and L2 normalisation (numpy only).

NOTE: pooling runs here, in the server, not inside the ONNX graph: one exported graph then serves every
pooling mode the manifest may name, ONNX Runtime's transformer fusion matches the plain encoder unchanged,
and normalisation is a per-call option anyway. The cost is copying [batch, seq, hidden] floats out of the
session instead of [batch, hidden]: a few MB per batch, small next to the encoder's own work.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from recserve.manifest import Pooling

FloatArray = npt.NDArray[np.float32]


def pool(hidden: FloatArray, mask: npt.NDArray[np.int64], mode: Pooling) -> FloatArray:
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
