"""Client-side load balancing and failover: one client over several replicas.

The target and service-config helpers are pure; round robin, health checking and retries are shown against
fake servers; then three real `recserve serve` processes on the tiny model take a few hundred calls through
one client, and one of them is stopped with SIGTERM while calls are running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from recserve.benchmarks.fleet import hpa_model, read_hpa, scale_up_limit
from recserve.benchmarks.results import BacklogSample, HpaSettings, ScalePolicy
from recserve.benchmarks.scrape import Snapshot, fetch
from recserve.benchmarks.servers import free_port, serve_command
from recserve.client import (
    SERVICE_NAME,
    Client,
    RecserveError,
    channel_target,
    names_a_fleet,
    service_config,
)
from recserve.server.metrics import Name, total
from tests.support.fake_server import NOT_SERVING, SERVING, FakeInference, FakeServer

# --- targets and the service config ------------------------------------------------------------------------


def test_targets_name_one_replica_or_several() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///recserve-headless:50051") == "dns:///recserve-headless:50051"
    assert channel_target("ipv4:10.0.0.1:1,10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["10.0.0.1:1", " 10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("10.0.0.1:1,10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(("[::1]:1", "[fe80::2]:2")) == "ipv6:[::1]:1,[fe80::2]:2"
    with pytest.raises(ValueError, match="dns:///replica-a:1"):
        channel_target(["replica-a:1", "10.0.0.2:2"])
    with pytest.raises(ValueError, match="not both"):
        channel_target(["10.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="not IP:PORT"):
        channel_target(["10.0.0.1"])
    with pytest.raises(ValueError, match="no address"):
        channel_target([])
    assert not names_a_fleet("127.0.0.1:50051")
    assert all(names_a_fleet(t) for t in ("dns:///a:1", ["10.0.0.1:1"], "10.0.0.1:1,10.0.0.2:2"))


def test_service_config_balances_retries_unavailable_and_checks_health() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method["name"]} == {
        (SERVICE_NAME, m) for m in ("Embed", "Score", "Info")
    }
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 4 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["healthCheckConfig"] == {"serviceName": SERVICE_NAME}
    json.dumps(config)  # the channel takes it as JSON
    assert "methodConfig" not in service_config(max_attempts=1)
    assert "healthCheckConfig" not in service_config(health_check=False)
    with pytest.raises(ValueError, match=r"1\.\.5"):
        service_config(max_attempts=6)


# --- round robin, health checking and retries, against fakes ------------------------------------------------


class Draining(FakeInference):
    """Says SERVING but refuses every call as a draining server does (UNAVAILABLE)."""

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["Embed"] += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


@contextmanager
def fakes(*servers: FakeServer) -> Iterator[list[FakeServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(s) for s in servers]


def status(value: int) -> dict[str, int]:
    return {"": value, SERVICE_NAME: value}


def test_round_robin_skips_a_replica_that_is_not_serving() -> None:
    up = [FakeServer(FakeInference(), status(SERVING)) for _ in range(2)]
    down = FakeServer(FakeInference(), status(NOT_SERVING))
    with fakes(*up, down), Client([s.address for s in (*up, down)]) as client:
        for _ in range(40):
            client.embed(["x"])
    counts = [s.inference.calls["Embed"] for s in (*up, down) if s.inference is not None]
    assert counts[2] == 0 and sum(counts) == 40
    assert min(counts[:2]) >= 10  # both serving replicas share the calls (round robin: 20 each)


def test_unavailable_calls_are_retried_on_another_replica() -> None:
    """Health checking off, so the draining replica stays in the rotation: every call it refuses is sent
    again, to the next replica, and none fails. With retries off, its calls fail."""
    good, draining = FakeServer(FakeInference(), status(SERVING)), FakeServer(Draining(), status(SERVING))
    with fakes(good, draining):
        addresses = [good.address, draining.address]
        with Client(addresses, health_check=False) as client:
            for _ in range(20):
                client.embed(["x"])
        assert draining.inference is not None and draining.inference.calls["Embed"] > 0
        with Client(addresses, health_check=False, max_attempts=1) as client:
            failed = 0
            for _ in range(20):
                try:
                    client.embed(["x"])
                except RecserveError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE
                    failed += 1
            assert failed > 0


# --- three real replicas ---------------------------------------------------------------------------------

REPLICAS = 3
CALLS = 300
# Each replica must serve at least this share of CALLS; round robin gives each a third.
MIN_SHARE = 0.2
START_TIMEOUT_S = 120.0
# Texts per call while one replica is stopped: calls that take a few ms, so some are in flight at SIGTERM.
TEXTS_PER_CALL = 16
# A call that takes a while on the tiny model (tokenising and embedding ~100k tokens), made to one replica.
BIG_CALL = [f"big call text {i} " + "word " * 96 for i in range(1024)]


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    address: str
    metrics_url: str
    log: Path

    def ok_calls(self) -> int:
        return round(scrape(self).total(total(Name.REQUESTS), rpc="Embed", code="OK"))


def scrape(replica: Replica) -> Snapshot:
    return fetch(replica.metrics_url)


@contextmanager
def replicas(repo: Path, count: int, logs: Path) -> Iterator[list[Replica]]:
    """`count` `recserve serve` processes on free loopback ports, as the harness starts them, once all
    say SERVING; each is stopped (SIGTERM) on exit if still running."""
    started: list[Replica] = []
    try:
        for i in range(count):
            port, metrics_port = free_port(), free_port()
            # One ORT thread each; info logs, so the drain can be read back.
            cmd = serve_command(repo, port, metrics_port, 1, ["--log-level", "info", "--grace-period-s", "5"])
            log = logs / f"replica-{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
            started.append(
                Replica(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log)
            )
        for r in started:
            wait_serving(r)
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in started:
            try:
                r.proc.wait(30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def wait_serving(replica: Replica) -> None:
    # A bounded start-up wait: the child loads the model and warms up before it says SERVING.
    end = time.monotonic() + START_TIMEOUT_S
    with Client(replica.address, deadline=1.0, max_attempts=1) as client:
        while time.monotonic() < end:
            assert replica.proc.poll() is None, replica.log.read_text(errors="replace")[-2000:]
            try:
                if client.health() == "SERVING":
                    return
            except RecserveError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{replica.address} not SERVING after {START_TIMEOUT_S:g} s")


class Load:
    """Callers sending Embed calls back to back through one client until stopped; every failure is kept."""

    def __init__(self, client: Client, callers: int) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[BaseException] = []
        self.started_after_mark = 0  # calls begun after mark() (the stopped replica had exited)
        self._marked = False
        self._stop = threading.Event()
        self._progress = threading.Condition(self.lock)
        self._threads = [threading.Thread(target=self._caller, args=(i,)) for i in range(callers)]

    def _caller(self, index: int) -> None:
        k = 0
        while not self._stop.is_set():
            texts = [f"caller {index} call {k} text {j} " + "word " * (j % 9) for j in range(TEXTS_PER_CALL)]
            k += 1
            with self.lock:
                after_mark = self._marked
            try:
                self.client.embed(texts)
            except BaseException as exc:  # any failure at all is what the test looks for
                with self.lock:
                    self.failures.append(exc)
                continue
            with self._progress:
                self.ok += 1
                self.started_after_mark += after_mark
                self._progress.notify_all()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait_ok(self, more: int, within: float = 60.0) -> None:
        """Until `more` further calls have succeeded (or a call failed)."""
        with self._progress:
            goal = self.ok + more
            assert self._progress.wait_for(lambda: self.ok >= goal or bool(self.failures), within)

    def mark(self) -> None:
        with self.lock:
            self._marked = True


def test_three_replicas_share_the_calls_and_one_drains_without_a_failed_call(
    tiny_repo: Path, tmp_path: Path
) -> None:
    with replicas(tiny_repo, REPLICAS, tmp_path) as fleet, Client([r.address for r in fleet]) as client:
        # 1. A few hundred calls, from a few threads: each replica's own metrics show its share.
        def burst(n: int) -> None:
            for i in range(n):
                client.embed([f"share {i}"])

        threads = [threading.Thread(target=burst, args=(CALLS // 6,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        shares = [r.ok_calls() for r in fleet]
        assert sum(shares) == CALLS, shares
        assert min(shares) >= MIN_SHARE * CALLS, shares

        # 2. Calls running in four threads; SIGTERM one replica mid-load. Beside them, one big call made to
        # that replica alone, without retries: the drain must let it finish.
        stopped, others = fleet[0], fleet[1:]
        big: dict[str, object] = {}

        def big_call() -> None:
            with Client(stopped.address, max_attempts=1) as alone:
                try:
                    big["rows"] = len(alone.embed(BIG_CALL))
                except RecserveError as exc:
                    big["error"] = exc
                big["ended"] = time.monotonic()

        with Load(client, callers=4) as load:
            load.wait_ok(60)
            caller = threading.Thread(target=big_call)
            caller.start()
            # Until the big call's texts wait in the stopped replica's queue: the load's four callers queue
            # four texts at most, so any call in flight could be theirs, and SIGTERM would beat the big call.
            while caller.is_alive() and scrape(stopped).total(Name.QUEUE_TEXTS) <= 4:
                time.sleep(0.005)
            before = [r.ok_calls() for r in others]
            stopped_before = stopped.ok_calls()
            signalled = time.monotonic()
            stopped.proc.send_signal(signal.SIGTERM)
            assert stopped.proc.wait(30) == 0
            caller.join(30)
            load.mark()
            load.wait_ok(120)  # new calls, sent after the stopped replica exited
        assert load.failures == [], load.failures[:3]
        after = [r.ok_calls() for r in others]
        assert stopped_before > shares[0]  # it served a share of the load before it was stopped
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        # Every call begun after it exited was served by the other two.
        assert sum(after) - sum(before) >= load.started_after_mark >= 120
        log = stopped.log.read_text(errors="replace")
        assert "draining" in log and "stopped" in log
        assert "cut off" not in log  # every call in flight at SIGTERM finished inside the grace period
        assert big.get("rows") == len(BIG_CALL), big.get("error")
        spanned = float(big["ended"]) > signalled  # type: ignore[arg-type]
        print(f"shares {shares}; the big call ended {'after' if spanned else 'before'} the SIGTERM")


# --- `recserve bench fleet` ------------------------------------------------------------------------------


def hpa_settings(**overrides: object) -> HpaSettings:
    values: dict[str, object] = {
        "source": "test",
        "metric": "recserve_backlog_seconds",
        "target_average": 0.05,
        "tolerance": 0.1,
        "sync_period_s": 15.0,
        "scrape_interval_s": 15.0,
        "average_window_s": 60.0,
        "min_replicas": 2,
        "max_replicas": 20,
        "scale_up_window_s": 0.0,
        "scale_up_policies": (
            ScalePolicy(kind="Percent", value=100, period_s=30),
            ScalePolicy(kind="Pods", value=4, period_s=30),
        ),
        "select_policy": "Max",
    }
    values.update(overrides)
    return HpaSettings(**values)  # type: ignore[arg-type]


def step_samples(high: float = 2.0) -> list[BacklogSample]:
    """Every 0.5 s for 40 s: idle until 10 s, `high` until 30 s, idle again."""
    return [BacklogSample(t_s=k / 2, backlog_s=high if 10 <= k / 2 < 30 else 0.0) for k in range(81)]


def test_hpa_model_scales_at_the_first_sync_after_a_scrape_sees_the_backlog() -> None:
    """Scrapes every 15 s, a one-minute mean, syncs every 15 s: the first scrape at or after the step sees
    2 s of backlog, which lifts the mean (2 / 4 = 0.5) far over 0.055; the next sync scales. Over every phase
    that is at once (both fall on the step) up to 14.5 + 14.5 s later; 2 pods go to 6 (Pods 4 > 100%)."""
    hpa = hpa_settings()
    verdict = hpa_model(step_samples(), load_start_s=10.0, hpa=hpa)
    assert verdict.threshold == pytest.approx(0.055)
    assert verdict.gauge_crossed_s == 0.0
    assert verdict.phases == 30 * 30 and verdict.scaled == verdict.phases
    assert verdict.earliest_s == 0.0 and verdict.latest_s == 29.0
    assert verdict.replicas_from == 2 and verdict.replicas_to_min == verdict.replicas_to_max == 6
    assert scale_up_limit(2, hpa) == 6 and scale_up_limit(10, hpa) == 20
    assert scale_up_limit(2, hpa_settings(select_policy="Min")) == 4
    # A 30 s stabilization window: every recommendation in it must be higher, so idle syncs hold it back.
    later = hpa_model(step_samples(), load_start_s=10.0, hpa=hpa_settings(scale_up_window_s=30.0))
    assert later.earliest_s is not None and later.earliest_s >= 30.0
    # 20 s of 0.1 s puts at most two of the minute's four samples on it: a mean of 0.05 < 0.055, never.
    never = hpa_model(step_samples(high=0.1), load_start_s=10.0, hpa=hpa)
    assert never.scaled == 0 and never.earliest_s is None and never.gauge_crossed_s == 0.0


HPA_YAML = """
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
spec:
  minReplicas: 3
  maxReplicas: 12
  metrics:
    - type: Pods
      pods:
        metric: {name: recserve_backlog_seconds}
        target: {type: AverageValue, averageValue: 80m}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 5
      selectPolicy: Max
      policies:
        - {type: Pods, value: 2, periodSeconds: 60}
"""
MONITOR_YAML = "spec:\n  endpoints:\n    - port: metrics\n      interval: 10s\n"
ADAPTER_YAML = """rules:
  custom:
    - metricsQuery: 'avg by (<<.GroupBy>>) (avg_over_time(<<.Series>>{<<.LabelMatchers>>}[2m]))'
"""


def test_hpa_settings_are_read_from_the_manifests_or_assumed_and_said(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    for rel, text in (
        ("base/hpa.yaml", HPA_YAML),
        ("components/monitoring/servicemonitor.yaml", MONITOR_YAML),
        ("prometheus-adapter/values.yaml", ADAPTER_YAML),
    ):
        (deploy / rel).parent.mkdir(parents=True, exist_ok=True)
        (deploy / rel).write_text(text)
    notes: list[str] = []
    hpa = read_hpa(deploy, 15.0, notes)
    assert notes == []
    assert (hpa.target_average, hpa.min_replicas, hpa.max_replicas) == (0.08, 3, 12)
    assert (hpa.scale_up_window_s, hpa.scrape_interval_s, hpa.average_window_s) == (5.0, 10.0, 120.0)
    assert hpa.scale_up_policies == (ScalePolicy(kind="Pods", value=2, period_s=60),)
    assumed = read_hpa(tmp_path / "nowhere", 15.0, notes)
    assert assumed.source.startswith("assumed") and len(notes) == 3
    assert assumed.target_average == 0.05 and assumed.average_window_s is None


def test_bench_fleet_on_the_tiny_model_writes_its_reports(tiny_repo: Path, tmp_path: Path) -> None:
    from tests.test_bench import PNG_MAGIC, bench, check_json_step

    out = tmp_path / "fleet"
    argv = ["fleet", "--model-repo", str(tiny_repo), "--replicas", "2", "--callers", "4", "--threads", "1"]
    argv += ["--warmup", "0.2", "--duration", "0.6", "--idle", "0.5", "--step-duration", "1"]
    argv += [
        "--scrape-every",
        "0.25",
        "--deploy-dir",
        str(tmp_path / "no-deploy"),
        "--quiet",
        "--out",
        str(out),
    ]
    assert bench(argv) == 0
    doc = json.loads((out / "fleet.json").read_text())
    assert doc["kind"] == "fleet" and doc["series"] == []
    fleet = doc["fleet"]
    assert [s["replicas"] for s in fleet["steps"]] == [1, 2]
    for s in fleet["steps"]:
        check_json_step(s["step"])
        assert s["step"]["failed"] == 0
        shares = [x["ok_calls"] for x in s["shares"]]
        assert len(shares) == s["replicas"] and all(n > 0 for n in shares)
        # Each replica's own count adds up to what the client sent in the window, give or take the edges.
        assert abs(sum(shares) - s["step"]["completed"]) <= 2 * 4
        assert all(x["cpu_cores"] is not None and x["cpu_cores"] >= 0 for x in s["shares"])
    model = fleet["model"]
    assert [r["cores"] for r in model] == [4, 8, 16, 32, None]
    assert model[0]["texts_per_s"] == round(fleet["per_core_texts_per_s"] * 4, 1)
    assert model[-1]["texts_per_s"] is None and "not measured" in model[-1]["how"]
    step = fleet["load_step"]
    assert step["rate_per_s"] == float(f"{2 * fleet['steps'][0]['step']['calls_per_s']:.6g}")
    assert step["hpa"]["source"].startswith("assumed") and len(doc["notes"]) >= 3
    times = [x["t_s"] for x in step["samples"]]
    assert times == sorted(times) and times[-1] >= step["load_end_s"]
    assert step["load_start_s"] >= 0.5
    md = (out / "FLEET.md").read_text()
    assert md.startswith("# recserve fleet") and "Paper model" in md and "(backlog.png)" in md
    assert "**Computed, not measured.**" in md and "shared" in md
    assert (out / "backlog.png").read_bytes().startswith(PNG_MAGIC)
