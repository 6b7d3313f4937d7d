"""The load-test harness: workloads, statistics, the loops, pre-load checks, reports, and end-to-end runs.

The loops are tested against a fake server that can be made slow on purpose (the harness is the unit under
test there), and end to end against the real server on port 0 with the tiny exported model.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from recserve.benchmarks import report, summary
from recserve.benchmarks.loadgen import StepPlan, gaps, run_step
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.recorder import CODE_NAMES, OK, Recorder, Windows
from recserve.benchmarks.results import Series, StepResult, to_json
from recserve.benchmarks.scrape import parse, server_view
from recserve.benchmarks.stats import latency_summary, paired_p50_ms, percentiles_ordered
from recserve.benchmarks.workloads import (
    DISTRIBUTIONS,
    WorkloadError,
    WorkloadSpec,
    build_workload,
    parse_length_spec,
    parse_rpc_mix,
    read_texts,
)
from recserve.client import AsyncClient, Client, Limits, ServerInfo
from recserve.server.metrics import Metrics
from tests.support.bench import bench
from tests.support.fake_server import SERVICE, SERVING, FakeInference, FakeServer, fake_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--warmup", "0.2", "--duration", "0.6", "--max-windows", "1", "--quiet"]


def check_step(step: StepResult, steady: bool = True) -> None:
    """The invariants every step must satisfy."""
    m = step.measured
    assert m.completed + m.failed == m.sent
    assert step.consistency.ok, step.consistency
    assert percentiles_ordered(m.latency_ms)
    if steady:
        check_steady(m.calls_per_s, m.window_s, m.completed, step.concurrency)


def check_steady(calls_per_s: float, window_s: float, completed: int, callers: int | None) -> None:
    # Throughput counts answers arriving inside the windows; completed counts calls sent inside them.
    # Unless a queue grows (an overloaded open loop), they differ only by the calls at the two edges.
    slack = (callers or 0) + 0.05 * completed + 2
    assert abs(calls_per_s * window_s - completed) <= slack


# results.json keeps one flat object per step, as before the results were typed.
STEP_KEYS = {
    *("window_s", "sent", "completed", "failed", "errors", "calls_per_s", "texts_per_s", "tokens_per_s"),
    *("latency_ms", "label", "mode", "concurrency", "rate", "arrival", "windows", "windows_used"),
    *("boundaries", "warmup", "stable", "bounded_by_calls", "stragglers_cancelled", "plan", "consistency"),
    "latency_distribution",  # the distribution plot's percentiles, of every step with an OK call
}


def check_json_step(step: dict[str, Any], extra: frozenset[str] = frozenset()) -> None:
    """A step as results.json has it: the flat layout (schedule for the open loop only; `extra`, such as the
    server's view, where there was one), and its invariants."""
    assert set(step) == STEP_KEYS | extra | ({"schedule"} if step["mode"] == "open" else set())
    assert step["completed"] + step["failed"] == step["sent"]
    assert all(step["consistency"].values()), step["consistency"]
    assert set(step["latency_ms"]) == {"p50", "p90", "p99", "p99_9", "max", "mean"}
    check_steady(step["calls_per_s"], step["window_s"], step["completed"], step["concurrency"])


# --- workloads -------------------------------------------------------------------------------------------


def test_workloads_are_reproducible_and_follow_their_length_distributions() -> None:
    a, b = build_workload(WorkloadSpec(seed=7)), build_workload(WorkloadSpec(seed=7))
    assert a.texts == b.texts and [m.SerializeToString() for m in a.messages] == [
        m.SerializeToString() for m in b.messages
    ]
    assert build_workload(WorkloadSpec(seed=8)).texts != a.texts
    mix = build_workload(WorkloadSpec(pool_texts=4000)).text_tokens
    assert 33 <= mix.mean() <= 40 and mix.min() >= 4 and mix.max() <= 200
    means = [
        build_workload(WorkloadSpec(lengths=n)).text_tokens.mean() for n in ("query", "title", "description")
    ]
    assert means == sorted(means)
    fixed = build_workload(WorkloadSpec(lengths="fixed:16"))
    assert set(fixed.text_tokens.tolist()) == {16}
    assert all(len(t.split()) == 14 for t in fixed.texts)  # 14 words + [CLS] + [SEP]


def test_rpc_mix_and_call_shapes() -> None:
    spec = WorkloadSpec(
        rpc=parse_rpc_mix("embed=2,score=1,history=1"), texts_per_call=4, candidates=5, history=3
    )
    w = build_workload(spec)
    counts = {k: w.kinds.count(k) for k in ("embed", "score", "history")}
    assert counts["embed"] > counts["score"] > 100 and counts["history"] > 100
    for kind, msg, texts, expect in zip(w.kinds, w.messages, w.texts_per, w.expect, strict=True):
        if kind == "embed":
            assert (len(msg.texts), texts, expect) == (4, 4, 4)
        elif kind == "score":
            assert (msg.WhichOneof("query"), len(msg.candidates), texts, expect) == ("query_text", 5, 6, 5)
        else:
            assert (len(msg.user_history.texts), len(msg.user_history.weights), texts) == (3, 3, 8)
    with pytest.raises(WorkloadError, match="unknown RPC"):
        parse_rpc_mix("embed,upsert")
    with pytest.raises(WorkloadError, match="positive"):
        parse_rpc_mix("embed=0")


def test_texts_from_files(tmp_path: Path) -> None:
    plain = tmp_path / "texts.txt"
    plain.write_text("first text\n\nsecond text\n")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "from an object"}\n"a bare string"\n')
    assert read_texts(plain) == ["first text", "second text"]
    assert read_texts(jsonl) == ["from an object", "a bare string"]
    w = build_workload(WorkloadSpec(lengths=f"file:{jsonl}"))
    assert w.texts == ["from an object", "a bare string"] and not w.tokens_exact
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(WorkloadError, match=r"bad\.jsonl:1"):
        read_texts(tmp_path / "bad.jsonl")
    for spec in ("fixed:2", "poem", f"file:{tmp_path / 'missing.txt'}"):
        with pytest.raises(WorkloadError):
            parse_length_spec(spec)
    assert parse_length_spec("mix") is DISTRIBUTIONS["mix"]


# --- statistics and the server's view ---------------------------------------------------------------------


def test_percentiles_are_exact_observed_values() -> None:
    lat = latency_summary(np.arange(1, 1001) / 1000.0)  # 1..1000 ms
    assert lat.tail() == (500.0, 900.0, 990.0, 999.0, 1000.0)
    assert lat.mean == 500.5
    assert percentiles_ordered(lat)
    assert latency_summary(np.array([])).p99 is None
    assert not percentiles_ordered(replace(lat, p90=991.0))


def test_a_paired_p50_differences_call_by_call() -> None:
    """The p50 of the per-call differences, not the difference of the p50s: a series that drifted moves
    both calls of a pair, and the difference of each pair keeps only what separates the two."""
    reference = np.array([1.0, 2.0, 3.0]) / 1000.0
    timed = np.array([3.0, 4.0, 1.0]) / 1000.0  # differences 2, 2 and -2 ms; the p50s differ by 1 ms
    assert paired_p50_ms(timed, reference) == 2.0
    # The machine slows fourfold half way through: each pair still differs by 0.5 ms.
    drift = np.array([4.0] * 50 + [16.0] * 50) / 1000.0
    assert paired_p50_ms(drift + 0.0005, drift) == 0.5
    assert paired_p50_ms(np.array([]), np.array([])) is None


def test_summaries_count_what_the_recorder_holds() -> None:
    """Windows of 1 s from t=10: a pending call is sent but neither completed nor failed, a failure counts
    in the window it was sent in, and throughput counts the answers that arrived inside the window."""
    windows = Windows(start=10.0, length=1.0)
    rec = Recorder(windows)
    warm = rec.admit(9.5, 9.5, index=0)
    rec.finish(warm, 9.6, 14)  # UNAVAILABLE during warm-up
    for t, end, code in ((10.1, 10.2, OK), (10.3, 11.2, OK), (10.5, 10.6, 4), (11.1, 11.3, OK)):
        rec.finish(rec.admit(t, t, index=1), end, code)
    rec.admit(10.9, 10.9, index=0)  # still in flight
    texts, tokens = np.array([1, 3]), np.array([10, 30])
    first = summary.figures(rec.table(), windows, 0, 0, texts, tokens)
    assert (first.sent, first.completed, first.failed) == (4, 2, 1)
    assert first.errors == {CODE_NAMES[4]: 1}
    assert first.calls_per_s == 1.0 and first.texts_per_s == 3.0 and first.tokens_per_s == 30.0
    assert first.latency_ms.p50 == 100.0 and first.latency_ms.max == 900.0
    assert not summary.consistency(first).completed_plus_failed_is_sent  # the pending call
    both = summary.figures(rec.table(), windows, 0, 1, texts, tokens)
    assert (both.sent, both.completed, both.failed, both.calls_per_s) == (5, 3, 1, 1.5)
    warmup = summary.warmup(rec.table())
    assert (warmup.sent, warmup.failed, warmup.errors) == (1, 1, {"UNAVAILABLE": 1})
    sched = summary.schedule(rec.table(), 0, 0, rate=4.0, late_after_s=0.005, cap_hits=0, seconds=1.0)
    assert sched.sent_rate == 4.0 and sched.late_calls == 0 and not sched.client_fell_behind


METRICS_BEFORE = """
recserve_requests_total{rpc="Embed",code="OK"} 10
recserve_batch_size_bucket{le="1.0"} 4
recserve_batch_size_bucket{le="2.0"} 4
recserve_batch_size_bucket{le="4.0"} 5
recserve_batch_size_bucket{le="+Inf"} 5
recserve_batch_size_count 5
recserve_batch_size_sum 8
recserve_batch_tokens_sum 400
recserve_batch_real_tokens_total 300
recserve_request_duration_seconds_count{rpc="Embed"} 10
recserve_request_duration_seconds_sum{rpc="Embed"} 0.1
recserve_queue_wait_seconds_count 10
recserve_queue_wait_seconds_sum 0.02
recserve_inference_seconds_count 5
recserve_inference_seconds_sum 0.02
recserve_backlog_seconds 0
"""
METRICS_AFTER = """
recserve_requests_total{rpc="Embed",code="OK"} 110
recserve_requests_total{rpc="Embed",code="RESOURCE_EXHAUSTED"} 3
recserve_batch_size_bucket{le="1.0"} 4
recserve_batch_size_bucket{le="2.0"} 6
recserve_batch_size_bucket{le="4.0"} 30
recserve_batch_size_bucket{le="+Inf"} 30
recserve_batch_size_count 30
recserve_batch_size_sum 108
recserve_batch_tokens_sum 2700
recserve_batch_real_tokens_total 2300
recserve_request_duration_seconds_count{rpc="Embed"} 110
recserve_request_duration_seconds_sum{rpc="Embed"} 2.1
recserve_queue_wait_seconds_count 110
recserve_queue_wait_seconds_sum 0.52
recserve_inference_seconds_count 30
recserve_inference_seconds_sum 0.27
recserve_backlog_seconds 0.25
"""


def test_server_view_differences_two_scrapes() -> None:
    view = server_view(parse(METRICS_BEFORE, at=0.0), parse(METRICS_AFTER, at=4.0))
    assert view.batches == 25
    assert view.mean_batch_size == 4.0  # (108 - 8) / 25
    assert view.padding_ratio == 1.15  # (2700 - 400) / (2300 - 300)
    assert view.mean_request_ms == 20.0 and view.queue_share == 0.25 and view.inference_share == 0.5
    assert view.backlog_seconds == 0.25
    assert view.requests == {"Embed:OK": 100, "Embed:RESOURCE_EXHAUSTED": 3}
    assert view.batch_size_histogram == {"1.0": 0, "2.0": 2, "4.0": 23, "+Inf": 0}


def test_server_view_reads_the_names_the_server_writes() -> None:
    """The scrape of a real `Metrics` registry: failed calls (one per call) and dropped texts apart."""
    from prometheus_client import generate_latest

    metrics = Metrics()
    model, other = metrics.for_model("m"), metrics.for_model("other")
    metrics.call_finished("m", "Embed", "OK", None)
    metrics.call_finished("m", "Embed", "OK", None)
    before = parse(generate_latest(metrics.registry).decode(), at=0.0)
    for _ in range(5):
        metrics.call_finished("m", "Embed", "OK", None)
    for _ in range(2):
        metrics.call_finished("m", "Embed", "DEADLINE_EXCEEDED", "deadline")
    model.dropped("deadline", 7)
    model.dropped("cancelled", 1)
    model.batch_started(size=4, real_tokens=40, padded_tokens=48)
    other.batch_started(size=2, real_tokens=20, padded_tokens=24)  # two models' batches add up
    model.queue_wait(0.01)
    model.queue_changed(3, 30)
    view = server_view(before, parse(generate_latest(metrics.registry).decode(), at=2.0))
    assert view.requests == {"Embed:OK": 5, "Embed:DEADLINE_EXCEEDED": 2}
    assert view.failures == {"deadline": 2}
    assert view.dropped_texts == {"deadline": 7, "cancelled": 1}
    assert (view.batches, view.mean_batch_size, view.padding_ratio) == (2, 3.0, 1.2)
    assert view.batch_size_histogram["2.0"] == 1 and view.batch_size_histogram["4.0"] == 1
    assert view.mean_queue_wait_ms == 10.0 and view.queue_texts == 3


# --- the loops, against a fake server ---------------------------------------------------------------------


@pytest.fixture
def fast() -> Iterator[FakeServer]:
    with fake_server(FakeInference(delay_s=0.002)) as server:
        yield server


def test_poisson_gaps_are_seeded_and_average_the_rate() -> None:
    first = [g for g, _ in zip(gaps(200.0, "poisson", seed=3), range(4000), strict=False)]
    again = [g for g, _ in zip(gaps(200.0, "poisson", seed=3), range(4000), strict=False)]
    assert first == again
    assert abs(np.mean(first) - 1 / 200) < 0.1 / 200
    assert next(gaps(50.0, "fixed", seed=0)) == 0.02


async def test_closed_loop_numbers_are_consistent(fast: FakeServer) -> None:
    plan = StepPlan(mode="closed", concurrency=4, warmup_s=0.2, window_s=0.5, max_windows=3, tolerance=0.5)
    async with AsyncClient(fast.address) as client:
        step = await run_step(plan, as_target(client), build_workload(WorkloadSpec()))
    check_step(step)
    m = step.measured
    assert m.failed == 0 and m.sent > 50
    assert step.stable is True and step.windows_used == 2  # a loose tolerance: stable at once
    assert m.texts_per_s == m.calls_per_s  # one text per call
    assert m.tokens_per_s > 10 * m.texts_per_s
    assert step.schedule is None and step.warmup.sent > 0 and step.boundaries == (0, 2)


async def test_open_loop_keeps_its_schedule(fast: FakeServer) -> None:
    plan = StepPlan(mode="open", rate=100.0, arrival="fixed", warmup_s=0.2, window_s=1.0, max_windows=1)
    async with AsyncClient(fast.address) as client:
        step = await run_step(plan, as_target(client), build_workload(WorkloadSpec()))
    check_step(step)
    sched = step.schedule
    assert sched is not None
    assert abs(step.measured.sent - 100) <= 1  # exactly the schedule, not what the server could take
    assert abs(sched.sent_rate - 100) <= 1
    assert sched.lag_p50_ms is not None and sched.lag_p50_ms < 5 and not sched.in_flight_cap_hits
    assert step.measured.latency_ms.p50 is not None and step.measured.latency_ms.p50 < 50


async def test_open_loop_latency_includes_the_queue_of_a_slow_server() -> None:
    """A server doing one 20 ms call at a time serves 50 calls/s. Offered 25/s, latency stays near 20 ms;
    offered 100/s, a queue builds and the latencies, measured from the schedule, must rise with it."""
    slow = FakeInference(delay_s=0.02, serial=True)
    with fake_server(slow) as server:
        async with AsyncClient(server.address) as client:
            workload = build_workload(WorkloadSpec())
            light, heavy = [
                await run_step(
                    StepPlan(
                        mode="open", rate=rate, arrival="fixed", warmup_s=0.0, window_s=1.0, max_windows=1
                    ),
                    as_target(client),
                    workload,
                )
                for rate in (25.0, 100.0)
            ]
    check_step(light)
    check_step(heavy, steady=False)
    lo, hi = light.measured, heavy.measured
    assert lo.failed == hi.failed == 0
    assert lo.latency_ms.p50 is not None and hi.latency_ms.p50 is not None and hi.latency_ms.p99 is not None
    assert lo.latency_ms.p50 < 60
    # ~100 calls queued behind 50/s: the last waits ~1 s. A loop timing from the actual send after the
    # previous answer (coordinated omission) would still report ~20 ms here.
    assert hi.latency_ms.p99 > 500
    assert hi.latency_ms.p50 > 5 * lo.latency_ms.p50
    assert hi.sent >= 99  # the schedule was kept although the server fell behind
    assert hi.calls_per_s < 70  # delivered: what the server could do, not what was offered
    assert light.schedule is not None and not light.schedule.client_fell_behind


async def test_open_loop_says_when_the_client_itself_fell_behind() -> None:
    """With at most 2 calls in flight, a 40 ms server takes 50 calls/s of the 100 offered: the sender must
    wait for room, and the report must say that the client, not only the server, limited the step."""
    with fake_server(FakeInference(delay_s=0.04)) as server:
        async with AsyncClient(server.address) as client:
            plan = StepPlan(
                mode="open", rate=100.0, arrival="fixed", warmup_s=0.0, window_s=0.5, max_in_flight=2
            )
            step = await run_step(
                replace(plan, max_windows=1), as_target(client), build_workload(WorkloadSpec())
            )
    check_step(step, steady=False)
    sched = step.schedule
    assert sched is not None
    assert sched.client_fell_behind and sched.in_flight_cap_hits > 0 and sched.late_fraction > 0.5
    p99 = step.measured.latency_ms.p99
    assert p99 is not None and p99 > 100  # the wait for room is charged to the calls


# --- checks before any load --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_target_fails_fast_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    started = time.monotonic()
    assert bench(["run", "--target", f"127.0.0.1:{free_port()}", "--out", str(tmp_path), *QUICK]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("recserve bench: cannot reach 127.0.0.1:") and "\n" not in err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("inference", "health_status", "message"),
    [
        (
            FakeInference(),
            {"": SERVING, SERVICE: 2},
            "reports NOT_SERVING for recserve.v1.Inference, not SERVING",
        ),
        (
            FakeInference(),
            {"": SERVING},
            "has no health status for recserve.v1.Inference: not a recserve server",
        ),
        (FakeInference(), None, "serves no grpc.health.v1 health: not a recserve server"),
        (None, {"": SERVING, SERVICE: SERVING}, "does not implement recserve.v1.Inference/Info"),
    ],
    ids=["not-serving", "other-grpc-service", "no-health", "health-but-no-api"],
)
def test_bad_targets_fail_before_any_load(
    inference: FakeInference | None,
    health_status: dict[str, int] | None,
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    with FakeServer(inference, health_status) as server:
        assert bench(["run", "--target", server.address, "--out", str(tmp_path), *QUICK]) == 3
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    if inference is not None:
        assert inference.calls["Embed"] == inference.calls["Score"] == 0


def test_a_target_that_is_not_grpc_fails_clearly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        target = f"127.0.0.1:{http.server_address[1]}"
        assert bench(["run", "--target", target, "--out", str(tmp_path), *QUICK]) == 3
    finally:
        http.shutdown()
        http.server_close()
    err = capsys.readouterr().err
    assert err.startswith(f"recserve bench: {target} is not a gRPC server (") and err.count("\n") == 1


INVALID_FLAGS = {
    "open without rate": (["--mode", "open"], "--mode open needs --rate"),
    "rate in closed loop": (["--rate", "10"], "--rate and --arrival apply to --mode open"),
    "concurrency in open loop": (
        ["--mode", "open", "--rate", "5", "--concurrency", "2"],
        "applies to --mode closed",
    ),
    "zero callers": (["--concurrency", "4,0"], "--concurrency: expected integers >= 1"),
    "negative rate": (["--mode", "open", "--rate", "-3"], "--rate: expected numbers > 0"),
    "candidates without score": (["--candidates", "4"], "--candidates applies to --rpc score or history"),
    "history without history rpc": (
        ["--rpc", "score", "--history", "3"],
        "--history applies to --rpc history",
    ),
    "texts per call without embed": (["--rpc", "score", "--texts-per-call", "8"], "--texts-per-call applies"),
    "unknown rpc": (["--rpc", "embed=1,upsert=1"], "unknown RPC 'upsert'"),
    "bad workload": (["--workload", "fixed:1"], "fixed:N needs N >= 3"),
    "missing file": (["--workload", "file:/no/such/file.txt"], "is not a file"),
    "batching off without model": (["--batching-off"], "--batching-off starts a second server"),
    "zero duration": (["--duration", "0"], "--duration must be > 0"),
    "bad model repo": (["--model-repo", "/no/such/repo"], "--model-repo:"),
}


@pytest.mark.parametrize("case", sorted(INVALID_FLAGS))
def test_invalid_flags_fail_before_anything_is_sent(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags, message = INVALID_FLAGS[case]
    inference = FakeInference()
    with fake_server(inference) as server:
        assert bench(["run", "--target", server.address, *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sum(inference.calls.values()) == 0  # not even Info


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model-repo", "/no/such/repo"], "--model-repo: model repository /no/such/repo does not exist"),
        (["--open-fractions", "0.5,0"], "--open-fractions: expected numbers > 0"),
        (["--compare", "x"], "--compare: expected comma-separated integers"),
    ],
)
def test_invalid_suite_flags_fail_before_any_server_starts(
    flags: list[str], message: str, tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(["suite", "--model-repo", str(tiny_repo), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# --- reports ------------------------------------------------------------------------------------------------


def test_run_against_a_fake_writes_reports_that_parse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_server(FakeInference(delay_s=0.001)) as server:
        out = ["--out", str(tmp_path / "out"), "--markdown", str(tmp_path / "BENCH.md")]
        rc = bench(
            ["run", "--target", server.address, "--concurrency", "1,4", "--metrics-url", "none", *out, *QUICK]
        )
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["machine"]["cores"] >= 1 and "grpcio" in doc["versions"]
    assert (
        doc["settings"]["concurrency"] == [1, 4] and doc["series"][0]["server"]["weights_sha256"] == "f" * 64
    )
    for step in doc["series"][0]["steps"]:
        check_json_step(step)
    assert "lone" not in doc and "paired" not in doc  # the suite's parts only
    assert (tmp_path / "out" / "knee.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "out" / "throughput.png").read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "BENCH.md").read_text()
    for heading in ("## Workload", "### Closed loop", "## Plots", "## Machine and versions", "## Reproduce"):
        assert heading in md
    assert "](out/knee.png)" in md  # plots linked relative to the Markdown file
    out = capsys.readouterr().out
    assert "closed c=4" in out and "p99 ms" in out  # the terminal table


async def test_reports_are_written_from_the_typed_results(tmp_path: Path, fast: FakeServer) -> None:
    """A step from the load generator with a server view from two scrapes: JSON, Markdown and plots."""
    plan = StepPlan(mode="closed", concurrency=8, warmup_s=0.0, window_s=0.3, max_windows=1)
    async with AsyncClient(fast.address) as client:
        step = await run_step(plan, as_target(client), build_workload(WorkloadSpec()))
    view = server_view(parse(METRICS_BEFORE, at=0.0), parse(METRICS_AFTER, at=4.0))
    step = replace(step, server=view, ratio_to_raw=0.5)
    big = 1 << 20
    limits = Limits(big, big, big, big, max_batch_size=32, max_queue_texts=big)
    info = ServerInfo("fake", "f" * 64, "embedding", 8, 128, "fp32", "none", "mean", True, limits, "fake")
    doc = report.new_document("run", "recserve bench run", {})
    doc = replace(doc, series=(Series(name="target", target="x:1", server=info, steps=(step,)),))
    paths = report.write_all(doc, tmp_path, None)
    assert set(paths) == {"json", "markdown", "knee", "throughput", "latency", "batch_sizes"}
    assert paths["batch_sizes"].read_bytes().startswith(PNG_MAGIC)
    md = paths["markdown"].read_text()
    assert "| 0.50 |" in md and "| 4.0 | 1.15 | 25% | 50% |" in md and "max batch 32" in md
    written = json.loads(paths["json"].read_text())
    assert written == to_json(doc)
    (saved,) = written["series"][0]["steps"]
    check_json_step(saved, frozenset({"server", "ratio_to_raw"}))
    assert saved["ratio_to_raw"] == 0.5 and saved["server"]["dropped_texts"] == {}
    assert saved["texts_per_s"] == step.measured.texts_per_s and saved["boundaries"] == [0, 1]


# --- overload and soak, against the fake ------------------------------------------------------------------

# Every step a fraction of a second; the probe's big calls small enough for the fake's capacity.
OVERLOAD_QUICK = [
    *("--warmup", "0.1", "--duration", "0.4", "--capacity-duration", "0.3", "--capacity-callers", "8"),
    *("--probe-duration", "0.3", "--probe-texts", "40", "--probe-callers", "2", "--probe-deadline", "5"),
    *("--metrics-url", "none", "--quiet"),
]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_outcomes_count_every_status_and_goodput_only_ok_within_the_deadline() -> None:
    """Windows of 1 s from t=10, a 0.5 s deadline. Statuses are of the calls sent in the window; goodput,
    like throughput, of the OK answers that arrive in it within the deadline. An OK answer 0.6 s after it
    was due (the client sent it late) is OK but not good; refusals keep their own latency; a call past its
    deadline is admitted and counts at the time it failed; one with no answer is sent but has no latency."""
    windows = Windows(start=10.0, length=1.0)
    rec = Recorder(windows)
    calls = [
        (9.9, 9.9, 10.05, OK),  # due in the warm-up, answered in the window: good, not sent in it
        (9.5, 9.5, 9.6, OK),  # warm-up, answered before the window: neither
        (10.0, 10.0, 10.1, OK),
        (10.1, 10.1, 10.3, OK),
        (10.2, 10.6, 10.8, OK),  # left 0.4 s late: answered 0.6 s after it was due
        (10.3, 10.3, 10.302, RESOURCE_EXHAUSTED),
        (10.4, 10.4, 10.404, RESOURCE_EXHAUSTED),
        (10.5, 10.5, 11.0, DEADLINE_EXCEEDED),
        (10.8, 10.8, 11.1, OK),  # answered after the window: sent in it, not in its goodput
    ]
    for sched, start, end, code in calls:
        rec.finish(rec.admit(sched, start, index=0), end, code)
    rec.admit(10.9, 10.9, index=0)  # no answer
    out = summary.outcomes(rec.table(), windows, 0, 0, deadline_s=0.5)
    assert out.sent == 8 and sum(f.calls for f in out.statuses.values()) == out.sent
    assert next(iter(out.statuses)) == "OK"
    assert set(out.statuses) == {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", summary.NO_ANSWER}
    assert out.calls("OK") == 4 and out.good == 3 and out.goodput_per_s == 3.0
    refused = out.statuses["RESOURCE_EXHAUSTED"]
    assert refused.share == 0.25 and refused.latency_ms.p50 == 2.0 and refused.latency_ms.p99 == 4.0
    assert out.statuses["DEADLINE_EXCEEDED"].latency_ms.p99 == 500.0
    assert out.statuses[summary.NO_ANSWER].latency_ms.p99 is None
    # Admitted: the four OK and the one past its deadline (100, 200, 600, 300, 500 ms).
    assert (out.admitted_latency_ms.p50, out.admitted_latency_ms.max) == (300.0, 600.0)


def check_level(level: dict[str, Any], capacity: float) -> None:
    """One overload level as results.json has it: its rate, and counts that add up to the calls sent."""
    step, out = level["step"], level["outcomes"]
    assert step["mode"] == "open" and step["rate"] == level["offered_per_s"]
    assert step["schedule"]["target_rate"] == level["offered_per_s"]
    assert out["sent"] == step["sent"] == sum(f["calls"] for f in out["statuses"].values())
    assert abs(sum(f["share"] for f in out["statuses"].values()) - 1) < 1e-4
    assert out["statuses"].get("OK", {"calls": 0})["calls"] == step["completed"]
    # Good answers are among the OK answers that arrived in the window (throughput).
    assert out["goodput_per_s"] == round(out["good"] / step["window_s"], 3) <= step["calls_per_s"]
    assert level["goodput_ratio"] == round(out["goodput_per_s"] / capacity, 3)
    for name, figures in out["statuses"].items():
        assert (figures["latency_ms"]["p99"] is None) == (name == summary.NO_ANSWER)
    assert all(step["consistency"].values())


def test_overload_steps_run_at_multiples_of_the_capacity_and_their_counts_add_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fake that admits by time, at a given capacity: the levels' rates are exact multiples of it, and
    at 3x it refuses calls at once, which the report counts and times."""
    inference = FakeInference(capacity=200.0)
    out = ["--out", str(tmp_path / "out"), "--markdown", str(tmp_path / "OVER.md")]
    with fake_server(inference) as server:
        flags = ["--target", server.address, "--capacity", "200", "--levels", "1,2,3", "--deadline", "0.25"]
        assert bench(["overload", *flags, "--no-probe", *out, *OVERLOAD_QUICK]) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["kind"] == "overload" and doc["series"] == [] and doc["overload"]["fairness"] is None
    over = doc["overload"]
    assert over["capacity"]["calls_per_s"] == 200.0 and "step" not in over["capacity"]
    assert [lv["offered_per_s"] for lv in over["levels"]] == [200.0, 400.0, 600.0]
    for level in over["levels"]:
        check_level(level, 200.0)
        assert level["rss_end_mib"] is None and level["rss_peak_mib"] is None  # no --pid
        assert "cpu" not in level
    at_3x = over["levels"][-1]["outcomes"]["statuses"]
    assert at_3x["RESOURCE_EXHAUSTED"]["calls"] > 0 and at_3x["RESOURCE_EXHAUSTED"]["latency_ms"]["p99"] > 0
    rows = doc["summary"]
    for key in ("overload_goodput", "overload_refusal_p99", "overload_admitted_p99"):
        assert isinstance(rows[key]["met"], bool) and rows[key]["target"]
    assert rows["overload_rss"]["value"] is None and "met" not in rows["overload_rss"]  # unknown
    assert rows["overload_goodput"]["value"] == min(lv["goodput_ratio"] for lv in over["levels"])
    md = (tmp_path / "OVER.md").read_text()
    assert md.startswith("# recserve overload benchmark") and "## Overload" in md
    assert "| level | offered/s | sent/s | goodput/s |" in md and "unknown against the target" in md
    printed = capsys.readouterr().out
    assert "goodput/s" in printed and "overload_goodput:" in printed


def test_overload_counts_only_answers_within_the_deadline_as_goodput(tmp_path: Path) -> None:
    """The server before the fix: it queues everything, so at 3x its callers run out of their deadline and
    none is refused. Those calls are admitted and not good, and the refusal target is missed."""
    with fake_server(FakeInference(capacity=200.0, refuse=False)) as server:
        flags = ["--target", server.address, "--capacity", "200", "--levels", "3", "--deadline", "0.25"]
        assert bench(["overload", *flags, "--no-probe", "--out", str(tmp_path), *OVERLOAD_QUICK]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    (level,) = doc["overload"]["levels"]
    check_level(level, 200.0)
    statuses = level["outcomes"]["statuses"]
    assert "RESOURCE_EXHAUSTED" not in statuses and statuses["DEADLINE_EXCEEDED"]["calls"] > 0
    assert level["outcomes"]["goodput_per_s"] <= level["step"]["calls_per_s"]
    refusal = doc["summary"]["overload_refusal_p99"]
    assert refusal["met"] is False and refusal["value"] is None and "shed no load" in refusal["how"]
    assert doc["summary"]["overload_admitted_p99"]["met"] is False  # the deadline-exceeded calls


def test_overload_measures_capacity_and_probes_fairness(tmp_path: Path) -> None:
    """Capacity from a closed loop, the levels at multiples of it, the server's RSS from /proc (this
    process stands in for the server, through --pid), and the probe: one caller beside a stream."""
    inference = FakeInference(capacity=300.0)
    with fake_server(inference) as server:
        flags = ["--target", server.address, "--pid", str(os.getpid()), "--levels", "1,1.5"]
        assert bench(["overload", *flags, "--out", str(tmp_path), *OVERLOAD_QUICK]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    over = doc["overload"]
    capacity = over["capacity"]
    assert capacity["step"]["mode"] == "closed" and capacity["step"]["concurrency"] == 8
    assert capacity["calls_per_s"] == capacity["step"]["calls_per_s"] > 0
    assert "8 callers" in capacity["how"]
    cap = capacity["calls_per_s"]
    assert [lv["offered_per_s"] for lv in over["levels"]] == [float(f"{f * cap:.6g}") for f in (1, 1.5)]
    for level in over["levels"]:
        check_level(level, cap)
        assert level["rss_end_mib"] > 0 and level["rss_peak_mib"] >= level["rss_end_mib"] > 0
        # Its CPU over the window, per OK call: the process stands in for both the server and the generator.
        cpu = level["cpu"]
        assert cpu["windows"] == 1 and cpu["calls"] == round(level["step"]["calls_per_s"] * cpu["seconds"])
        assert cpu["server_cores"] > 0 and cpu["client_cores"] > 0 and cpu["model_ms"] == 0.0
    assert over["pid"] == os.getpid() and over["rss_before_mib"] > 0
    assert over["rss_peak_mib"] == max(lv["rss_peak_mib"] for lv in over["levels"])
    assert isinstance(doc["summary"]["overload_rss"]["met"], bool)
    fair = over["fairness"]
    assert fair["texts_per_call"] == 40 and fair["stream_callers"] == 2 and 40 in inference.batches
    for caller in (fair["reference"], fair["lone"]):
        assert caller["concurrency"] == 1 and caller["completed"] > 0 and caller["failed"] == 0
    assert fair["stream_calls"] > 0 and fair["stream_texts_per_s"] > 0
    assert fair["model_texts_per_s"] is None  # the fake server has no metrics endpoint
    assert doc["summary"]["fairness_lone_p99"]["value"] == fair["lone"]["latency_ms"]["p99"]
    md = (tmp_path / "summary.md").read_text()
    assert "## Fairness: one-text calls beside 40-text calls" in md and "| beside the stream |" in md
    assert "| model cores | server cores outside the model | load generator cores |" in md
    # Where the lowest level's goodput went, beside the first level's, when the first is not the lowest.
    ratios = [lv["goodput_ratio"] for lv in over["levels"]]
    assert ("the load generator" in doc["summary"]["overload_goodput"]["how"]) == (ratios[1] < ratios[0])


def test_soak_reads_the_process_before_and_after_and_compares_the_first_and_last_windows(
    tmp_path: Path,
) -> None:
    """Three windows of the mixed workload at 0.7 of a given capacity; this process stands in for the
    server (--pid), so its /proc readings are real."""
    with fake_server(FakeInference(capacity=2000.0)) as server:
        flags = ["--target", server.address, "--pid", str(os.getpid()), "--capacity", "100"]
        flags += ["--minutes", "0.02", "--window", "0.4", "--warmup", "0.1", "--metrics-url", "none"]
        assert bench(["soak", *flags, "--out", str(tmp_path), "--quiet"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["kind"] == "soak" and set(doc["workload"]["rpc"]) == {"embed", "score", "history"}
    soak = doc["soak"]
    assert soak["rate_per_s"] == 70.0 and soak["windows"] == 3
    windows = soak["step"]["window_figures"]
    assert len(windows) == 3 and len(soak["samples"]) == 4  # at every window boundary
    assert soak["step"]["windows_used"] == 2 and len(soak["step"]["windows"]) == 3  # no stop once stable
    before, after = soak["before"], soak["after"]
    for reading in (before, after, *soak["samples"]):
        assert reading["pid"] == os.getpid()
        assert reading["rss_mib"] > 0 and reading["open_fds"] > 0 and reading["threads"] >= 1
    assert soak["rss_growth_mib"] == round(after["rss_mib"] - before["rss_mib"], 1)
    assert soak["fds_change"] == after["open_fds"] - before["open_fds"]
    assert soak["threads_change"] == after["threads"] - before["threads"]
    assert soak["first"] == windows[0] and soak["last"] == windows[-1]
    drift = soak["drift"]
    assert drift["first_p99_ms"] == windows[0]["latency_ms"]["p99"]
    assert drift["p99_ms"] == round(windows[-1]["latency_ms"]["p99"] - windows[0]["latency_ms"]["p99"], 3)
    assert doc["summary"]["soak_p99_drift"]["value"] == drift["p99_ms"]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# recserve soak") and "| server process | before | after | change |" in md


OVERLOAD_SOAK_FLAGS = {
    "zero level": (["overload", "--levels", "1,0"], "--levels: expected numbers > 0"),
    "level not a number": (["overload", "--levels", "1,x"], "--levels: expected comma-separated numbers"),
    "zero deadline": (["overload", "--deadline", "0"], "--deadline must be > 0"),
    "negative capacity": (["overload", "--capacity", "-5"], "--capacity must be > 0"),
    "no probe texts": (["overload", "--probe-texts", "0"], "--probe-texts and --max-in-flight must be >= 1"),
    "target and model repo": (
        ["overload", "--model-repo", "/no/such/repo", "--target", "127.0.0.1:1"],
        "--target and --model-repo exclude each other",
    ),
    "pid with model repo": (
        ["soak", "--model-repo", "/no/such/repo", "--pid", "1"],
        "--pid applies to --target",
    ),
    "no such pid": (["soak", "--pid", "999999999"], "--pid 999999999: no such process"),
    "zero fraction": (["soak", "--fraction", "0"], "--fraction must be > 0"),
    "one window": (["soak", "--minutes", "1", "--window", "60"], "it needs at least 2"),
    "unknown rpc": (["soak", "--rpc", "embed,upsert"], "unknown RPC 'upsert'"),
    "bad workload": (["soak", "--workload", "fixed:1"], "fixed:N needs N >= 3"),
}


@pytest.mark.parametrize("case", sorted(OVERLOAD_SOAK_FLAGS))
def test_invalid_overload_and_soak_flags_fail_before_any_load(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, message = OVERLOAD_SOAK_FLAGS[case]
    inference = FakeInference()
    with fake_server(inference) as server:
        target = [] if "--model-repo" in flags else ["--target", server.address]
        assert bench([*flags, *target, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sum(inference.calls.values()) == 0  # not even Info


# --- end to end, the real server -------------------------------------------------------------------------


def test_run_against_the_real_server_closed_and_open(tiny_repo: Path, tmp_path: Path) -> None:
    from tests.support.serving import serving

    with serving(tiny_repo) as server:
        common = ["--target", server.address, "--metrics-url", server.metrics_url, *QUICK]
        assert bench(["run", "--concurrency", "1,8", "--out", str(tmp_path / "closed"), *common]) == 0
        assert bench(["run", "--mode", "open", "--rate", "40", "--out", str(tmp_path / "open"), *common]) == 0
    closed = json.loads((tmp_path / "closed" / "results.json").read_text())["series"][0]["steps"]
    opened = json.loads((tmp_path / "open" / "results.json").read_text())["series"][0]["steps"]
    for step in closed + opened:
        check_json_step(step, frozenset({"server"}))
        assert step["failed"] == 0 and step["completed"] > 0
        server_side = step["server"]
        assert server_side["batches"] > 0 and server_side["mean_batch_size"] >= 1
        assert server_side["padding_ratio"] >= 1
        assert server_side["requests"].get("Embed:OK", 0) > 0
    assert abs(opened[0]["sent"] - 40 * opened[0]["window_s"]) <= 0.5 * 40 * opened[0]["window_s"]  # Poisson


async def test_bare_baseline_answers_like_the_server(tiny_repo: Path, tmp_path: Path) -> None:
    """The bare gRPC baseline does the model's work and nothing else: the same vectors as the server's."""
    from recserve.benchmarks.servers import local_server
    from tests.support.serving import serving

    texts = ["a running shoe", "a longer description of a trail running shoe", ""]
    async with (
        local_server(tiny_repo, threads=1, log_path=tmp_path / "bare.log", bare=True) as bare,
        AsyncClient(bare.address) as client,
    ):
        assert bare.metrics_url is None
        assert (await client.info()).server_version == "bare"
        got = await client.embed(texts)
    with serving(tiny_repo) as server, Client(server.address) as served:
        expected = served.embed(texts)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_suite_writes_benchmarks_markdown(tiny_repo: Path, tmp_path: Path) -> None:
    """The standard suite with tiny settings: raw limit, two servers in child processes, every section;
    and a peer of another protocol (a TEI stub, --peer) in the same run."""
    from tests.support.stub_peers import TeiStub

    with TeiStub() as tei:
        check_suite(tiny_repo, tmp_path, f"tei=tei+http://{tei.address}")
    assert tei.calls["/embed"] > 10  # its lone calls, sweeps and paired windows


def check_suite(tiny_repo: Path, tmp_path: Path, peer: str) -> None:
    md = tmp_path / "BENCHMARKS.md"
    flags = ["--concurrency", "1,4", "--compare", "1,4", "--open-fractions", "0.5", "--raw-repeats", "1"]
    flags += [
        "--rounds",
        "2",
        "--singles",
        "10",
        "--threads",
        "1",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--max-windows",
        "1",
    ]
    out = ["--out", str(tmp_path / "results"), "--markdown", str(md), "--quiet"]
    rc = bench(["suite", "--model-repo", str(tiny_repo), *out, *flags, "--peer", peer])
    assert rc == 0
    doc = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [s["name"] for s in doc["series"]] == ["batching on", "batching off", "tei", "in process"]
    tei = doc["series"][2]
    assert tei["protocol"] == "tei+http" and tei["server"]["model_name"] == "stub/tei-model"
    assert [s["label"].split()[0] for s in tei["steps"]] == ["closed", "closed", "open"]
    assert {"tei_peak", "tei_efficiency", "tei_lone_overhead"} <= set(doc["summary"])
    assert doc["raw"]["texts_per_s"] > 0 and doc["raw"]["single"]["latency_ms"]["p50"] > 0
    summary = {"efficiency", "padding", "lone_overhead", "lone_floor", "open_rate_fraction", "batching_gain"}
    summary |= {"efficiency_floats", "efficiency_big_calls", "tail_ratio", "lone_over_bare"}
    assert summary | {"open_rate_fraction_lone"} <= set(doc["summary"])
    # The open loop again into the engine in this process: the default server's rates, the same bound.
    in_process = doc["series"][3]
    assert in_process["protocol"] == "in-process" and in_process["server"]["model_name"] == tiny_repo.name
    rates = [s["rate"] for s in doc["series"][0]["steps"] if s["mode"] == "open"]
    assert [s["rate"] for s in in_process["steps"]] == rates
    assert all(s["failed"] == 0 and s["completed"] > 0 for s in in_process["steps"])
    assert doc["summary"]["open_rate_fraction_in_process"].get("target") is None
    # Issue 15's rows, each with its target.
    targets = {
        "efficiency": ">= 0.92",
        "efficiency_floats": ">= 0.88",
        "efficiency_big_calls": ">= 0.97",
        "tail_ratio": "<= 1.5",
        "open_rate_fraction_lone": ">= 0.6",
        "lone_over_bare": "<= 0.5 ms",
    }
    for key, target in targets.items():
        assert doc["summary"][key]["target"] == target and isinstance(doc["summary"][key]["met"], bool), key
    # Lone calls: every text to the raw model, the bare gRPC server and the default server.
    lone = doc["lone"]
    assert lone["calls"] == 10
    assert list(lone["latency_ms"]) == ["raw", "bare gRPC", "batching on", "batching on, KServe v2", "tei"]
    # Overheads are p50s of per-text differences: against the raw model for every server, and against the
    # bare baseline for the suite's own servers (a peer takes its turns apart, beside the raw model only).
    assert set(lone["overhead_ms"]) == set(lone["latency_ms"]) - {"raw"}
    assert set(lone["over_bare_ms"]) == {"batching on", "batching on, KServe v2"}
    assert doc["summary"]["lone_overhead"]["value"] == lone["overhead_ms"]["batching on"]
    assert doc["summary"]["lone_floor"]["value"] == lone["overhead_ms"]["bare gRPC"]
    assert doc["summary"]["lone_over_bare"]["value"] == lone["over_bare_ms"]["batching on"]
    # p99 over mean: each paired round's window of the default server gives its own, and the row is their p50.
    ratios = sorted(
        round(w["latency_ms"]["p99"] / w["latency_ms"]["mean"], 3)
        for w in (r["served"]["batching on"] for r in doc["paired"]["rounds"])
    )
    assert doc["summary"]["tail_ratio"]["value"] == ratios[(len(ratios) + 1) // 2 - 1]
    assert doc["series"][1]["server"]["limits"]["max_batch_size"] == 1
    paired = doc["paired"]
    assert paired["callers"] == 4 and len(paired["rounds"]) == 2
    for rnd in paired["rounds"]:
        assert rnd["raw_texts_per_s"] > 0
        entries = {"batching on", "batching on, repeated floats", "batching on, 32 texts a call"}
        assert entries | {"batching on, KServe v2", "one batch at a time", "tei"} == set(rnd["served"])
        assert all(v["texts_per_s"] > 0 and v["failed"] == 0 for v in rnd["served"].values())
    served = sum(r["served"]["batching on"]["texts_per_s"] for r in paired["rounds"])
    raw = sum(r["raw_texts_per_s"] for r in paired["rounds"])
    assert doc["summary"]["efficiency"]["value"] == round(served / raw, 3)
    big = sum(r["served"]["batching on, 32 texts a call"]["texts_per_s"] for r in paired["rounds"])
    assert doc["summary"]["efficiency_big_calls"]["value"] == round(big / raw, 3)
    assert paired["loads"]["batching on, 32 texts a call"] == {
        "callers": 4,
        "texts_per_call": 32,
        "encoding": "f16",
    }
    assert paired["loads"]["batching on, repeated floats"]["encoding"] == "float"
    # The same server over KServe v2, in the same rounds; and a server of two models, alone and at once.
    over_v2 = sum(r["served"]["batching on, KServe v2"]["texts_per_s"] for r in paired["rounds"])
    assert doc["summary"]["kserve_ratio"]["value"] == pytest.approx(over_v2 / served, abs=2e-3)
    assert isinstance(doc["summary"]["two_models"]["met"], bool)
    # CPU per call by thread group: the default server over its paired-round windows, the bare one over one.
    cpu = doc["cpu"]
    assert cpu["callers"] == 4 and list(cpu["targets"]) == ["batching on", "bare gRPC"]
    ours, bare = cpu["targets"]["batching on"], cpu["targets"]["bare gRPC"]
    assert ours["windows"] == 2 and bare["windows"] == 1 and ours["calls"] > 0 and bare["calls"] > 0
    assert ours["server_cores"] > 0 and bare["server_cores"] > 0 and ours["client_cores"] > 0
    assert set(ours["group_ms"]) == {"loop", "tokenize", "grpc", "other", "search", "model"}
    assert bare["group_ms"]["tokenize"] == 0  # the bare server tokenises on its model thread
    assert doc["summary"]["cpu_outside_model"]["value"] == ours["outside_model_ms"]
    assert doc["summary"]["cpu_outside_model_floor"]["value"] == bare["outside_model_ms"]
    text = md.read_text()
    for row in (
        "| 4 callers, one text, packed vectors: served over raw | ",
        "| 4 callers, one text, repeated floats: served over raw | ",
        "| 4 callers x 32 texts: served over raw | ",
        "| p99 over mean latency at 4 callers | ",
        "| Highest open-loop rate with p99 <= 10x the lone-call p50, as a fraction of peak | ",
        "| Lone-call overhead over the bare gRPC baseline | ",
        "| batching on, 32 texts a call | 4 callers x 32 texts | ",
    ):
        assert row in text, row
    for heading in (
        "## Summary",
        "## Servers compared",
        "## Tei",
        "## Batching on",
        "### Open loop",
        "## Lone calls, interleaved",
        "## Efficiency at 4 callers, paired rounds",
        "## CPU per call by thread group at 4 callers",
        "## Batching on against off",
        "## Two models in one server",
        "## Memory: idle and after bursts",
        "## Overload",
        "## Fairness: one-text calls beside 2,000-text calls",
        "## Raw limit",
    ):
        assert heading in text
    # The memory section, on a server of its own: idle, then rounds of bursts with the steps' window.
    memory = doc["memory"]
    assert memory["idle_rss_mib"] > 0 and 3 <= len(memory["rounds"]) <= 4  # the local child's /proc
    assert memory["settings"]["load_s"] == 0.5 and memory["post_burst_rss_mib"] > 0
    assert doc["summary"]["memory_ratio"]["value"] == memory["ratio"]
    assert isinstance(doc["summary"]["memory_ratio"]["met"], bool)
    # The overload section, on a server of its own: the suite's steps' timing, the command's defaults.
    over = doc["overload"]
    assert over["capacity"]["step"]["concurrency"] == 64 and over["deadline_s"] == 2.0
    assert [lv["level"] for lv in over["levels"]] == [1.0, 1.5, 2.0, 3.0]
    for level in over["levels"]:
        check_level(level, over["capacity"]["calls_per_s"])
        assert level["rss_peak_mib"] > 0  # the local child's /proc
    assert over["fairness"]["texts_per_call"] == 2000 and over["fairness"]["lone"]["completed"] > 0
    # The local child has metrics: what its batches ran for the stream, which answers count only coarsely.
    assert over["fairness"]["model_texts_per_s"] > 0
    overload_rows = {"overload_goodput", "overload_refusal_p99", "overload_admitted_p99", "overload_rss"}
    assert overload_rows | {"fairness_lone_p99"} <= set(doc["summary"])
    assert all(isinstance(doc["summary"][key]["met"], bool) for key in overload_rows)
    for plot in ("knee", "throughput", "latency", "batch_sizes"):
        assert (tmp_path / "results" / f"{plot}.png").read_bytes().startswith(PNG_MAGIC)
        assert f"](results/{plot}.png)" in text  # linked from BENCHMARKS.md


def test_recommend_bench_measures_the_build_and_both_pipelines(
    tiny_repo: Path, tiny_cross_repo: Path, tmp_path: Path
) -> None:
    """`recserve bench recommend` on tiny models: the build against the raw limit, and Recommend with and
    without rerank at 1 and 16 callers, every call answered, the reply's split recorded."""
    from recserve.benchmarks.recommend_bench import RecommendBenchConfig, run_recommend_bench

    cfg = RecommendBenchConfig(
        tiny_repo, tmp_path / "out", tiny_cross_repo, items=300, seconds=0.5, threads=1, sizes=(3000,)
    )
    result = run_recommend_bench(cfg, "recserve bench recommend (test)")
    build = result["build"]
    assert build["items"] == 300 and build["items_per_s"] > 0 and build["ratio"] > 0
    rows = result["served"]
    assert [(r["pipeline"].split()[-1], r["callers"]) for r in rows] == [
        ("retrieve", 1),
        ("retrieve", 16),
        ("20", 1),
        ("20", 16),
    ]
    assert all(r["calls"] > 0 and r["failed"] == 0 for r in rows)
    assert all(r["rerank_p50_ms"] == 0 for r in rows[:2]) and all(r["rerank_p50_ms"] > 0 for r in rows[2:])
    # A synthetic catalog that claims the embedder's weights, served: exact and approximate, 1 and 16 callers.
    large = result["sizes"]
    assert [(r["items"], r["search"], r["callers"]) for r in large] == [
        (3000, search, callers) for search in ("exact", "approximate") for callers in (1, 16)
    ]
    assert all(r["calls"] > 0 and r["failed"] == 0 for r in large)
    assert all(0.5 <= r["recall@10"] <= 1.0 for r in large if r["search"] == "approximate")
    text = (tmp_path / "out" / "RECOMMEND.md").read_text()
    assert "## Catalog build" in text and "retrieve + rerank top 20" in text
    assert "## Recommend over large catalogs" in text
