"""The PyTorch reference every exported variant is judged against (imports torch).

Embedding models run through sentence-transformers exactly as their own config files say (that is how the
checkpoint's authors use them, so a misread pooling or normalisation setting shows up as a parity failure);
cross-encoders (text pairs) and classifiers (texts) run through transformers' sequence classification head.
The server's tests use the module functions `reference_embeddings`, `reference_logits` and
`reference_token_ids` too.

NOTE: the export runs the reference once, on all parity texts, in length-sorted batches (as
sentence-transformers does by itself), so no batch pads a short text to a long one's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recserve.export.checkpoint import Checkpoint, inspect_checkpoint, resolve_max_length
from recserve.export.errors import ExportError
from recserve.manifest import Task
from recserve.tensors import FloatArray, Item

BATCH = 32


class Reference:
    """One loaded reference model; `run` gives vectors (embedding) or logits (cross-encoder, classifier),
    float32, in the order of its inputs."""

    def __init__(self, checkpoint: Checkpoint, task: Task, max_length: int) -> None:
        import torch

        self.task = task
        self.max_length = max_length
        self._torch = torch
        try:
            if task == "embedding":
                from sentence_transformers import SentenceTransformer

                # A plain transformers checkpoint gets sentence-transformers' default: mean pooling, no
                # normalisation, which is what checkpoint.py assumes for it too.
                self._st = SentenceTransformer(str(checkpoint.root), device="cpu", local_files_only=True)
                self._st.max_seq_length = max_length
                self.tokenizer: Any = self._st.tokenizer
            else:
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                self._clf = AutoModelForSequenceClassification.from_pretrained(
                    str(checkpoint.model_dir), local_files_only=True
                ).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
                    str(checkpoint.model_dir), local_files_only=True
                )
        except Exception as exc:  # any failure to load the input is the input's fault, not ours
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"cannot load the checkpoint {checkpoint.root}: {first}") from None

    def run(self, inputs: Sequence[Item]) -> FloatArray:
        if self.task == "embedding":
            vectors = self._st.encode(list(inputs), batch_size=BATCH, convert_to_numpy=True)  # type: ignore[arg-type]
            return np.asarray(vectors, dtype=np.float32)
        lengths = [len(ids) for ids in self.token_ids(inputs)]
        order = sorted(range(len(inputs)), key=lambda i: lengths[i])
        logits: list[Any] = [None] * len(inputs)
        with self._torch.inference_mode():
            for start in range(0, len(order), BATCH):
                chunk = order[start : start + BATCH]
                features = self._encode([inputs[i] for i in chunk], return_tensors="pt")
                for i, row in zip(chunk, self._clf(**features).logits.float().numpy(), strict=True):
                    logits[i] = row
        return np.stack(logits).astype(np.float32)

    def token_ids(self, inputs: Sequence[Item]) -> list[list[int]]:
        """Each text's token ids as the reference tokenises it (special tokens included, no padding)."""
        if self.task == "embedding":
            ids: list[list[int]] = []
            for i in range(0, len(inputs), BATCH):
                features = self._st.preprocess(list(inputs[i : i + BATCH]))
                rows = features["input_ids"].tolist()
                masks = features["attention_mask"].tolist()
                for row, mask in zip(rows, masks, strict=True):
                    ids.append([t for t, m in zip(row, mask, strict=True) if m])
            return ids
        return [list(map(int, row)) for row in self._encode(inputs)["input_ids"]]

    def _encode(self, items: Sequence[Any], **kwargs: Any) -> Any:
        """Pairs (cross-encoder) or texts (classifier), truncated as the shipped tokenizer truncates."""
        padding = kwargs.get("return_tensors") is not None
        if self.task == "classifier":
            return self.tokenizer(
                list(items), truncation=True, max_length=self.max_length, padding=padding, **kwargs
            )
        first = [p[0] for p in items]
        second = [p[1] for p in items]
        return self.tokenizer(
            first, second, truncation=True, max_length=self.max_length, padding=padding, **kwargs
        )


def _load(checkpoint_dir: Path | str, task: Task, max_length: int | None) -> Reference:
    checkpoint = inspect_checkpoint(Path(checkpoint_dir))
    return Reference(checkpoint, task, resolve_max_length(checkpoint, max_length))


def reference_embeddings(
    checkpoint_dir: Path | str, texts: Sequence[str], max_length: int | None = None
) -> FloatArray:
    """[len(texts), dim] float32 vectors from sentence-transformers, pooled and normalised as configured."""
    return _load(checkpoint_dir, "embedding", max_length).run(texts)


def reference_logits(
    checkpoint_dir: Path | str, pairs: Sequence[Item], max_length: int | None = None
) -> FloatArray:
    """[len(pairs), num_labels] float32 logits from transformers' sequence classification model: of
    (query, item) pairs for a cross-encoder, of texts for a classifier."""
    task: Task = "classifier" if pairs and isinstance(pairs[0], str) else "cross-encoder"
    return _load(checkpoint_dir, task, max_length).run(pairs)


def reference_token_ids(
    checkpoint_dir: Path | str,
    inputs: Sequence[Item],
    task: Task = "embedding",
    max_length: int | None = None,
) -> list[list[int]]:
    """Token ids as the reference tokenises each text (or pair): what the shipped tokenizer must match."""
    return _load(checkpoint_dir, task, max_length).token_ids(inputs)
