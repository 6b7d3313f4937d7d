"""The suite's paired rounds and its headline figures (issue 15's ratios), from results built by hand and
from a fake server: each figure's rule, its target, and the row BENCHMARKS.md shows for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import grpc.aio
import pytest

from recserve.benchmarks import report, suite
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import (
    Consistency,
    Figures,
    LatencySummary,
    LoneCalls,
    PairedRounds,
    PeerInfo,
    RawLimit,
    Round,
    RoundLoad,
    Series,
    Served,
    SingleLatency,
    StepResult,
    StepSettings,
    SummaryItem,
    Warmup,
)
from recserve.benchmarks.targets import TargetError
from recserve.benchmarks.workloads import WorkloadSpec, build_workload
from recserve.client import AsyncClient
from recserve.v1 import inference_pb2 as pb
from tests.support.bench import suite_config
from tests.support.fake_server import FakeInference, fake_server
from tests.test_bench_targets import raw_figure


def step(
    mode: Literal["closed", "open"],
    offered: float,
    *,
    p99: float | None = 10.0,
    mean: float | None = 5.0,
    calls_per_s: float = 100.0,
    failed: int = 0,
) -> StepResult:
    """A step as a sweep returns it: `offered` callers (closed loop) or calls/s (open loop)."""
    closed = mode == "closed"
    latency = LatencySummary(p50=mean, p90=p99, p99=p99, p99_9=p99, max=p99, mean=mean)
    measured = Figures(
        window_s=1.0,
        sent=100 + failed,
        completed=100,
        failed=failed,
        errors={"UNAVAILABLE": failed} if failed else {},
        calls_per_s=calls_per_s,
        texts_per_s=calls_per_s,
        tokens_per_s=30 * calls_per_s,
        latency_ms=latency,
    )
    return StepResult(
        measured=measured,
        label=f"closed c={offered:g}" if closed else f"open {offered:g}/s poisson",
        mode=mode,
        concurrency=int(offered) if closed else None,
        rate=None if closed else offered,
        arrival=None if closed else "poisson",
        windows=(measured.counts(),),
        windows_used=1,
        boundaries=(0, 1),
        warmup=Warmup(sent=0, failed=0, errors={}),
        stable=None,
        bounded_by_calls=False,
        stragglers_cancelled=0,
        plan=StepSettings(
            warmup_s=0.0, window_s=1.0, max_windows=1, tolerance=0.05, deadline_s=10.0, max_calls=10**6
        ),
        consistency=Consistency(
            completed_plus_failed_is_sent=True, percentiles_ordered=True, errors_add_up=True
        ),
    )


def lone(**p50: float) -> LoneCalls:
    """Lone calls whose parties had these p50s (ms): raw, bare, default."""
    names = {"raw": suite.RAW, "bare": suite.BARE, "default": suite.DEFAULT}
    latency = {names[k]: LatencySummary(p50=v, p90=v, p99=v, p99_9=v, max=v, mean=v) for k, v in p50.items()}
    raw = p50.get("raw", 0.0)
    bare = p50.get("bare")
    return LoneCalls(
        calls=100,
        latency_ms=latency,
        overhead_ms={names[k]: round(v - raw, 3) for k, v in p50.items() if k != "raw"},
        over_bare_ms={}
        if bare is None
        else {names[k]: round(v - bare, 3) for k, v in p50.items() if k not in ("raw", "bare")},
    )


LOADS = {
    suite.DEFAULT: RoundLoad(callers=64, texts_per_call=1, encoding="f16"),
    suite.FLOATS: RoundLoad(callers=64, texts_per_call=1, encoding="float"),
    suite.BIG_CALLS: RoundLoad(callers=4, texts_per_call=32, encoding="f16"),
}


def paired_of(
    served: dict[str, tuple[float, float]], raw: tuple[float, float] = (200.0, 100.0)
) -> PairedRounds:
    """Two rounds of these raw texts/s, each entry serving its two texts/s; efficiency as the suite's."""
    latency = LatencySummary()
    rounds = tuple(
        Round(
            raw_texts_per_s=raw[i],
            served={
                name: Served(texts_per_s=tps[i], latency_ms=latency, failed=0, server=None)
                for name, tps in served.items()
            },
        )
        for i in range(2)
    )
    return PairedRounds(
        callers=64,
        rounds=rounds,
        efficiency={name: round(sum(tps) / sum(raw), 3) for name, tps in served.items()},
        loads={name: LOADS[name] for name in served},
    )


def rendered(item: SummaryItem) -> str:
    """The item's row as BENCHMARKS.md has it."""
    doc = replace(report.new_document("suite", "recserve bench suite", {}), summary={"item": item})
    (row,) = [
        line for line in report.markdown(doc, {}, "").splitlines() if line.startswith(f"| {item.title} |")
    ]
    return row


# --- served over raw --------------------------------------------------------------------------------------


def test_served_over_raw_is_judged_against_the_target_of_its_load() -> None:
    """Packed vectors at one text a call against 0.92, repeated floats against 0.88, 32-text calls against
    0.97: each entry's total served over the same rounds' total raw."""
    paired = paired_of(
        {
            suite.DEFAULT: (186.0, 93.0),  # 279 / 300 = 0.93
            suite.FLOATS: (176.0, 85.0),  # 261 / 300 = 0.87
            suite.BIG_CALLS: (196.0, 95.0),  # 291 / 300 = 0.97
        }
    )
    packed = suite.served_over_raw(paired, suite.DEFAULT)
    floats = suite.served_over_raw(paired, suite.FLOATS)
    big = suite.served_over_raw(paired, suite.BIG_CALLS)
    assert packed is not None and floats is not None and big is not None
    assert (packed.value, packed.target, packed.met) == (0.93, ">= 0.92", True)
    assert (floats.value, floats.target, floats.met) == (0.87, ">= 0.88", False)
    assert (big.value, big.target, big.met) == (0.97, ">= 0.97", True)
    assert "issue 9's bar was 0.9" in packed.how and "2 paired rounds" in packed.how
    assert "issue 9" not in big.how and "issue 9" not in floats.how
    assert rendered(packed).startswith(
        "| 64 callers, one text, packed vectors: served over raw | 0.930 (meets the target >= 0.92) |"
    )
    assert rendered(floats).startswith(
        "| 64 callers, one text, repeated floats: served over raw | 0.870 (misses the target >= 0.88) |"
    )
    assert rendered(big).startswith(
        "| 4 callers x 32 texts: served over raw | 0.970 (meets the target >= 0.97) |"
    )


def test_served_over_raw_misses_just_under_its_target_and_is_absent_without_its_entry() -> None:
    paired = paired_of({suite.DEFAULT: (183.0, 92.0)})  # 275 / 300 = 0.917: 0.92 to two digits, not enough
    item = suite.served_over_raw(paired, suite.DEFAULT)
    assert item is not None and item.value == 0.917 and item.met is False
    assert "0.917 (misses the target >= 0.92)" in rendered(item)
    assert suite.served_over_raw(paired, suite.FLOATS) is None


def test_one_text_of_repeated_floats_as_the_suites_own_load_takes_the_floats_target() -> None:
    """A suite run with --encoding float: its own entry is the repeated-floats figure."""
    paired = replace(paired_of({suite.DEFAULT: (180.0, 87.0)}), loads={suite.DEFAULT: LOADS[suite.FLOATS]})
    item = suite.served_over_raw(paired, suite.DEFAULT)
    assert item is not None and item.title.startswith("64 callers, one text, repeated floats")
    assert (item.value, item.target, item.met) == (0.89, ">= 0.88", True)


# --- p99 over mean ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p99", "mean", "value", "met"),
    [
        (7.5, 5.0, 1.5, True),
        (7.52, 5.0, 1.504, False),  # 1.50 to two digits, but over the bound
        (8.0, 5.0, 1.6, False),
        (None, None, None, False),
        (5.0, 0.0, None, False),
    ],
)
def test_p99_over_mean_of_the_closed_loop_step(
    p99: float | None, mean: float | None, value: float | None, met: bool
) -> None:
    item = suite.tail_ratio(step("closed", 64, p99=p99, mean=mean))
    assert (item.value, item.met, item.target) == (value, met, "<= 1.5")
    assert item.title == "p99 over mean latency at 64 callers"
    assert f"mean {mean} ms" in item.how and "`closed c=64`" in item.how


def test_p99_over_mean_is_the_p50_of_the_paired_rounds_windows() -> None:
    """Each window's own p99 over mean, their p50: the round whose window took a stall of the machine (all
    64 calls in flight wait it out) moves one value, not the figure; the sweep's step is shown beside."""

    def served(p99: float, mean: float) -> dict[str, Served]:
        latency = LatencySummary(p50=mean, p90=p99, p99=p99, p99_9=p99, max=p99, mean=mean)
        return {suite.DEFAULT: Served(texts_per_s=150.0, latency_ms=latency, failed=0, server=None)}

    windows = [(570.0, 400.0), (580.0, 400.0), (800.0, 400.0)]  # 1.425, 1.45, then a stalled window's 2.0
    paired = PairedRounds(
        callers=64,
        rounds=tuple(Round(raw_texts_per_s=160.0, served=served(*w)) for w in windows),
        efficiency={suite.DEFAULT: 0.94},
        loads={suite.DEFAULT: LOADS[suite.DEFAULT]},
    )
    stalled = step("closed", 64, p99=760.0, mean=400.0)  # the sweep's step took the stall: 1.9
    item = suite.tail_ratio(stalled, paired)
    assert (item.value, item.met, item.target) == (1.45, True, "<= 1.5")
    assert item.title == "p99 over mean latency at 64 callers"
    assert "(1.425, 1.45, 2)" in item.how and item.how.endswith(
        "`closed c=64` step (closed loop, below): 1.9"
    )
    # Most windows slow in their tail: missed, whatever one window did.
    slow = replace(
        paired, rounds=tuple(Round(raw_texts_per_s=160.0, served=served(640.0, 400.0)) for _ in "ab")
    )
    assert suite.tail_ratio(step("closed", 64, p99=560.0, mean=400.0), slow).met is False


# --- open-loop rate within a bound ------------------------------------------------------------------------


OPEN_STEPS = [
    step("closed", 64, p99=600.0, calls_per_s=200.0),
    step("open", 50.0, p99=20.0, calls_per_s=50.0),
    step("open", 100.0, p99=40.0, calls_per_s=100.0),
    step("open", 120.0, p99=45.0, calls_per_s=119.0, failed=1),  # within the bound, but a call failed
    step("open", 150.0, p99=90.0, calls_per_s=150.0),
    step("open", 200.0, p99=700.0, calls_per_s=190.0),
]


def test_the_highest_open_loop_rate_within_the_bound_as_a_fraction_of_peak() -> None:
    item = suite.open_rate_fraction(
        OPEN_STEPS, 200.0, 50.0, title="within 10x", bound_how="10x the lone p50 (5 ms)", target=0.6
    )
    assert item.value == 0.5 and item.met is False and item.target == ">= 0.6"  # 100 of 200, not 120
    assert item.title == "within 10x, as a fraction of peak"
    assert item.how.startswith("bound 50 ms: 10x the lone p50 (5 ms); 100 calls/s (Poisson) kept p99 at 40.0")
    wide = suite.open_rate_fraction(OPEN_STEPS, 200.0, 100.0, title="t", target=0.6)
    assert wide.value == 0.75 and wide.met is True
    assert wide.how.startswith("150 calls/s")  # no bound_how: no bound in the text


def test_no_open_loop_step_within_the_bound() -> None:
    item = suite.open_rate_fraction(OPEN_STEPS, 200.0, 10.0, title="t", target=0.6)
    assert item.value is None and item.met is False
    assert item.how == "no open-loop step met the bound"
    plain = suite.open_rate_fraction(OPEN_STEPS, 200.0, 10.0, title="t")
    assert plain.target is None and plain.met is None  # no target: a fact, as the 100 ms row


# --- lone calls ---------------------------------------------------------------------------------------------


class Turns:
    """A party of the lone calls that only notes when its turn came (and the raw model, through `run`)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def calls(self, workload: object) -> Turns:
        return self

    async def send(self, ring: int, deadline_s: float) -> tuple[int, None]:
        self.log.append(self.name)
        return 0, None

    def run(self, texts: list[str]) -> None:
        self.log.append(self.name)


async def test_a_peer_takes_its_lone_calls_after_the_suites_parties_beside_the_raw_model_only(
    tmp_path: Path,
) -> None:
    """A peer's threads may spin on after its call (infinity's did) and slow whichever party came next, so
    no party of the suite's own rotation ever follows one of its calls."""
    cfg = suite_config(tmp_path, singles=4)
    workload = build_workload(cfg.workload)
    log: list[str] = []
    own = [(suite.BARE, Turns("bare", log)), (suite.DEFAULT, Turns("default", log))]
    lone = await suite.lone_calls(cfg, workload, Turns("raw", log), own, [("peer", Turns("peer", log))])
    texts = suite.LONE_WARMUP_CALLS + 4
    assert len(log) == 3 * texts + 2 * texts
    assert set(log[: 3 * texts]) == {"raw", "bare", "default"}
    assert set(log[3 * texts :]) == {"raw", "peer"} and log[3 * texts :].count("peer") == texts
    assert set(lone.overhead_ms) == {suite.BARE, suite.DEFAULT, "peer"}
    assert set(lone.over_bare_ms) == {suite.DEFAULT}  # the peer never shared a turn with the bare server
    assert lone.calls == 4 and all(lat.p50 is not None for lat in lone.latency_ms.values())


# --- lone-call overhead over the bare baseline ------------------------------------------------------------


def test_lone_call_overhead_over_the_bare_baseline() -> None:
    item = suite.over_bare(lone(raw=6.0, bare=8.6, default=9.0))
    assert item is not None and (item.value, item.met, item.target) == (0.4, True, "<= 0.5 ms")
    assert "(their p50s: 9.0 and 8.6 ms)" in item.how
    assert rendered(item).startswith(
        "| Lone-call overhead over the bare gRPC baseline | 0.400 ms (meets the target <= 0.5 ms) |"
    )
    slow = suite.over_bare(lone(raw=6.0, bare=8.6, default=9.2))
    assert slow is not None and slow.value == 0.6 and slow.met is False
    assert suite.over_bare(lone(raw=6.0, default=9.0)) is None


@pytest.mark.parametrize(
    ("before", "during", "noted"),
    [(6.0, 6.5, False), (6.0, 8.9, False), (0.3, 0.9, False), (5.7, 15.5, True)],
)
def test_lone_calls_on_a_machine_of_another_speed_than_the_raw_pass_carry_a_note(
    before: float, during: float, noted: bool, tmp_path: Path
) -> None:
    """The raw model's one-text p50 in the raw pass against the same in the lone calls: 1.5x and 1 ms apart
    or more, the machine changed speed in between (a tiny model's sub-millisecond noise is not that): the
    section and the run's notes say so, and the summary rows drawn from the lone calls are judged against
    no target."""
    summary = LatencySummary(p50=before, p90=before, p99=before, p99_9=before, max=before, mean=before)
    raw = replace(raw_figure(200.0), single=SingleLatency(calls=100, latency_ms=summary))
    calls = lone(raw=during, bare=during + 1.5, default=during + 1.6)
    note = suite.lone_drift_note(raw, calls)
    assert (note is not None) == noted
    section = "\n".join(suite.lone_section(calls, note))
    assert ("ran the lone calls at another speed" in section) == noted
    if note is not None:
        assert f"{during} ms there against {before} ms" in note
    cfg = suite_config(tmp_path)
    paired = paired_of({name: (186.0, 93.0) for name in LOADS})
    rows = suite.unjudged(suite.summarise(cfg, OPEN_STEPS, [], paired, calls), note)
    for key in suite.LONE_ROWS:
        assert (rows[key].met is None) == noted and ("not judged" in rows[key].how) == noted
    # Two servers timed side by side: the row over the bare baseline is judged all the same.
    assert "lone_over_bare" not in suite.LONE_ROWS and rows["lone_over_bare"].met is True
    assert rows["efficiency"].met is True  # the paired rounds cancel the drift out: judged as ever


# --- the summary of a run ---------------------------------------------------------------------------------


def test_the_summary_has_every_row_of_issue_15_with_its_target(tmp_path: Path) -> None:
    cfg = suite_config(tmp_path)
    paired = paired_of({name: (186.0, 93.0) for name in LOADS})
    rows = suite.summarise(cfg, OPEN_STEPS, [], paired, lone(raw=6.0, bare=8.6, default=8.9))
    targets = {key: (item.target, item.met) for key, item in rows.items()}
    assert targets["efficiency"] == (">= 0.92", True)
    assert targets["efficiency_floats"] == (">= 0.88", True)
    assert targets["efficiency_big_calls"] == (">= 0.97", False)
    assert targets["tail_ratio"] == ("<= 1.5", False)  # p99 600 ms over mean 5 ms
    assert targets["lone_over_bare"] == ("<= 0.5 ms", True)
    assert targets["open_rate_fraction"] == (None, None)  # the 100 ms row stays a fact
    lone_bound = rows["open_rate_fraction_lone"]
    assert lone_bound.target == ">= 0.6" and lone_bound.value == 0.5  # bound 89 ms: 100/s, not 150/s
    assert lone_bound.how.startswith("bound 89 ms: 10x the default server's lone-call p50 (8.9 ms")
    assert rows["open_rate_fraction"].value == 0.75
    # Each figure once: the old efficiency row is the packed-vectors one, under its new target.
    assert [item.title for item in rows.values()].count("Efficiency at 64 callers") == 0


def test_the_engine_in_process_is_held_to_the_served_bound_and_peak_as_a_reference(tmp_path: Path) -> None:
    cfg = suite_config(tmp_path)
    paired = paired_of({name: (186.0, 93.0) for name in LOADS})
    calls = lone(raw=6.0, bare=8.6, default=8.9)
    info = PeerInfo(
        protocol="in-process", model_name="m", dimension=4, server="", max_texts_per_call=None, details={}
    )
    steps = (step("open", 100.0, p99=30.0), step("open", 150.0, p99=80.0), step("open", 200.0, p99=300.0))
    engine = Series(
        name=suite.IN_PROCESS, target="in process", protocol="in-process", server=info, steps=steps
    )
    item = suite.summarise(cfg, OPEN_STEPS, [], paired, calls, engine)["open_rate_fraction_in_process"]
    # Within the served figure's 89 ms bound up to 150/s, of the served peak (200 calls/s); no target.
    assert item.value == 0.75 and item.target is None and item.met is None
    assert item.how.startswith("bound 89 ms: the same bound, rates and peak as the served figure")
    assert "open_rate_fraction_in_process" not in suite.summarise(cfg, OPEN_STEPS, [], paired, calls)


# --- the rounds themselves --------------------------------------------------------------------------------


class Encodings(FakeInference):
    """The fake server, noting the encoding and the texts of every Embed call."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.001)
        self.seen: set[tuple[int, int]] = set()

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.seen.add((request.encoding, len(request.texts)))
        return await super().Embed(request, context)


async def test_the_default_server_takes_each_of_its_loads_in_every_round(tmp_path: Path) -> None:
    """One target under three loads: its own workload and callers unless an entry names others; every
    entry's ratio to the same raw passes."""
    cfg = suite_config(tmp_path, compare=(1, 4), rounds=2)
    workload = build_workload(cfg.workload)
    fake = Encodings()
    with fake_server(fake) as server:
        async with AsyncClient(server.address) as client:
            target = as_target(client)
            info = await client.info()
            entries = [suite.Entry(suite.DEFAULT, target), *suite.default_loads(cfg, target, None, info)]
            assert [e.name for e in entries] == [suite.DEFAULT, suite.FLOATS, suite.BIG_CALLS]

            async def raw_pass() -> RawLimit:
                return raw_figure(1000.0)

            paired = await suite.paired_rounds(cfg, workload, entries, raw_pass, None)
    assert paired.loads == {
        suite.DEFAULT: RoundLoad(callers=4, texts_per_call=1, encoding="f16"),
        suite.FLOATS: RoundLoad(callers=4, texts_per_call=1, encoding="float"),
        suite.BIG_CALLS: RoundLoad(callers=4, texts_per_call=32, encoding="f16"),
    }
    packed, floats = pb.VECTOR_ENCODING_PACKED_F16, pb.VECTOR_ENCODING_FLOAT
    assert {(packed, 1), (floats, 1), (packed, 32)} <= fake.seen
    for name in paired.loads:
        served = [r.served[name] for r in paired.rounds]
        assert all(s.texts_per_s > 0 and s.failed == 0 for s in served)
        assert paired.efficiency[name] == round(sum(s.texts_per_s for s in served) / 2000.0, 3)
    # 32 texts a call: texts/s far above the one-text loads' at the same callers and delay.
    assert (
        paired.rounds[0].served[suite.BIG_CALLS].texts_per_s
        > 5 * paired.rounds[0].served[suite.DEFAULT].texts_per_s
    )
    section = "\n".join(suite.paired_section(paired))
    assert "| raw | batches | 1000.0 | 1000.0 |  |" in section
    assert f"| {suite.BIG_CALLS} | 4 callers x 32 texts | " in section
    assert f"| {suite.FLOATS} | 4 callers x 1 text | " in section
    assert "A peer's ratio" not in section  # the default server's loads are the suite's own


async def test_the_default_servers_loads_follow_the_suite_and_fit_its_limits(tmp_path: Path) -> None:
    """No second floats load when the suite asks for floats already; a server that takes fewer texts a
    call than the big calls send refuses before any load."""
    floats_cfg = replace(suite_config(tmp_path), workload=WorkloadSpec(encoding="float"))
    with fake_server(FakeInference()) as server:
        async with AsyncClient(server.address) as client:
            target = as_target(client)
            info = await client.info()
            assert [e.name for e in suite.default_loads(floats_cfg, target, None, info)] == [suite.BIG_CALLS]
            small = replace(info, limits=replace(info.limits, max_texts_per_call=16))
            with pytest.raises(TargetError, match="at most 16 texts per call; this workload sends 32"):
                suite.default_loads(suite_config(tmp_path), target, None, small)
