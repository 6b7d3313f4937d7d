"""Reads a model repository the way a server does: onnxruntime, tokenizers, numpy; no torch or export code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from recserve.manifest import Manifest, Precision
from recserve.pooling import l2_normalize, pool


def run_repository(
    repo: Path, items: Sequence[str] | Sequence[tuple[str, str]], variant: Precision = "fp32", batch: int = 32
) -> np.ndarray:
    """Vectors (embedding) or logits (cross-encoder) for `items`, batched and padded to the longest."""
    manifest = Manifest.load(repo)
    tokenizer = Tokenizer.from_file(str(repo / manifest.tokenizer_file))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(repo / manifest.variants[variant].file), options, providers=["CPUExecutionProvider"]
    )
    out = []
    for start in range(0, len(items), batch):
        encodings = tokenizer.encode_batch(list(items[start : start + batch]))
        width = max(len(e.ids) for e in encodings)
        arrays = {name: np.zeros((len(encodings), width), dtype=np.int64) for name in manifest.inputs}
        arrays["input_ids"][:] = manifest.pad_token_id
        for row, e in enumerate(encodings):
            n = len(e.ids)
            arrays["input_ids"][row, :n] = e.ids
            arrays["attention_mask"][row, :n] = 1
            if "token_type_ids" in arrays:
                arrays["token_type_ids"][row, :n] = e.type_ids
        result = session.run([manifest.output_name], arrays)[0]
        if manifest.task == "embedding":
            assert manifest.pooling is not None
            result = pool(result, arrays["attention_mask"], manifest.pooling)
            if manifest.normalize:
                result = l2_normalize(result)
        out.append(result)
    return np.concatenate(out).astype(np.float32)
