"""Reads a model repository the way a server does: onnxruntime, tokenizers, numpy; no torch or export code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recserve.manifest import Precision
from recserve.runner import TextRunner
from recserve.tensors import Item


def run_repository(
    repo: Path, items: Sequence[Item], variant: Precision = "fp32", batch: int = 32
) -> np.ndarray:
    """Vectors (embedding) or logits (cross-encoder) for `items`, in batches padded to their longest."""
    return TextRunner.of_repository(repo, variant)(items, batch_size=batch)
