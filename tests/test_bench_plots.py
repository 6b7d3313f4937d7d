"""The plots a person looks at (report.py, matplotlib's Agg backend): latency against throughput, the latency
distribution of every step, the batches and padding of every step; written beside the Markdown and linked
from it, for a run with several servers, one of them a peer without server-side figures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from recserve.benchmarks import report
from recserve.benchmarks.loadgen import StepPlan, run_step
from recserve.benchmarks.protocols import as_target, open_target, parse_endpoint
from recserve.benchmarks.results import PeerInfo, Series, ServerView, StepResult
from recserve.benchmarks.workloads import WorkloadSpec, build_workload
from recserve.client import AsyncClient, Limits, ServerInfo
from tests.support.fake_server import FakeInference, fake_server
from tests.support.stub_peers import OpenAIStub

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLANS = [
    StepPlan(mode="closed", concurrency=c, warmup_s=0.0, window_s=0.25, max_windows=1) for c in (1, 4)
] + [
    StepPlan(mode="open", rate=r, arrival="fixed", warmup_s=0.0, window_s=0.25, max_windows=1)
    for r in (40, 80)
]


def view(batch: float, padding: float) -> ServerView:
    """What a recserve server's metrics would say of a step: batches mostly near `batch` texts."""
    low = str(float(max(1, int(batch) // 2)))
    return ServerView(
        seconds=0.25,
        batches=20,
        mean_batch_size=batch,
        mean_batch_tokens=batch * 40,
        padding_ratio=padding,
        mean_request_ms=5.0,
        mean_tokenize_ms=0.2,
        mean_queue_wait_ms=1.0,
        mean_inference_ms=3.0,
        tokenize_share=0.04,
        queue_share=0.2,
        inference_share=0.6,
        backlog_seconds=0.0,
        queue_texts=0.0,
        in_flight=1.0,
        requests={"Embed:OK": 100},
        failures={},
        dropped_texts={},
        batch_size_histogram={"1.0": 5, low: 5, str(float(int(batch))): 10, "64.0": 0, "+Inf": 0},
    )


async def measured(target: object) -> list[StepResult]:
    workload = build_workload(WorkloadSpec())
    return [await run_step(plan, target, workload) for plan in PLANS]  # type: ignore[arg-type]


async def test_every_plot_is_written_and_linked_for_several_servers(tmp_path: Path) -> None:
    big = 1 << 20
    info = ServerInfo(
        "fake",
        "f" * 64,
        "embedding",
        8,
        128,
        "fp32",
        "none",
        "mean",
        True,
        Limits(big, big, big, big, 32, big),
        "1",
    )
    with fake_server(FakeInference(delay_s=0.002)) as server, OpenAIStub() as stub:
        async with AsyncClient(server.address) as client:
            on = await measured(as_target(client))
        async with open_target(parse_endpoint(f"openai+http://{stub.address}")) as peer:
            peer_info = await peer.check(WorkloadSpec(), [])
            theirs = await measured(peer)
    on = [replace(s, server=view(2.0 * (i + 1), 1.05 + 0.05 * i)) for i, s in enumerate(on)]
    off = [replace(s, server=view(1.0, 1.0)) for s in on[:2]]
    assert isinstance(peer_info, PeerInfo)
    doc = replace(
        report.new_document("suite", "recserve bench suite", {}),
        series=(
            Series(name="batching on", target="a:1", server=info, steps=tuple(on)),
            Series(name="batching off", target="a:2", server=info, steps=tuple(off)),
            Series(
                name="tei", target=peer.name, protocol="openai+http", server=peer_info, steps=tuple(theirs)
            ),
        ),
    )
    md = tmp_path / "BENCHMARKS.md"
    paths = report.write_all(doc, tmp_path / "results", md, p99_target_ms=100.0)
    for name in ("knee", "throughput", "latency", "batch_sizes"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC), name
        assert f"![{name}](results/{name}.png)" in md.read_text()
    text = md.read_text()
    assert "**Latency against throughput**" in text and "**Latency distribution per step**" in text
    assert "## Tei" in text and "(OpenAI-compatible embeddings over HTTP)" in text
    # Every measured step carries its distribution; a plot with nothing to show is left out, not empty.
    assert all(s.latency_distribution is not None for s in on + theirs)
    bare = replace(doc, series=(replace(doc.series[2], steps=()),))
    assert report.write_plots(bare, tmp_path / "none") == {}
