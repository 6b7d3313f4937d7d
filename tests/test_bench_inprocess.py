"""The open loop's reference without gRPC: the server's engine in the benchmark's process, on a real tiny
model, loaded by the same loops (and read through the same metrics) as a served target."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from recserve.benchmarks.inprocess import in_process
from recserve.benchmarks.loadgen import LoadSettings
from recserve.benchmarks.recorder import OK
from recserve.benchmarks.sweep import sweep
from recserve.benchmarks.workloads import WorkloadSpec, build_workload
from recserve.manifest import Manifest

SMALL = WorkloadSpec(pool_texts=64, ring_calls=64)


async def test_the_engine_in_process_answers_an_open_loop_with_every_call_counted(tiny_repo: Path) -> None:
    workload = build_workload(SMALL)
    async with in_process(tiny_repo, 1) as target:
        info = await target.check(workload.spec, [])
        plan = LoadSettings(warmup_s=0.2, window_s=1.0, max_windows=1).plan(
            "open", rate=40.0, arrival="poisson", seed=0
        )
        (result,) = await sweep(target, [plan], workload, metrics_url=target.metrics_url, progress=None)
    assert info.protocol == "in-process" and target.name == "in process"
    assert info.dimension == Manifest.load(tiny_repo).output_dim
    assert info.details["threads"] == "1"
    measured = result.measured
    assert measured.failed == 0 and measured.completed >= 20
    assert measured.completed == measured.sent
    # The engine's own token counts replaced the workload's estimates.
    assert measured.tokens_per_s > 0
    # Its batcher's metrics, scraped around the window as a served server's.
    assert result.server is not None and result.server.batches > 0
    assert result.server.mean_batch_size is not None and result.server.mean_batch_size >= 1


async def test_a_call_past_its_deadline_or_after_the_engine_closed_gets_the_servers_status(
    tiny_repo: Path,
) -> None:
    workload = build_workload(SMALL)
    async with in_process(tiny_repo, 1) as target:
        calls = target.calls(workload)
        assert (await calls.send(0, 10.0))[0] == OK
        assert (await calls.send(1, 0.0)) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], None)
    # Closed: refused at once, as a draining server refuses, rather than left waiting.
    assert (await calls.send(2, 10.0)) == (grpc.StatusCode.UNAVAILABLE.value[0], None)


async def test_the_engine_in_process_takes_embed_workloads_only(tiny_repo: Path) -> None:
    workload = build_workload(WorkloadSpec(pool_texts=64, ring_calls=64, rpc={"score": 1.0}))
    async with in_process(tiny_repo, 1) as target:
        with pytest.raises(ValueError, match="Embed workloads only"):
            target.calls(workload)
