"""Plain data passed between the layers: a tokenised text and the backend contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenised text (or text pair), special tokens included, not padded."""

    ids: IntArray
    type_ids: IntArray
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class Backend(Protocol):
    """What the batcher needs from a model: run one batch, blocking, in an executor thread."""

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        """Returns one row per item of `batch`, in order: a pooled vector or the logits."""
        ...
