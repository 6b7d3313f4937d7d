"""Runs an exported graph the way the server will: shipped tokenizer, right padding, ORT, shared pooling.

The parity gate and the fused-vs-plain timing both go through here, so what they measure is what serving
computes: the repository's own tokenizer.json, int64 inputs padded to the longest item of the batch, and
`recserve.pooling` for pooling and normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recserve.manifest import Pooling, Task
from recserve.pooling import l2_normalize, pool

FloatArray = npt.NDArray[np.float32]
Item = str | tuple[str, str]
Feeds = dict[str, npt.NDArray[np.int64]]


@dataclass(frozen=True)
class GraphSpec:
    """The manifest fields that decide how a graph is fed and how its output becomes a result."""

    task: Task
    inputs: tuple[str, ...]
    output_name: str
    pooling: Pooling | None
    normalize: bool
    pad_token_id: int


class Encoder:
    """One ONNX Runtime session plus the shipped tokenizer."""

    def __init__(
        self, model: Path, tokenizer_file: Path, spec: GraphSpec, provider: str = "CPUExecutionProvider"
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.spec = spec
        self.provider = provider
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the fp16 graph on CPU logs a warning per inserted cast
        self.session = ort.InferenceSession(str(model), options, providers=[provider])

    def feeds(self, items: Sequence[Item]) -> tuple[Feeds, npt.NDArray[np.int64]]:
        encodings = self.tokenizer.encode_batch(list(items))
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
            types[row, : len(e.ids)] = e.type_ids
        named = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: named[name] for name in self.spec.inputs}, mask

    def run_feeds(self, feeds: Feeds) -> Any:
        return self.session.run([self.spec.output_name], feeds)[0]

    def __call__(self, items: Sequence[Item]) -> FloatArray:
        """One batch -> [len(items), dim] vectors (pooled, normalised if configured) or logits, float32."""
        feeds, mask = self.feeds(items)
        out = np.asarray(self.run_feeds(feeds), dtype=np.float32)
        if self.spec.task == "cross-encoder":
            return out
        assert self.spec.pooling is not None
        vectors = pool(out, mask, self.spec.pooling)
        return l2_normalize(vectors) if self.spec.normalize else vectors

    def token_ids(self, items: Sequence[Item]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(items))]
