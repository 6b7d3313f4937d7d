"""The harness against the other protocols (recserve/benchmarks/protocols.py, peers.py): OpenAI-compatible and
TEI embeddings over HTTP, KServe v2 over gRPC, each against a small stub server (tests/support/stub_peers.py)
started in the test; the same loops and reports as for recserve, their pre-load checks and their errors, and
the suite's peers."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.benchmarks import command, flags, report, suite
from recserve.benchmarks.config import ConfigError, PeerSpec
from recserve.benchmarks.loadgen import StepPlan, run_step
from recserve.benchmarks.protocols import (
    Endpoint,
    EndpointError,
    RecserveCalls,
    Reply,
    Target,
    as_target,
    open_target,
    parse_endpoint,
)
from recserve.benchmarks.recorder import OK
from recserve.benchmarks.results import PeerInfo, RawLimit, SingleLatency, StepResult
from recserve.benchmarks.stats import latency_summary
from recserve.benchmarks.workloads import Workload, WorkloadSpec, build_workload
from recserve.client import AsyncClient
from tests.support.bench import bench, suite_config
from tests.support.fake_server import FakeInference, fake_server, fake_vector
from tests.support.stub_peers import KServeStub, OpenAIStub, TeiStub

QUICK = ["--warmup", "0.2", "--duration", "0.5", "--max-windows", "1", "--quiet"]
QUICK_PLAN = StepPlan(mode="closed", concurrency=4, warmup_s=0.1, window_s=0.4, max_windows=1)


def check_step(step: dict[str, Any]) -> None:
    assert step["completed"] + step["failed"] == step["sent"] > 0
    assert all(step["consistency"].values()), step["consistency"]
    assert "server" not in step  # no server view: only recserve's metrics give one


# --- target URLs -------------------------------------------------------------------------------------------


def test_target_urls_name_their_protocol() -> None:
    assert parse_endpoint("127.0.0.1:50051") == Endpoint("recserve", "127.0.0.1:50051")
    assert parse_endpoint("grpc://10.0.0.1:50051").url == "10.0.0.1:50051"
    assert parse_endpoint("dns:///recserve.svc:50051").protocol == "recserve"  # a gRPC resolver, as it is
    openai = parse_endpoint("openai+http://h:8080?model=BAAI/bge-small-en")
    assert (openai.protocol, openai.address, openai.path, openai.model) == (
        "openai+http",
        "h:8080",
        "/v1/embeddings",
        "BAAI/bge-small-en",
    )
    assert parse_endpoint(openai.url) == openai  # the URL it reports reads back the same
    assert parse_endpoint("openai+http://h:7997/embeddings").path == "/embeddings"  # infinity's own route
    assert parse_endpoint("tei+http://h:80").path == "/embed"
    assert parse_endpoint("kserve-v2://h:8001?model=enc").model == "enc"
    assert parse_endpoint("tei+http://h:80").rpcs == {"embed"} and len(parse_endpoint("h:1").rpcs) == 3
    for bad, message in (
        ("http://h:80", "unknown scheme 'http'"),
        ("openai+http://h", "expected openai+http://HOST:PORT"),
        ("kserve-v2://h:8001/v2", "with no path"),
        ("tei+http://h:80?model=x", "TEI serves one model"),
        ("openai+http://h:80?model=a&model=b", "one ?model=NAME"),
        ("localhost", "expected HOST:PORT"),
    ):
        with pytest.raises(EndpointError, match=re.escape(message)):
            parse_endpoint(bad)
    with pytest.raises(EndpointError, match=re.escape("has Embed only: --rpc score needs the recserve API")):
        parse_endpoint("tei+http://h:80").check_rpcs({"embed", "score"})


# --- the same load against every protocol ------------------------------------------------------------------


@pytest.fixture
def openai() -> Iterator[OpenAIStub]:
    with OpenAIStub() as stub:
        yield stub


@pytest.fixture
def tei() -> Iterator[TeiStub]:
    with TeiStub() as stub:
        yield stub


@pytest.fixture
def kserve() -> Iterator[KServeStub]:
    with KServeStub() as stub:
        yield stub


@pytest.mark.parametrize("kind", ["openai", "tei", "kserve"])
def test_each_protocol_takes_the_same_closed_and_open_loops(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stub = request.getfixturevalue(kind)
    scheme = {"openai": "openai+http", "tei": "tei+http", "kserve": "kserve-v2"}[kind]
    url = f"{scheme}://{stub.address}"
    out = ["--out", str(tmp_path / "closed"), "--markdown", str(tmp_path / "BENCH.md")]
    assert bench(["run", "--target", url, "--concurrency", "1,4", *out, *QUICK]) == 0
    open_out = ["--out", str(tmp_path / "open")]
    assert (
        bench(
            [
                "run",
                "--target",
                url,
                "--mode",
                "open",
                "--rate",
                "60",
                "--arrival",
                "fixed",
                *open_out,
                *QUICK,
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "closed" / "results.json").read_text())
    (series,) = doc["series"]
    assert series["target"] == url and series["protocol"] == scheme
    info = series["server"]
    assert info["protocol"] == scheme and info["dimension"] == stub.dim
    assert (
        info["model_name"]
        == {"openai": "stub-model", "tei": "stub/tei-model", "kserve": "stub-encoder"}[kind]
    )
    assert info["server"] == {"openai": "stub-openai 9.9", "tei": "text-embeddings-inference 1.5.0"}.get(
        kind, "kserve-stub 0.1"
    )
    for step in series["steps"]:
        check_step(step)
        assert step["failed"] == 0 and step["texts_per_s"] > 0
    # The servers' own token counts replace the estimates where the protocol carries them.
    assert (series["steps"][0]["tokens_per_s"] > 0) and "latency_distribution" in series["steps"][0]
    (opened,) = json.loads((tmp_path / "open" / "results.json").read_text())["series"][0]["steps"]
    check_step(opened)
    assert abs(opened["sent"] - 30) <= 1 and opened["schedule"]["target_rate"] == 60  # the schedule, kept
    assert sum(stub.calls.values()) > 30
    md = (tmp_path / "BENCH.md").read_text()
    assert f"Target `{url}`" in md and "no server-side figures" in md


def test_the_peers_get_the_workloads_texts(openai: OpenAIStub, tei: TeiStub, kserve: KServeStub) -> None:
    """What each protocol puts on the wire: the ring's texts, in its own request shape."""
    workload = build_workload(WorkloadSpec(texts_per_call=3))

    async def first_call(url: str) -> Reply:
        async with open_target(parse_endpoint(url)) as target:
            await target.check(workload.spec, [])
            return await target.calls(workload).send(0, 5.0)

    first = workload.messages[0].texts
    assert asyncio.run(first_call(f"openai+http://{openai.address}"))[0] == OK
    assert openai.bodies[-1] == {"input": list(first), "model": "stub-model"}
    code, tokens = asyncio.run(first_call(f"tei+http://{tei.address}"))
    assert code == OK and tokens == sum(len(t.split()) + 2 for t in first)  # TEI's x-compute-tokens
    assert tei.bodies[-1] == {"inputs": list(first), "truncate": True}
    assert asyncio.run(first_call(f"kserve-v2://{kserve.address}")) == (OK, None)
    assert kserve.bodies[-1] == list(first)


def test_an_openai_peer_is_named_by_its_openapi_title_unless_it_is_fastapis_placeholder() -> None:
    workload = build_workload(WorkloadSpec())

    async def named(url: str) -> str:
        async with open_target(parse_endpoint(url)) as target:
            return (await target.check(workload.spec, [])).server

    for title, expected in (
        ("Infinity - Embedding Inference Server", "Infinity - Embedding Inference Server 9.9"),
        ("FastAPI", ""),
    ):
        with OpenAIStub(title=title) as stub:
            assert asyncio.run(named(f"openai+http://{stub.address}")) == expected


@dataclass
class Case:
    stub: Any
    scheme: str
    deadline_s: float = 5.0


@pytest.mark.parametrize(
    ("case", "status"),
    [
        (Case(OpenAIStub(fail_every=3), "openai+http"), "HTTP_503"),
        (Case(TeiStub(short=True), "tei+http"), "MISMATCHED_REPLY"),
        (Case(OpenAIStub(delay_s=0.3), "openai+http", deadline_s=0.1), "DEADLINE_EXCEEDED"),
        (Case(KServeStub(fail_every=3), "kserve-v2"), "UNAVAILABLE"),
        (Case(KServeStub(short=True), "kserve-v2"), "MISMATCHED_REPLY"),
    ],
    ids=["http-status", "tei-short", "http-timeout", "kserve-status", "kserve-short"],
)
async def test_failed_calls_are_counted_by_status(case: Case, status: str) -> None:
    """An error answer keeps its status (an HTTP one as HTTP_<status>), an answer of the wrong shape is a
    mismatch, a call past its deadline DEADLINE_EXCEEDED; the loop keeps going and the counts add up."""
    workload = build_workload(WorkloadSpec())
    with case.stub as stub:
        async with open_target(parse_endpoint(f"{case.scheme}://{stub.address}")) as target:
            await target.check(workload.spec, [])  # the `short` stubs answer the probe in full
            step = await run_step(replace(QUICK_PLAN, deadline_s=case.deadline_s), target, workload)
    m = step.measured
    assert step.consistency.ok and m.failed > 0 and set(m.errors) == {status}
    if status != "DEADLINE_EXCEEDED" and not getattr(stub, "short", False):
        assert m.completed > 0  # every third call failed, the others did not


# --- checks before any load ------------------------------------------------------------------------------


BAD_PEERS = {
    "unreachable": (
        lambda: OpenAIStub(),
        "openai+http://127.0.0.1:1",
        "cannot reach openai+http://127.0.0.1:1",
    ),
    "tei route on openai": (
        lambda: OpenAIStub(),
        "tei+http://{a}",
        "POST /embed answered HTTP 404 (404: Not Found)",
    ),
    "http at grpc": (lambda: fake_server(FakeInference()), "openai+http://{a}", "does not answer HTTP/1.1"),
    "kserve at recserve": (
        lambda: fake_server(FakeInference()),
        "kserve-v2://{a}",
        "does not implement inference.GRPCInferenceService/ServerLive: not a KServe v2 server",
    ),
    "two openai models": (
        lambda: OpenAIStub(models=("a", "b")),
        "openai+http://{a}",
        "serves 2 models (a, b): name one with --model",
    ),
    "unknown openai model": (lambda: OpenAIStub(), "openai+http://{a}?model=zz", "model zz not found"),
    "two kserve models": (
        lambda: KServeStub(models=("a", "b")),
        "kserve-v2://{a}",
        "serves 2 models (a, b): name one with --model",
    ),
    "kserve not ready": (lambda: KServeStub(ready=False), "kserve-v2://{a}", "says it is not ready"),
    "kserve wrong tensors": (
        lambda: KServeStub(input_type="INT64"),
        "kserve-v2://{a}",
        "takes (TEXT INT64) and gives (EMBEDDING FP32); the harness sends TEXT BYTES",
    ),
    "kserve unknown model": (
        lambda: KServeStub(),
        "kserve-v2://{a}?model=zz",
        "ModelMetadata failed (NOT_FOUND",
    ),
    "tei batch limit": (
        lambda: TeiStub(max_client_batch_size=2),
        "tei+http://{a}",
        "takes at most 2 texts per call (max_client_batch_size); this workload sends 4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
def test_peers_that_cannot_take_the_load_fail_before_it_with_one_line(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make, url, message = BAD_PEERS[case]
    with make() as server:
        target = url.format(a=server.address)
        argv = ["run", "--target", target, "--texts-per-call", "4", "--out", str(tmp_path), *QUICK]
        assert bench(argv) == 3
        calls = server.calls if hasattr(server, "bodies") else {}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "results.json").exists()
    assert sum(calls.get(k, 0) for k in ("/v1/embeddings", "/embed", "ModelInfer")) <= 1  # the probe at most


PROTOCOL_FLAGS = {
    "score on openai": (
        ["--rpc", "score"],
        "openai+http",
        "has Embed only: --rpc score needs the recserve API",
    ),
    "history on kserve": (
        ["--rpc", "embed=1,history=1"],
        "kserve-v2",
        "--rpc history needs the recserve API",
    ),
    "model on tei": (["--model", "m"], "tei+http", "--model does not apply to tei+http://"),
    "model disagrees": (["--model", "b"], "openai+http", "--model b and the target's ?model=a disagree"),
    "tls over http": (["--tls"], "tei+http", "apply to gRPC targets"),
    "metrics of a peer": (["--metrics-url", "http://h:8000/metrics"], "kserve-v2", "other targets have no"),
    "unknown scheme": ([], "http", "unknown scheme 'http'"),
}


@pytest.mark.parametrize("case", sorted(PROTOCOL_FLAGS))
def test_flags_a_protocol_cannot_take_are_usage_errors(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra, scheme, message = PROTOCOL_FLAGS[case]
    with OpenAIStub(models=("a",)) as stub:
        query = "?model=a" if case == "model disagrees" else ""
        assert bench(["run", "--target", f"{scheme}://{stub.address}{query}", *extra, "--quiet"]) == 2
        assert not stub.calls
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["overload", "soak"])
def test_overload_and_soak_take_recserve_targets_only(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench([kind, "--target", "openai+http://127.0.0.1:1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"bench {kind} measures a recserve server" in err and err.count("\n") == 1, err


def test_the_model_flag_picks_one_of_several(tmp_path: Path) -> None:
    with OpenAIStub(models=("a", "b")) as openai, KServeStub(models=("x", "y")) as kserve:
        for url, model in ((f"openai+http://{openai.address}", "b"), (f"kserve-v2://{kserve.address}", "y")):
            out = ["--out", str(tmp_path / model)]
            assert bench(["run", "--target", url, "--model", model, "--concurrency", "2", *out, *QUICK]) == 0
            doc = json.loads((tmp_path / model / "results.json").read_text())
            assert doc["series"][0]["server"]["model_name"] == model
            assert doc["series"][0]["target"].endswith(f"?model={model}")
        assert {b["model"] for b in openai.bodies} == {"b"}
        assert "RepositoryIndex" not in kserve.calls  # named, so not looked up


async def test_recserve_calls_name_the_served_model_and_carry_the_token() -> None:
    """`--model` on a recserve target names one served model in every prebuilt call (the workload's own
    messages stay as built), and the load's calls carry the client's bearer token like its own calls do."""
    workload = build_workload(WorkloadSpec(rpc={"embed": 0.5, "score": 0.5}))
    async with AsyncClient("127.0.0.1:1", token="secret") as client:
        calls = RecserveCalls(client, workload, model="item-tower")
    assert {m.model for m in calls.messages} == {"item-tower"} and not any(m.model for m in workload.messages)
    assert [type(m) for m in calls.messages] == [type(m) for m in workload.messages]
    assert calls.metadata == (("authorization", "Bearer secret"),)
    parser = argparse.ArgumentParser()
    command.configure(parser)
    config = flags.run_config(parser.parse_args(["run", "--target", "h:1", "--model", "item-tower"]), argv=[])
    assert config.endpoint == Endpoint("recserve", "h:1", model="item-tower") and config.target == "h:1"


# --- the loop survives a call that raises ------------------------------------------------------------------


class Flaky(Target):
    """An in-memory target whose every third call raises: a client-library bug, say."""

    def __init__(self) -> None:
        super().__init__(Endpoint("openai+http", "memory:0", "/v1/embeddings"))
        self.sent = 0

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> PeerInfo:
        raise NotImplementedError

    def prepare(self, workload: Workload) -> Flaky:
        return self

    async def send(self, i: int, deadline_s: float) -> Reply:
        self.sent += 1
        if self.sent % 3 == 0:
            raise RuntimeError("a bug")
        return OK, None


async def test_a_call_that_raises_is_counted_as_a_client_error_and_the_callers_go_on() -> None:
    target = Flaky()
    step = await run_step(QUICK_PLAN, target, build_workload(WorkloadSpec()))
    m = step.measured
    assert step.consistency.ok and set(m.errors) == {"CLIENT_ERROR"}
    assert m.failed == pytest.approx(m.sent / 3, abs=4) and m.completed > 100  # all four callers went on


# --- the suite's peers -----------------------------------------------------------------------------------


def test_peer_flags_are_checked() -> None:
    (peer,) = flags.peer_specs(["tei=tei+http://h:80"])
    assert peer == PeerSpec("tei", parse_endpoint("tei+http://h:80"))
    for values, message in (
        (["tei"], "expected NAME=URL"),
        (["=tei+http://h:80"], "expected NAME=URL"),
        (["a=h:1", "a=h:2"], "the name 'a' is taken"),
        (["batching on=h:1"], "the name 'batching on' is taken"),
        (["x=http://h:80"], "unknown scheme"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            flags.peer_specs(values)


class FakeRaw:
    """Stands in for baseline.RawModel in the lone calls: the same vectors as the fake server, at once."""

    def run(self, texts: list[str]) -> np.ndarray:
        return np.array([fake_vector(t, 8) for t in texts])


def raw_figure(texts_per_s: float) -> RawLimit:
    single = SingleLatency(calls=1, latency_ms=latency_summary(np.array([0.001])))
    return RawLimit(
        texts=1,
        batch_size=32,
        threads=1,
        precision="fp32",
        provider="CPUExecutionProvider",
        model_file="model.onnx",
        model_sha256="0" * 64,
        repeats=1,
        pass_seconds=(1.0,),
        texts_per_s=texts_per_s,
        tokens_per_s=1.0,
        padding_ratio=None,
        single=single,
    )


async def test_suite_peers_join_the_lone_calls_the_paired_rounds_and_the_sweeps(tmp_path: Path) -> None:
    """A recserve server (the fake) and an OpenAI-compatible peer through the suite's own parts."""
    with fake_server(FakeInference(delay_s=0.001)) as server, OpenAIStub() as stub:
        peer = PeerSpec("peer", parse_endpoint(f"openai+http://{stub.address}"))
        cfg = suite_config(
            tmp_path,
            concurrency=(1, 2),
            open_fractions=(0.5,),
            compare=(1, 2),
            rounds=2,
            singles=5,
            peers=(peer,),
        )
        workload = build_workload(cfg.workload)
        notes: list[str] = []
        async with (
            suite.opened_peers(cfg.peers, workload, notes) as peers,
            AsyncClient(server.address) as client,
        ):
            (p,) = peers
            assert p.name == "peer" and isinstance(p.info, PeerInfo) and p.info.dimension == 8
            ours = as_target(client)
            lone = await suite.lone_calls(
                cfg, workload, FakeRaw(), [(suite.DEFAULT, ours)], [("peer", p.target)]
            )

            async def raw_pass() -> RawLimit:
                return raw_figure(1000.0)

            paired = await suite.paired_rounds(
                cfg,
                workload,
                [suite.Entry(suite.DEFAULT, ours), suite.Entry("peer", p.target)],
                raw_pass,
                None,
            )
            steps = await suite.closed_then_open(
                cfg,
                workload,
                p.target,
                metrics_url=None,
                series="peer",
                raw_texts_per_s=1000.0,
                progress=None,
            )
    assert lone.calls == 5 and list(lone.latency_ms) == [suite.RAW, suite.DEFAULT, "peer"]
    # The peer took its turns in a rotation of its own with the raw model: an overhead, none over bare.
    assert set(lone.overhead_ms) == {suite.DEFAULT, "peer"} and lone.over_bare_ms == {}
    assert set(paired.efficiency) == {suite.DEFAULT, "peer"} and all(paired.efficiency.values())
    assert [s.label.split()[0] for s in steps] == ["closed", "closed", "open"]
    peak = max(s.measured.calls_per_s for s in steps[:2])
    assert steps[2].rate == round(0.5 * peak, 1)  # the peer's own peak
    series = report_series(steps, p.target.name)
    rows = suite.peer_summary([series], paired, lone)
    assert set(rows) == {"peer_peak", "peer_efficiency", "peer_lone_overhead"}
    section = "\n".join(suite.servers_section(cfg, [series], paired, lone))
    assert f"| peer | `{p.target.name}` | OpenAI-compatible embeddings over HTTP |" in section
    assert "A peer's ratio" in "\n".join(suite.paired_section(paired))


def report_series(steps: list[StepResult], target: str) -> Any:
    from recserve.benchmarks.results import Series

    info = PeerInfo(
        protocol="openai+http",
        model_name="stub-model",
        dimension=8,
        server="",
        max_texts_per_call=None,
        details={},
    )
    return Series(name="peer", target=target, protocol="openai+http", server=info, steps=tuple(steps))


def test_a_peer_series_reads_in_every_report(tmp_path: Path) -> None:
    """A document whose series is a peer's: the Markdown names its protocol, the machine lines its server."""
    doc = report.new_document("run", "recserve bench run", {})
    step_doc = replace(doc, series=(report_series([], "openai+http://h:80"),))
    md = report.markdown(step_doc, {}, "")
    assert (
        "Target `openai+http://h:80` (OpenAI-compatible embeddings over HTTP): stub-model, dimension 8." in md
    )
    assert "- peer: server not named at `openai+http://h:80`, model stub-model" in md
