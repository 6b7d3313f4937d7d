"""The parity gate: each variant against the PyTorch reference on the built-in parity texts.

Two checks per variant. Accuracy: min and mean cosine of each text's vector with the reference's (for
cross-encoders and classifiers, the largest absolute logit difference; a classifier's arg-max label must
also be the reference's on every text). Batch invariance: the largest absolute difference between a text
run alone and the same text inside a padded batch; a dynamic batcher is only correct if this is ~0.

NOTE: the batches are length-sorted, as the server's batcher forms them, and each one carries a padder: a
text at least twice as long as its longest member (or the longest there is), so every text is still padded
to at least double its length. Batches of 32 all padded to the longest parity text tested no more and
cost 7 times the tokens (86,000 against 12,700 for a model truncating at 384; attention grows with the
square of the padded length): 2 minutes per variant on a base-size model here, 4 to 5 in issue 14.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from recserve.export.errors import ParityFailure
from recserve.manifest import Parity, Precision, Task
from recserve.runner import TextRunner
from recserve.tensors import FloatArray, Item

# Embedding models: minimum cosine with the reference, and where set the minimum mean cosine. The fp16 bar
# comes from what fp16 costs nearest-neighbour search: docs/decisions/0006-fp16-parity-bar.md.
MIN_COSINE: dict[Precision, float] = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
MIN_MEAN_COSINE: dict[Precision, float] = {"fp16": 0.9999}
# Cross-encoders: largest absolute logit difference, as a fraction of max(1, largest |reference logit|) so
# the bound scales with the model's logit range.
LOGIT_TOLERANCE: dict[Precision, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
# Alone vs in a padded batch, in output units (vector components or logits, scaled like LOGIT_TOLERANCE).
# fp16 may differ by rounding when the reduction lengths change; the others are exact on CPU.
BATCH_INVARIANCE: dict[Precision, float] = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-4}
INVARIANCE_BATCH = 32
# Padded tokens per gate batch at most (a batch of long texts holds fewer than INVARIANCE_BATCH), which
# bounds the memory ONNX Runtime's arena grows to on a base-size model.
BATCH_TOKENS = 8192
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
    encoder: TextRunner,
    precision: Precision,
    items: Sequence[Item],
    reference: FloatArray,
    labelled: bool = False,
) -> Parity:
    """Runs the gate for one variant on one provider; Parity.passed says whether it holds.

    `encoder` computes what the server would (recserve.runner), so the gate checks the serving path.
    `labelled`: the logits are a classifier's labels, whose arg-max must match the reference's too.
    """
    task: Task = encoder.spec.task
    batched = run_sorted_batches(encoder, items)
    alone = np.concatenate([encoder([item]) for item in items])
    batch_diff = np.abs(alone - batched).max(axis=1)
    scale = 1.0
    worst: list[dict[str, Any]] = []
    if task == "embedding":
        cosine = _cosine(batched, reference)
        min_cos, mean_cos = float(cosine.min()), float(cosine.mean())
        threshold = MIN_COSINE[precision]
        mean_threshold = MIN_MEAN_COSINE.get(precision)
        # NaN compares False, so a variant whose outputs are NaN fails here.
        accurate = min_cos >= threshold and (mean_threshold is None or mean_cos >= mean_threshold)
        for i in np.argsort(cosine)[:WORST_SHOWN]:
            worst.append({"text": _show(items[i]), "metric": "cosine", "value": float(cosine[i])})
        figures: dict[str, Any] = {"min_cosine": min_cos, "mean_cosine": mean_cos}
        if mean_threshold is not None:
            figures["mean_threshold"] = mean_threshold
    else:
        diff = np.abs(batched - reference).max(axis=1)
        scale = max(1.0, float(np.abs(reference).max()))
        threshold = LOGIT_TOLERANCE[precision] * scale
        accurate = float(diff.max()) <= threshold
        figures = {"max_abs_diff": float(diff.max())}
        if labelled:
            # Several logits, each a label: the label shown to the user must not change.
            mismatched = np.argmax(batched, axis=1) != np.argmax(reference, axis=1)
            figures["label_agreement"] = float(1.0 - mismatched.mean())
            accurate = accurate and not mismatched.any()
            for i in np.flatnonzero(mismatched)[:WORST_SHOWN]:
                label = int(np.argmax(batched[i]))
                worst.append({"text": _show(items[i]), "metric": "label", "value": float(label)})
        for i in np.argsort(-diff)[:WORST_SHOWN]:
            worst.append({"text": _show(items[i]), "metric": "abs_diff", "value": float(diff[i])})
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
    if parity.min_cosine is not None and not parity.min_cosine >= parity.threshold:
        parts.append(f"min cosine {parity.min_cosine:.6f} < {parity.threshold}")
    mean = parity.mean_threshold
    if parity.mean_cosine is not None and mean is not None and not parity.mean_cosine >= mean:
        parts.append(f"mean cosine {parity.mean_cosine:.6f} < {mean}")
    if parity.label_agreement is not None and parity.label_agreement < 1.0:
        parts.append(f"arg-max label differs on {1.0 - parity.label_agreement:.1%} of the texts")
    if parity.max_abs_diff is not None and parity.max_abs_diff > parity.threshold:
        parts.append(f"max abs logit diff {parity.max_abs_diff:.3g} > {parity.threshold:.3g}")
    limit = parity.batch_invariance_threshold
    if limit is not None and parity.batch_invariance > limit:
        parts.append(f"batch invariance {parity.batch_invariance:.3g} > {limit:.3g}")
    worst = ", ".join(f"{w['text']} ({w['metric']} {w['value']:.6g})" for w in parity.worst)
    return f"variant {precision} failed parity on {parity.provider}: {'; '.join(parts)}; worst: {worst}"


def sorted_batches(lengths: Sequence[int]) -> list[tuple[list[int], int]]:
    """Indices in length-sorted batches, each with the index of its padder (see the module docstring).

    A batch holds up to INVARIANCE_BATCH - 1 texts and BATCH_TOKENS padded tokens, its padder included.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    by_length = [lengths[i] for i in order]

    def padder(longest: int) -> int:
        """Position in `order` of the shortest text at least twice `longest` (or of the longest text)."""
        return bisect.bisect_left(by_length, min(2 * longest, by_length[-1]))

    batches: list[tuple[list[int], int]] = []
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < INVARIANCE_BATCH - 1:
            if (end - start + 2) * by_length[padder(by_length[end])] > BATCH_TOKENS:
                break
            end += 1
        batches.append((order[start:end], order[padder(by_length[end - 1])]))
        start = end
    return batches


def run_sorted_batches(encoder: TextRunner, items: Sequence[Item]) -> FloatArray:
    """Each item's output from inside a length-sorted batch with its padder (sorted_batches), in order."""
    encoded = encoder.encode(items)
    rows: list[FloatArray] = [np.empty(0, dtype=np.float32)] * len(items)
    for members, padder in sorted_batches([e.length for e in encoded]):
        out = encoder.infer([*(encoded[i] for i in members), encoded[padder]])
        for row, i in enumerate(members):
            rows[i] = out[row]
    return np.stack(rows)


def _cosine(a: FloatArray, b: FloatArray) -> FloatArray:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    cosine: FloatArray = ((a * b).sum(axis=1) / norms).astype(np.float32)
    return cosine


def _show(item: Item, width: int = 40) -> str:
    text = f"{item[0]} || {item[1]}" if isinstance(item, tuple) else item
    return repr(text if len(text) <= width else text[:width] + "…")
