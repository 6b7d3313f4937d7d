"""CPU per call by thread group (recserve/benchmarks/cpu.py): the split of two readings over a call count, its
section and summary rows, and the watch hooked into the suite's paired rounds."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from recserve.benchmarks import cpu, report, suite
from recserve.benchmarks.cpu import CpuReading, CpuWindow, per_call
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import RawLimit, to_json
from recserve.benchmarks.workloads import build_workload
from recserve.client import AsyncClient
from tests.support.bench import suite_config
from tests.support.fake_server import FakeInference, fake_server
from tests.test_bench_targets import raw_figure


def reading(
    at: float, threads: dict[int, tuple[str, float]], process: float | None, client: float
) -> CpuReading:
    return CpuReading(at=at, threads=threads, process=process, client=client)


BEFORE = reading(
    10.0,
    {100: ("loop", 1.0), 101: ("model", 5.0), 102: ("grpc", 0.5), 103: ("other", 0.3)},
    process=7.0,  # 6.8 live + 0.2 of threads that ended before
    client=3.0,
)
# 2 s later: the loop +0.3, the model +2.0, gRPC +0.1, a tokenizer born meanwhile with 0.1 (2.5 live);
# thread 103 ended at 0.4, which only the process total shows: 9.0 live + 0.2 + 0.4 ended, so +2.6 in all.
AFTER = reading(
    12.0,
    {100: ("loop", 1.3), 101: ("model", 7.0), 102: ("grpc", 0.6), 104: ("tokenize", 0.1)},
    process=9.6,
    client=3.5,
)


def test_per_call_splits_two_readings_by_group_over_the_calls() -> None:
    split = per_call([CpuWindow(BEFORE, AFTER, calls=1000)])
    assert split.windows == 1 and split.calls == 1000 and split.seconds == 2.0 and split.calls_per_s == 500.0
    # `other`: thread 103's last 0.1 s, which only the process total holds.
    assert split.group_ms == pytest.approx(
        {"loop": 0.3, "tokenize": 0.1, "grpc": 0.1, "other": 0.1, "search": 0.0, "model": 2.0}
    )
    assert split.ended_ms == pytest.approx(0.1)
    assert split.outside_model_ms == pytest.approx(0.6)  # 2.6 s less the model's 2.0 s, over 1000 calls
    assert split.model_ms == pytest.approx(2.0)
    assert split.server_cores == pytest.approx(1.3) and split.client_cores == pytest.approx(0.25)
    assert split.client_ms == pytest.approx(0.5)


def test_per_call_without_a_process_total_counts_the_live_threads() -> None:
    before = reading(0.0, {1: ("loop", 1.0), 2: ("model", 1.0)}, None, 0.0)
    after = reading(1.0, {1: ("loop", 1.5), 2: ("model", 2.0), 3: ("grpc", 0.5)}, None, 0.0)
    split = per_call([CpuWindow(before, after, calls=100)])
    assert split.outside_model_ms == pytest.approx(10.0) and split.ended_ms == 0.0  # (0.5 + 0.5) / 100


def test_a_nil_difference_reads_as_zero_not_minus_zero() -> None:
    before = reading(0.0, {1: ("loop", 0.01), 2: ("model", 0.01)}, 0.02, 0.0)
    after = reading(1.0, {1: ("loop", 0.01), 2: ("model", 0.02)}, 0.03, 0.0)  # 0.03 - 0.02 < 0.01 in floats
    split = per_call([CpuWindow(before, after, calls=7)])
    assert f"{split.ended_ms:.3f} {split.group_ms['other']:.3f}" == "0.000 0.000"


def test_a_thread_id_taken_again_counts_from_zero() -> None:
    before = reading(0.0, {7: ("other", 4.0)}, 4.0, 0.0)
    after = reading(1.0, {7: ("tokenize", 0.2)}, 4.2, 0.0)  # 7 ended, a tokenizer took its id
    split = per_call([CpuWindow(before, after, calls=10)])
    assert split.group_ms["tokenize"] == pytest.approx(20.0) and split.group_ms["other"] == pytest.approx(0.0)


def test_windows_add_up_before_they_are_divided() -> None:
    """A total over a total: 1 s over 1000 calls and 1 s over 3000 are 0.5 ms a call, not their mean."""

    def window(start: float, calls: int) -> CpuWindow:
        return CpuWindow(
            reading(start, {1: ("loop", start)}, start, 0.0),
            reading(start + 1, {1: ("loop", start + 1)}, start + 1, 0.0),
            calls,
        )

    split = per_call([window(0.0, 1000), window(5.0, 3000)])
    assert split.outside_model_ms == pytest.approx(0.5) and split.calls == 4000 and split.seconds == 2.0
    with pytest.raises(ValueError, match="no OK call"):
        per_call([])
    with pytest.raises(ValueError, match="no OK call"):
        per_call([window(0.0, 0)])  # CPU spent on no answer: no figure, rather than 0 ms that passes


def test_a_watch_without_an_answered_call_has_no_figure() -> None:
    watch = cpu.CpuWatch(os.getpid())
    assert watch.result() is None
    watch.windows.append(CpuWindow(BEFORE, AFTER, calls=0))
    assert watch.result() is None


def test_the_section_and_summary_rows_render_from_the_split() -> None:
    ours = per_call([CpuWindow(BEFORE, AFTER, calls=1000)])
    bare = per_call([CpuWindow(BEFORE, AFTER, calls=4000)])
    split = cpu.split(64, {suite.DEFAULT: ours, suite.BARE: bare, "not read": None})
    assert list(split.targets) == [suite.DEFAULT, suite.BARE]
    lines = cpu.cpu_section(split)
    assert lines[2:5] == [
        "|  | windows | calls/s | loop ms | tokenize ms | grpc ms | other ms | search ms "
        "| outside the model ms | model ms | server cores | load generator cores | load generator ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| batching on | 1 | 500.0 | 0.300 | 0.100 | 0.100 | 0.100 | 0.000 | **0.600** | 2.000 | 1.30 "
        "| 0.25 | 0.500 |",
    ]
    rows = cpu.cpu_summary(split, suite.DEFAULT, suite.BARE)
    item = rows["cpu_outside_model"]
    assert item.title == "CPU per call outside the model at 64 callers"
    assert item.value == pytest.approx(0.6) and item.target == "<= 0.8 ms" and item.met is True
    assert "loop 0.300, tokenize 0.100, grpc 0.100, other 0.100, search 0.000 ms" in item.how
    floor = rows["cpu_outside_model_floor"]
    assert floor.value == pytest.approx(0.15) and floor.target is None and floor.met is None  # a fact
    # Over the target: missed; and every figure reaches the results JSON.
    heavy = cpu.split(64, {suite.DEFAULT: per_call([CpuWindow(BEFORE, AFTER, calls=100)])})
    assert cpu.cpu_summary(heavy, suite.DEFAULT, suite.BARE)["cpu_outside_model"].met is False
    assert set(cpu.cpu_summary(heavy, suite.DEFAULT, suite.BARE)) == {"cpu_outside_model"}
    doc = replace(report.new_document("suite", "recserve bench suite", {}), cpu=split, summary=rows)
    data = json.loads(json.dumps(to_json(doc)))
    assert data["cpu"]["callers"] == 64 and data["cpu"]["targets"]["bare gRPC"]["calls"] == 4000
    assert data["cpu"]["targets"]["batching on"]["group_ms"]["loop"] == 0.3
    md = report.markdown(replace(doc, sections={"CPU per call by thread group at 64 callers": lines}), {}, "")
    assert "| CPU per call outside the model at 64 callers | 0.600 ms (meets the target <= 0.8 ms) |" in md
    assert "| CPU per call outside the model of the bare gRPC baseline at 64 callers | 0.150 ms |" in md


async def test_the_paired_rounds_read_a_watched_server_at_its_own_windows(tmp_path: Path) -> None:
    """The watch reads this process (the fake server runs in it) at the bounds of the default server's
    windows only: one window a round, its OK calls counted."""
    with fake_server(FakeInference(delay_s=0.001)) as server:
        cfg = suite_config(
            tmp_path,
            compare=(1, 4),
            rounds=2,
        )
        workload = build_workload(cfg.workload)
        watch = cpu.CpuWatch(os.getpid())
        async with AsyncClient(server.address) as one, AsyncClient(server.address) as other:

            async def raw_pass() -> RawLimit:
                return raw_figure(1000.0)

            paired = await suite.paired_rounds(
                cfg,
                workload,
                [suite.Entry(suite.DEFAULT, as_target(one)), suite.Entry("other", as_target(other))],
                raw_pass,
                None,
                {suite.DEFAULT: watch},
            )
    assert len(watch.windows) == 2
    for window, rnd in zip(watch.windows, paired.rounds, strict=True):
        assert window.after.at - window.before.at == pytest.approx(0.3, abs=0.1)
        assert window.calls == round(rnd.served[suite.DEFAULT].texts_per_s * 0.3)  # one text a call
        assert window.calls > 0 and window.after.threads
    figure = watch.result()
    assert figure is not None and figure.calls == sum(w.calls for w in watch.windows)
    assert figure.server_cores > 0 and figure.client_cores > 0  # the same process, both ways
    assert figure.model_ms == 0.0  # no thread here is named rs-model
