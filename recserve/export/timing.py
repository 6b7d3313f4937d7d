"""Times CPU graphs against each other on a small fixed sample of mixed lengths (fp32 fused vs plain, int8).

The sample is every SAMPLE_STEP-th parity text in length order, so it spans empty to max-length texts.
Two workloads over it: `batched` (length-sorted batches of 16, what the server's length-sorting batcher
forms under load) and `batch1` (a few texts one at a time, the idle-server case). The candidates run
interleaved, several rounds, and each batch keeps its fastest time: on a shared machine that is far
steadier than one pass per graph, because interference only ever adds time.

NOTE: the timing only has to rank two graphs of the same model; a quarter of the parity texts spans the
same lengths at a quarter of the cost. All of them took 2 minutes on a base-size model (docs/export.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from recserve.runner import TextRunner
from recserve.tensors import Feeds, Item

BATCH = 16
SAMPLE_STEP = 4
SINGLE_TEXTS = 8
ROUNDS = 3


def sample(items: Sequence[Item], lengths: Sequence[int]) -> list[Item]:
    """Every SAMPLE_STEP-th item in length order, the longest included."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    picked = order[::-1][::SAMPLE_STEP][::-1]
    return [items[i] for i in picked]


def time_graphs(encoders: dict[str, TextRunner], items: Sequence[Item]) -> dict[str, dict[str, float]]:
    """name -> {"batched": seconds, "batch1": seconds}, each a sum of per-batch best times over the sample."""
    first = next(iter(encoders.values()))
    ordered = sample(items, [e.length for e in first.encode(items)])
    spread = max(1, len(ordered) // SINGLE_TEXTS)
    workloads = {
        "batched": [ordered[i : i + BATCH] for i in range(0, len(ordered), BATCH)],
        "batch1": [[item] for item in ordered[::spread][:SINGLE_TEXTS]],
    }
    feeds: dict[str, dict[str, list[Feeds]]] = {
        name: {
            w: [enc.runner.feeds(enc.encode(batch))[0] for batch in batches]
            for w, batches in workloads.items()
        }
        for name, enc in encoders.items()
    }
    best = {name: {w: [float("inf")] * len(b) for w, b in workloads.items()} for name in encoders}
    for name, enc in encoders.items():  # warm-up: first runs allocate and plan
        enc.runner.run_feeds(feeds[name]["batched"][-1])
    names = list(encoders)
    for round_ in range(ROUNDS):
        # Alternate the order so no graph always runs right after another's cache-warming pass.
        for name in names if round_ % 2 == 0 else reversed(names):
            for workload, batches in feeds[name].items():
                for i, batch in enumerate(batches):
                    start = time.perf_counter()
                    encoders[name].runner.run_feeds(batch)
                    elapsed = time.perf_counter() - start
                    best[name][workload][i] = min(best[name][workload][i], elapsed)
    return {name: {w: round(sum(times), 4) for w, times in per.items()} for name, per in best.items()}
