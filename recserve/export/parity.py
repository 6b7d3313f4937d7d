"""The parity gate: each variant against the PyTorch reference on the built-in parity texts.

Two checks per variant. Accuracy: min and mean cosine of each text's vector with the reference's (for
cross-encoders, the largest absolute logit difference). Batch invariance: the largest absolute difference
between a text run alone and the same text inside a padded batch of 32 (31 texts plus the longest one, so
every batch pads to the longest input); a dynamic batcher is only correct if this is ~0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from recserve.export.errors import ParityFailure
from recserve.manifest import Parity, Precision, Task
from recserve.runner import TextRunner
from recserve.tensors import FloatArray, Item

# Embedding models: minimum cosine with the reference.
MIN_COSINE: dict[Precision, float] = {"fp32": 0.99999, "fp16": 0.9999, "int8": 0.99}
# Cross-encoders: largest absolute logit difference, as a fraction of max(1, largest |reference logit|) so
# the bound scales with the model's logit range.
LOGIT_TOLERANCE: dict[Precision, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
# Alone vs in a padded batch, in output units (vector components or logits, scaled like LOGIT_TOLERANCE).
# fp16 may differ by rounding when the reduction lengths change; the others are exact on CPU.
BATCH_INVARIANCE: dict[Precision, float] = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-4}
INVARIANCE_BATCH = 32
WORST_SHOWN = 3


def check_tokens(shipped: list[list[int]], reference_ids: list[list[int]], items: Sequence[Item]) -> None:
    """The shipped tokenizer must produce exactly the reference's token ids."""
    bad = [i for i, (a, b) in enumerate(zip(shipped, reference_ids, strict=True)) if a != b]
    if bad:
        shown = ", ".join(
            f"{_show(items[i])} ({len(shipped[i])} vs {len(reference_ids[i])} tokens)" for i in bad[:3]
        )
        raise ParityFailure(
            f"tokenizer drift: {len(bad)} of {len(items)} parity texts get other token ids than the "
            f"reference, e.g. {shown}"
        )


def check_variant(
    encoder: TextRunner, precision: Precision, items: Sequence[Item], reference: FloatArray
) -> Parity:
    """Runs the gate for one variant on one provider; Parity.passed says whether it holds.

    `encoder` computes what the server would (recserve.runner), so the gate checks the serving path.
    """
    task: Task = encoder.spec.task
    batched = _run_padded_batches(encoder, items)
    alone = np.concatenate([encoder([item]) for item in items])
    batch_diff = np.abs(alone - batched).max(axis=1)
    scale = 1.0
    worst: list[dict[str, Any]] = []
    if task == "embedding":
        cosine = _cosine(batched, reference)
        min_cos, mean_cos = float(cosine.min()), float(cosine.mean())
        threshold = MIN_COSINE[precision]
        accurate = min_cos >= threshold
        for i in np.argsort(cosine)[:WORST_SHOWN]:
            worst.append({"text": _show(items[i]), "metric": "cosine", "value": float(cosine[i])})
        figures: dict[str, Any] = {"min_cosine": min_cos, "mean_cosine": mean_cos}
    else:
        diff = np.abs(batched - reference).max(axis=1)
        scale = max(1.0, float(np.abs(reference).max()))
        threshold = LOGIT_TOLERANCE[precision] * scale
        accurate = float(diff.max()) <= threshold
        for i in np.argsort(-diff)[:WORST_SHOWN]:
            worst.append({"text": _show(items[i]), "metric": "abs_diff", "value": float(diff[i])})
        figures = {"max_abs_diff": float(diff.max())}
    invariance_threshold = BATCH_INVARIANCE[precision] * scale
    invariance = float(batch_diff.max())
    worst_batch = int(np.argmax(batch_diff))
    worst.append({"text": _show(items[worst_batch]), "metric": "batch_invariance", "value": invariance})
    return Parity(
        texts=len(items),
        batch_invariance=invariance,
        provider=encoder.provider,
        threshold=threshold,
        batch_invariance_threshold=invariance_threshold,
        passed=bool(accurate and invariance <= invariance_threshold),
        worst=worst,
        **figures,
    )


def describe_failure(precision: str, parity: Parity) -> str:
    """One line naming the variant, what failed, by how much, and the worst texts."""
    parts = []
    if parity.min_cosine is not None and parity.min_cosine < parity.threshold:
        parts.append(f"min cosine {parity.min_cosine:.6f} < {parity.threshold}")
    if parity.max_abs_diff is not None and parity.max_abs_diff > parity.threshold:
        parts.append(f"max abs logit diff {parity.max_abs_diff:.3g} > {parity.threshold:.3g}")
    limit = parity.batch_invariance_threshold
    if limit is not None and parity.batch_invariance > limit:
        parts.append(f"batch invariance {parity.batch_invariance:.3g} > {limit:.3g}")
    worst = ", ".join(f"{w['text']} ({w['metric']} {w['value']:.6g})" for w in parity.worst)
    return f"variant {precision} failed parity on {parity.provider}: {'; '.join(parts)}; worst: {worst}"


def _run_padded_batches(encoder: TextRunner, items: Sequence[Item]) -> FloatArray:
    lengths = [e.length for e in encoder.encode(items)]
    padder = items[int(np.argmax(lengths))]
    rows = []
    step = INVARIANCE_BATCH - 1
    for start in range(0, len(items), step):
        chunk = list(items[start : start + step])
        rows.append(encoder([*chunk, padder])[: len(chunk)])
    return np.concatenate(rows)


def _cosine(a: FloatArray, b: FloatArray) -> FloatArray:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    cosine: FloatArray = ((a * b).sum(axis=1) / norms).astype(np.float32)
    return cosine


def _show(item: Item, width: int = 40) -> str:
    text = f"{item[0]} || {item[1]}" if isinstance(item, tuple) else item
    return repr(text if len(text) <= width else text[:width] + "…")
