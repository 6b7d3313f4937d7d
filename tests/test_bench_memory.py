"""The memory section (recserve/benchmarks/memory.py): the burst texts, the measurement against a real child
server of the tiny model and against one without /proc readings, and the report it makes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from recserve.benchmarks import report
from recserve.benchmarks.memory import (
    POST_BURST_TARGET,
    MemorySettings,
    measure_memory,
    memory_section,
    memory_summary,
    spread_texts,
)
from recserve.benchmarks.results import MemoryResult, MemoryRound, to_json
from recserve.benchmarks.targets import TargetError, check_target, connected
from recserve.benchmarks.workloads import SPECIAL_TOKENS, WorkloadSpec, build_workload
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_server import FakeInference, fake_server

# Short rounds: the tiny model answers in milliseconds.
QUICK = MemorySettings(
    min_rounds=2, max_rounds=3, calls=3, texts_per_call=24, load_callers=8, load_s=0.3, settle_s=0.1
)


def test_burst_texts_are_reproducible_and_spread_from_a_few_tokens_to_past_the_limit() -> None:
    texts = spread_texts(2000, 256, seed=3)
    assert texts == spread_texts(2000, 256, seed=3) and texts != spread_texts(2000, 256, seed=4)
    tokens = np.array([len(t.split()) + SPECIAL_TOKENS for t in texts])
    assert tokens.min() <= 4 and tokens.max() > 256  # truncated to the limit: the longest shape is there
    # Log-uniform: as many texts in 3..~30 tokens as in ~30..~270.
    short = (tokens < 30).mean()
    assert 0.4 < short < 0.6


async def test_idle_and_post_burst_rss_of_a_real_server(tiny_repo: Path, tmp_path: Path) -> None:
    """A child server with two sessions (two threads): idle read, rounds until the plateau or the cap, each
    round's standard load answered; the figures add up."""
    from recserve.benchmarks.servers import local_server

    workload = build_workload(WorkloadSpec(pool_texts=64, ring_calls=64))
    async with (
        local_server(tiny_repo, threads=2, log_path=tmp_path / "server.log") as srv,
        connected(srv.address) as client,
    ):
        info = await check_target(client, srv.address)
        result = await measure_memory(client, srv.pid, info, workload, QUICK)
    assert result.pid == srv.pid
    assert result.idle_rss_mib is not None and result.idle_rss_mib > 50  # Python, ORT and the model
    assert QUICK.min_rounds <= len(result.rounds) <= QUICK.max_rounds
    if len(result.rounds) < QUICK.max_rounds:
        assert result.plateaued  # the only way to stop before the cap
    for rnd in result.rounds:
        assert rnd.texts == QUICK.calls * QUICK.texts_per_call and rnd.load_texts_per_s > 0
        assert rnd.rss_mib is not None and rnd.rss_peak_mib is not None
    assert result.post_burst_rss_mib == result.rounds[-1].rss_mib
    assert result.ratio == round(result.post_burst_rss_mib / result.idle_rss_mib, 3)
    peaks = [r.rss_peak_mib for r in result.rounds if r.rss_peak_mib is not None]
    assert result.peak_rss_mib == max(peaks)
    assert result.settings["texts_per_call"] == QUICK.texts_per_call


async def test_without_proc_readings_the_figures_are_unknown() -> None:
    """A server whose pid is unknown (another machine): one round, every RSS figure None, no verdict."""
    workload = build_workload(WorkloadSpec(pool_texts=16, ring_calls=16))
    with fake_server() as fake:
        async with connected(fake.address) as client:
            info = await check_target(client, fake.address)
            result = await measure_memory(client, None, info, workload, replace(QUICK, max_rounds=2))
    assert result.idle_rss_mib is None and result.post_burst_rss_mib is None and result.ratio is None
    assert len(result.rounds) == 1 and not result.plateaued
    row = memory_summary(result)["memory_ratio"]
    assert row.value is None and row.met is None
    assert "Idle - MiB" in "\n".join(memory_section(result))


class RefusingBigCalls(FakeInference):
    """Refuses a call of many texts with RESOURCE_EXHAUSTED `times` times before it answers it."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.refusals: dict[str, int] = {}

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if len(request.texts) > 1:
            seen = self.refusals.get(request.texts[0], 0)
            if seen < self.times:
                self.refusals[request.texts[0]] = seen + 1
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue holds too much work")
        return await super().Embed(request, context)


async def test_a_refused_big_call_is_sent_again_and_one_refused_to_the_end_fails() -> None:
    """Refused at the door (a slow machine's queue is full) costs the server nothing: the burst retries;
    a call still refused at its deadline fails the measurement, in one line."""
    workload = build_workload(WorkloadSpec(pool_texts=16, ring_calls=16))
    settings = replace(QUICK, max_rounds=1, deadline_s=1.0)
    twice = RefusingBigCalls(times=2)
    with fake_server(twice) as fake:
        async with connected(fake.address) as client:
            info = await check_target(client, fake.address)
            result = await measure_memory(client, None, info, workload, settings)
    assert len(result.rounds) == 1 and sorted(twice.refusals.values()) == [2] * QUICK.calls
    with fake_server(RefusingBigCalls(times=1000)) as fake:
        async with connected(fake.address) as client:
            info = await check_target(client, fake.address)
            with pytest.raises(
                TargetError, match="memory burst: a big Embed call failed: RESOURCE_EXHAUSTED"
            ):
                await measure_memory(client, None, info, workload, settings)


def result_of(idle: float, *rss: float, plateaued: bool = True) -> MemoryResult:
    rounds = tuple(
        MemoryRound(texts=1024, seconds=12.0, load_texts_per_s=200.0, rss_mib=r, rss_peak_mib=r + 5)
        for r in rss
    )
    settings = to_json(MemorySettings())
    assert isinstance(settings, dict)
    return MemoryResult(
        pid=1,
        idle_rss_mib=idle,
        post_burst_rss_mib=rss[-1],
        peak_rss_mib=max(rss) + 5,
        ratio=round(rss[-1] / idle, 3),
        plateaued=plateaued,
        rounds=rounds,
        settings=settings,
    )


@pytest.mark.parametrize(("post", "met"), [(960.0, True), (961.0, False)])
def test_the_summary_row_is_judged_against_one_and_a_half_times_idle(post: float, met: bool) -> None:
    row = memory_summary(result_of(640.0, 900.0, post))["memory_ratio"]
    assert POST_BURST_TARGET == 1.5
    assert row.title == "Post-burst RSS over idle" and row.target == "<= 1.5x" and row.met is met
    assert row.value == round(post / 640.0, 3)
    assert f"({post} MiB; plateaued)" in row.how and "(640.0 MiB)" in row.how


def test_the_section_and_the_summary_in_benchmarks_markdown(tmp_path: Path) -> None:
    result = result_of(643.7, 725.0, 730.8, 731.3)
    doc = report.new_document("suite", "recserve bench suite (test)", {})
    doc = replace(
        doc,
        summary=memory_summary(result),
        sections={"Memory: idle and after bursts": memory_section(result)},
        memory=result,
    )
    paths = report.write_all(report.finish(doc), tmp_path / "out", tmp_path / "BENCHMARKS.md")
    text = paths["markdown"].read_text()
    assert "| Post-burst RSS over idle | 1.14x (meets the target <= 1.5x) |" in text
    assert "## Memory: idle and after bursts" in text
    assert "**Idle 643.7 MiB, after the bursts 731.3 MiB: 1.14x** (peak 736.3 MiB)." in text
    assert "| idle | - | - | - | 643.7 | - |" in text
    assert "| 3 | 1024 | 200.0 | 12.0 | 731.3 | 736.3 |" in text
    saved = json.loads(paths["json"].read_text())["memory"]
    assert saved["idle_rss_mib"] == 643.7 and saved["ratio"] == 1.136 and len(saved["rounds"]) == 3
    assert saved["settings"]["calls"] == MemorySettings().calls


def test_a_section_that_had_not_plateaued_says_so() -> None:
    lines = memory_section(result_of(600.0, 700.0, 800.0, 900.0, plateaued=False))
    assert "had not plateaued by the last round" in lines[0]
    assert "had not plateaued" in memory_summary(result_of(600.0, 900.0, plateaued=False))["memory_ratio"].how
