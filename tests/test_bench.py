"""The load-test harness: workloads, statistics, the loops, pre-load checks, reports, and end-to-end runs.

The loops are tested against a fake server that can be made slow on purpose (the harness is the unit under
test there), and end to end against the real server on port 0 with the tiny exported model.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.benchmarks import command, report
from recserve.benchmarks.loadgen import StepPlan, gaps, run_step
from recserve.benchmarks.scrape import parse, server_view
from recserve.benchmarks.stats import latency_summary, percentiles_ordered
from recserve.benchmarks.workloads import (
    DISTRIBUTIONS,
    WorkloadError,
    WorkloadSpec,
    build_workload,
    parse_length_spec,
    parse_rpc_mix,
    read_texts,
)
from recserve.client import AsyncClient, Client
from tests.test_client import SERVICE, SERVING, FakeInference, FakeServer, fake_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--warmup", "0.2", "--duration", "0.6", "--max-windows", "1", "--quiet"]


def bench(argv: list[str]) -> int:
    """`recserve bench ...` through the real argument parser, as the CLI would run it."""
    parser = argparse.ArgumentParser(prog="recserve bench")
    command.configure(parser)
    args = parser.parse_args(argv)
    args._bench_argv = ["bench", *argv]
    return command.run(args)


def check_step(step: dict[str, Any], steady: bool = True) -> None:
    """The invariants every step must satisfy."""
    assert step["completed"] + step["failed"] == step["sent"]
    assert all(step["consistency"].values()), step["consistency"]
    assert percentiles_ordered(step["latency_ms"])
    if steady:
        # Throughput counts answers arriving inside the windows; completed counts calls sent inside them.
        # Unless a queue grows (an overloaded open loop), they differ only by the calls at the two edges.
        slack = (step["concurrency"] or 0) + 0.05 * step["completed"] + 2
        assert abs(step["calls_per_s"] * step["window_s"] - step["completed"]) <= slack


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
    assert (lat["p50"], lat["p90"], lat["p99"], lat["p99_9"], lat["max"]) == (
        500.0,
        900.0,
        990.0,
        999.0,
        1000.0,
    )
    assert percentiles_ordered(lat)
    assert latency_summary(np.array([]))["p99"] is None


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
    assert view["batches"] == 25
    assert view["mean_batch_size"] == 4.0  # (108 - 8) / 25
    assert view["padding_ratio"] == 1.15  # (2700 - 400) / (2300 - 300)
    assert view["mean_request_ms"] == 20.0 and view["queue_share"] == 0.25 and view["inference_share"] == 0.5
    assert view["backlog_seconds"] == 0.25
    assert view["requests"] == {"Embed:OK": 100, "Embed:RESOURCE_EXHAUSTED": 3}
    assert view["batch_size_histogram"] == {"1.0": 0, "2.0": 2, "4.0": 23, "+Inf": 0}


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
        step = await run_step(plan, client.stub, build_workload(WorkloadSpec()))
    check_step(step)
    assert step["failed"] == 0 and step["sent"] > 50
    assert step["stable"] is True and step["windows_used"] == 2  # a loose tolerance: stable at once
    assert step["texts_per_s"] == step["calls_per_s"]  # one text per call
    assert step["tokens_per_s"] > 10 * step["texts_per_s"]


async def test_open_loop_keeps_its_schedule(fast: FakeServer) -> None:
    plan = StepPlan(mode="open", rate=100.0, arrival="fixed", warmup_s=0.2, window_s=1.0, max_windows=1)
    async with AsyncClient(fast.address) as client:
        step = await run_step(plan, client.stub, build_workload(WorkloadSpec()))
    check_step(step)
    sched = step["schedule"]
    assert abs(step["sent"] - 100) <= 1  # exactly the schedule, not what the server could take
    assert abs(sched["sent_rate"] - 100) <= 1
    assert sched["lag_p50_ms"] < 5 and not sched["in_flight_cap_hits"]
    assert step["latency_ms"]["p50"] < 50


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
                    client.stub,
                    workload,
                )
                for rate in (25.0, 100.0)
            ]
    check_step(light)
    check_step(heavy, steady=False)
    assert light["failed"] == heavy["failed"] == 0
    assert light["latency_ms"]["p50"] < 60
    # ~100 calls queued behind 50/s: the last waits ~1 s. A loop timing from the actual send after the
    # previous answer (coordinated omission) would still report ~20 ms here.
    assert heavy["latency_ms"]["p99"] > 500
    assert heavy["latency_ms"]["p50"] > 5 * light["latency_ms"]["p50"]
    assert heavy["sent"] >= 99  # the schedule was kept although the server fell behind
    assert heavy["calls_per_s"] < 70  # delivered: what the server could do, not what was offered
    assert not light["schedule"]["client_fell_behind"]


async def test_open_loop_says_when_the_client_itself_fell_behind() -> None:
    """With at most 2 calls in flight, a 40 ms server takes 50 calls/s of the 100 offered: the sender must
    wait for room, and the report must say that the client, not only the server, limited the step."""
    with fake_server(FakeInference(delay_s=0.04)) as server:
        async with AsyncClient(server.address) as client:
            plan = StepPlan(
                mode="open", rate=100.0, arrival="fixed", warmup_s=0.0, window_s=0.5, max_in_flight=2
            )
            step = await run_step(replace(plan, max_windows=1), client.stub, build_workload(WorkloadSpec()))
    check_step(step, steady=False)
    sched = step["schedule"]
    assert sched["client_fell_behind"] and sched["in_flight_cap_hits"] > 0 and sched["late_fraction"] > 0.5
    assert step["latency_ms"]["p99"] > 100  # the wait for room is charged to the calls


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
        check_step(step)
    assert (tmp_path / "out" / "knee.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "out" / "throughput.png").read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "BENCH.md").read_text()
    for heading in ("## Workload", "### Closed loop", "## Plots", "## Machine and versions", "## Reproduce"):
        assert heading in md
    assert "](out/knee.png)" in md  # plots linked relative to the Markdown file
    out = capsys.readouterr().out
    assert "closed c=4" in out and "p99 ms" in out  # the terminal table


def test_batch_size_plot_from_the_server_view(tmp_path: Path) -> None:
    view = server_view(parse(METRICS_BEFORE, at=0.0), parse(METRICS_AFTER, at=4.0))
    lat = latency_summary(np.array([0.01, 0.02]))
    step = {
        "label": "closed c=8",
        "mode": "closed",
        "concurrency": 8,
        "texts_per_s": 10.0,
        "calls_per_s": 10.0,
    }
    step |= {"sent": 2, "completed": 2, "failed": 0, "latency_ms": lat, "server": view}
    doc = report.new_document("run", "recserve bench run", {})
    doc["series"].append({"name": "target", "target": "x:1", "server": {}, "steps": [step]})
    paths = report.write_all(doc, tmp_path, None)
    assert set(paths) == {"json", "markdown", "knee", "throughput", "batch_sizes"}
    assert paths["batch_sizes"].read_bytes().startswith(PNG_MAGIC)
    assert "| 4.0 | 1.15 | 25% | 50% |" in paths["markdown"].read_text()


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
        check_step(step)
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
    """The standard suite with tiny settings: raw limit, two servers in child processes, every section."""
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
    rc = bench(["suite", "--model-repo", str(tiny_repo), *out, *flags])
    assert rc == 0
    doc = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [s["name"] for s in doc["series"]] == ["batching on", "batching off"]
    assert doc["raw"]["texts_per_s"] > 0 and doc["raw"]["single"]["latency_ms"]["p50"] > 0
    summary = {"efficiency", "padding", "lone_overhead", "lone_floor", "open_rate_fraction", "batching_gain"}
    assert summary <= set(doc["summary"])
    # Lone calls: every text to the raw model, the bare gRPC server and the default server.
    lone = doc["lone"]
    assert lone["calls"] == 10 and list(lone["latency_ms"]) == ["raw", "bare gRPC", "batching on"]
    for name, overhead in lone["overhead_ms"].items():
        assert overhead == round(lone["latency_ms"][name]["p50"] - lone["latency_ms"]["raw"]["p50"], 3)
    assert doc["summary"]["lone_overhead"]["value"] == lone["overhead_ms"]["batching on"]
    assert doc["summary"]["lone_floor"]["value"] == lone["overhead_ms"]["bare gRPC"]
    assert doc["series"][1]["server"]["limits"]["max_batch_size"] == 1
    paired = doc["paired"]
    assert paired["callers"] == 4 and len(paired["rounds"]) == 2
    for rnd in paired["rounds"]:
        assert rnd["raw_texts_per_s"] > 0
        assert {"batching on", "one batch at a time"} == set(rnd["served"])
        assert all(v["texts_per_s"] > 0 and v["failed"] == 0 for v in rnd["served"].values())
    served = sum(r["served"]["batching on"]["texts_per_s"] for r in paired["rounds"])
    raw = sum(r["raw_texts_per_s"] for r in paired["rounds"])
    assert doc["summary"]["efficiency"]["value"] == round(served / raw, 3)
    text = md.read_text()
    for heading in (
        "## Summary",
        "## Batching on",
        "### Open loop",
        "## Lone calls, interleaved",
        "## Efficiency at 4 callers, paired rounds",
        "## Batching on against off",
        "## Raw limit",
    ):
        assert heading in text
    for plot in ("knee", "throughput", "batch_sizes"):
        assert (tmp_path / "results" / f"{plot}.png").read_bytes().startswith(PNG_MAGIC)
