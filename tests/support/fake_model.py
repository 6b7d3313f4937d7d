"""A fake model behind the server's seam (recserve/server/model.py): deterministic vectors from the text,
with a configurable delay, gate and failure, for status, lifecycle, batcher and metrics tests.

Not for numerics: those tests run real exported models.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from recserve.manifest import Manifest, Source, Task
from recserve.server.model import Model
from recserve.tensors import Encoded, FloatArray, l2_normalize

CLS, SEP = 101, 102
# A fake classifier's labels, in the order of its logits.
FAKE_LABELS = ("books", "music", "sports", "travel")


def _outputs(task: Task, dim: int) -> int:
    return {"embedding": dim, "cross-encoder": 1, "classifier": len(FAKE_LABELS)}[task]


def fake_manifest(
    task: Task = "embedding", dim: int = 8, max_length: int = 32, multi_label: bool = False
) -> Manifest:
    """A manifest as an export would write it, for a model that exists only in this process."""
    return Manifest.model_validate(
        {
            "model_name": f"fake-{task}",
            "source": Source(path="in-memory", weights_sha256="0" * 64),
            "task": task,
            "architecture": "FakeModel",
            "model_type": "fake",
            "hidden_size": dim,
            "output_dim": _outputs(task, dim),
            "pooling": "mean" if task == "embedding" else None,
            "normalize": task == "embedding",
            "max_length": max_length,
            "pad_token_id": 0,
            "inputs": ["input_ids", "attention_mask"],
            "output_name": "last_hidden_state" if task == "embedding" else "logits",
            "variants": {},
            "export": {"duration_s": 0.0, "versions": {}, "created_at": "2026-01-01T00:00:00+00:00"},
            "labels": list(FAKE_LABELS) if task == "classifier" else [],
            "multi_label": multi_label,
        }
    )


class FakeTokenizer:
    """One token per whitespace-separated word (its crc32), between [CLS] and [SEP], cut at max_length."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._counted = threading.Condition()
        self.texts_encoded = 0  # how much tokenising work the server has spent, for admission tests
        self.delay_s = 0.0  # slept per encode call (one chunk of a call), to stand for a slow tokenizer

    def _ids(self, text: str) -> list[int]:
        return [1000 + zlib.crc32(word.encode()) % 20000 for word in text.split()]

    def _encoded(self, first: list[int], second: list[int] | None = None) -> Encoded:
        ids = [CLS, *first, SEP]
        types = [0] * len(ids)
        if second is not None:
            ids += [*second, SEP]
            types += [1] * (len(second) + 1)
        truncated = len(ids) > self.max_length
        return Encoded(
            np.asarray(ids[: self.max_length], dtype=np.int64),
            np.asarray(types[: self.max_length], dtype=np.int64),
            truncated,
        )

    def _count(self, n: int) -> None:
        with self._counted:
            self.texts_encoded += n
            self._counted.notify_all()

    def wait_encoded(self, texts: int, timeout: float = 10.0) -> bool:
        """Waits until `texts` texts in all have been tokenised; False if `timeout` seconds pass first."""
        with self._counted:
            return self._counted.wait_for(lambda: self.texts_encoded >= texts, timeout)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        if self.delay_s:
            time.sleep(self.delay_s)
        self._count(len(texts))
        return [self._encoded(self._ids(text)) for text in texts]

    def encode_pairs(self, query: str, candidates: Sequence[str]) -> list[Encoded]:
        self._count(len(candidates))
        head = self._ids(query)
        return [self._encoded(head, self._ids(candidate)) for candidate in candidates]


class FakeBackend:
    """Rows that depend only on each item's token ids, so batching can never change an answer.

    `delay_s` is slept per batch; while `gate` is cleared, batches wait for it (to fill the queue at will);
    `fail` decides, per batch, to raise as a broken runtime would. `wait_entered` says when batches have
    reached the model (they count on entry, before the gate), so a test knows what is running, not queued.
    """

    precision = "fp32"
    provider = "FakeExecutionProvider"
    verified_sha256: str | None = None  # no file to verify

    def __init__(self, dim: int, task: Task = "embedding", concurrent_batches: int = 1) -> None:
        self.dim = _outputs(task, dim)
        self.concurrent_batches = concurrent_batches
        self.delay_s = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Callable[[Sequence[Encoded]], bool] = lambda batch: False
        self.batches: list[int] = []  # the size of every batch run, in order
        self._entries = threading.Condition()
        self.entered = 0  # batches that reached run(), including those waiting at the gate

    def row(self, item: Encoded) -> FloatArray:
        rng = np.random.default_rng(zlib.crc32(item.ids.tobytes()))
        return rng.standard_normal(self.dim).astype(np.float32)

    def wait_entered(self, batches: int, timeout: float = 10.0) -> bool:
        """Waits until `batches` batches in all have reached run(); False if `timeout` seconds pass first."""
        with self._entries:
            return self._entries.wait_for(lambda: self.entered >= batches, timeout)

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        with self._entries:
            self.entered += 1
            self._entries.notify_all()
        self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail(batch):
            raise RuntimeError("the fake runtime failed, as asked")
        self.batches.append(len(batch))
        return np.stack([self.row(item) for item in batch])

    def warm_up(self, batch: Sequence[Encoded]) -> None:
        return

    def stop_running(self) -> None:
        self.gate.set()  # a held batch would otherwise wait for the test


class FakeModel(Model):
    """A Model whose parts tests can reach with their fake types."""

    tokenizer: FakeTokenizer
    backend: FakeBackend

    def expected(self, texts: Sequence[str], normalize: bool | None = None) -> FloatArray:
        """What Embed must answer for `texts` (computed without the server)."""
        rows = np.stack([self.backend.row(item) for item in self.tokenizer.encode(texts)])
        return l2_normalize(rows) if (self.manifest.normalize if normalize is None else normalize) else rows


def fake_model(
    task: Task = "embedding",
    dim: int = 8,
    max_length: int = 32,
    concurrent_batches: int = 1,
    multi_label: bool = False,
) -> FakeModel:
    return FakeModel(
        fake_manifest(task, dim, max_length, multi_label),
        FakeTokenizer(max_length),
        FakeBackend(dim, task, concurrent_batches),
    )
