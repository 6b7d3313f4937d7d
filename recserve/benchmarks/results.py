"""The typed results of a benchmark, from one step up to the whole document, and their JSON form.

Every report (results.json, the Markdown, the plots, the terminal table) is written from these; only
`to_json` turns them into plain data, at the very edge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from recserve.client import ServerInfo

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"

# Field metadata read by `to_json`: a field left out while it is None (the JSON has had no such key
# then), and a field whose own fields stand at its parent's level (the JSON has always been flat there).
_OPTIONAL = {"omit_if_none": True}
_INLINE = {"inline": True}


def to_json(value: object) -> Json:
    """Plain JSON data: dataclasses become objects, tuples lists, paths strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Json] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("omit_if_none"):
                continue
            converted = to_json(item)
            if f.metadata.get("inline") and isinstance(converted, dict):
                out.update(converted)
            else:
                out[f.name] = converted
        return out
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"no JSON form for {type(value).__name__}")


# --- one step ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LatencySummary:
    """Milliseconds, exact by nearest rank over every sample; all None when there was none."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p99_9: float | None = None
    max: float | None = None
    mean: float | None = None

    def tail(self) -> tuple[float | None, ...]:
        """p50, p90, p99, p99.9 and max: the order in which they can only rise."""
        return (self.p50, self.p90, self.p99, self.p99_9, self.max)


@dataclass(frozen=True, kw_only=True)
class LatencyDistribution:
    """Latency (ms) at each of `percentiles`, exact by nearest rank like LatencySummary; 100 is the max."""

    percentiles: tuple[float, ...]
    ms: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class WindowCounts:
    """One measurement window, as the stability check saw it."""

    calls_per_s: float
    sent: int
    completed: int
    failed: int


@dataclass(frozen=True, kw_only=True)
class Figures:
    """What a step delivered over consecutive windows (the definitions are in loadgen's docstring)."""

    window_s: float
    sent: int
    completed: int
    failed: int
    errors: dict[str, int]
    calls_per_s: float
    texts_per_s: float
    tokens_per_s: float
    latency_ms: LatencySummary

    def counts(self) -> WindowCounts:
        return WindowCounts(
            calls_per_s=self.calls_per_s, sent=self.sent, completed=self.completed, failed=self.failed
        )


@dataclass(frozen=True, kw_only=True)
class Warmup:
    """Warm-up calls are not measured, but their failures are shown: a server failing early is news."""

    sent: int
    failed: int
    errors: dict[str, int]


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """How well the open loop kept its schedule over the measured windows."""

    target_rate: float
    sent_rate: float
    late_after_ms: float
    late_calls: int
    late_fraction: float
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    lag_max_ms: float | None
    in_flight_cap_hits: int
    client_fell_behind: bool


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """The load settings a step ran with, reported beside its figures."""

    warmup_s: float
    window_s: float
    max_windows: int
    tolerance: float
    deadline_s: float
    max_calls: int


@dataclass(frozen=True, kw_only=True)
class Consistency:
    """The checks every step must pass; a false one means the harness (not the server) is wrong."""

    completed_plus_failed_is_sent: bool
    percentiles_ordered: bool
    errors_add_up: bool

    @property
    def ok(self) -> bool:
        return self.completed_plus_failed_is_sent and self.percentiles_ordered and self.errors_add_up


@dataclass(frozen=True, kw_only=True)
class ServerView:
    """What the server's metrics saw between two scrapes; None where it had nothing to go on."""

    seconds: float | None
    batches: int
    mean_batch_size: float | None
    mean_batch_tokens: float | None
    padding_ratio: float | None
    mean_request_ms: float | None
    mean_tokenize_ms: float | None
    mean_queue_wait_ms: float | None
    mean_inference_ms: float | None
    tokenize_share: float | None
    queue_share: float | None
    inference_share: float | None
    backlog_seconds: float | None
    queue_texts: float | None
    in_flight: float | None
    requests: dict[str, int]
    """Calls by "RPC:code"."""
    failures: dict[str, int]
    """Failed calls by reason, one per call."""
    dropped_texts: dict[str, int]
    """Queued texts the batcher dropped before inference, by reason."""
    batch_size_histogram: dict[str, int]
    """Batches per bucket during the step (not cumulative): upper bound as text -> count."""


@dataclass(frozen=True, kw_only=True)
class StatusFigures:
    """The measured calls of a step that ended with one status code (or got no answer at all)."""

    calls: int
    share: float
    """Of the calls sent in the measured windows."""
    latency_ms: LatencySummary
    """From the scheduled send to the answer, whatever the answer was; empty when none came."""


@dataclass(frozen=True, kw_only=True)
class Outcomes:
    """A step's measured calls by how they ended, and the useful part of them (summary.outcomes)."""

    deadline_s: float
    sent: int
    statuses: dict[str, StatusFigures]
    """Status name -> its calls; the counts add up to `sent`."""
    good: int
    """OK answers that arrived inside the measured windows within the deadline (from the scheduled send)."""
    goodput_per_s: float
    """`good` over the length of the measured windows."""
    admitted_latency_ms: LatencySummary
    """Every answered call but those refused with RESOURCE_EXHAUSTED: a call that ran out of its deadline
    counts at the time it failed, so a p99 under the deadline means admitted calls finish in time."""

    def calls(self, status: str) -> int:
        figures = self.statuses.get(status)
        return figures.calls if figures else 0


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """One step of a sweep: the figures over its measured windows and how they were obtained."""

    measured: Figures = field(metadata=_INLINE)
    label: str
    mode: Literal["closed", "open"]
    concurrency: int | None
    rate: float | None
    arrival: Literal["poisson", "fixed"] | None
    windows: tuple[WindowCounts, ...]
    windows_used: int
    boundaries: tuple[int, int]
    """The window boundaries (see loadgen.BoundaryHook) that enclose the measured windows."""
    warmup: Warmup
    stable: bool | None
    bounded_by_calls: bool
    stragglers_cancelled: int
    plan: StepSettings
    schedule: Schedule | None = field(default=None, metadata=_OPTIONAL)
    """Open loop only."""
    consistency: Consistency
    server: ServerView | None = field(default=None, metadata=_OPTIONAL)
    ratio_to_raw: float | None = field(default=None, metadata=_OPTIONAL)
    outcomes: Outcomes | None = field(default=None, metadata=_OPTIONAL)
    """Only when the plan asks for it (the overload steps)."""
    window_figures: tuple[Figures, ...] | None = field(default=None, metadata=_OPTIONAL)
    """Every window's figures, only when the plan runs every window (the soak)."""
    latency_distribution: LatencyDistribution | None = field(default=None, metadata=_OPTIONAL)
    """The measured calls' latency at fine percentiles: the distribution plot's data."""

    @property
    def offered(self) -> float:
        """Callers (closed loop) or calls/s (open loop): what the step put on the server."""
        if self.mode == "closed":
            return float(self.concurrency or 0)
        return self.rate or 0.0


# The detail by which a target that is not a server, but runs the suite's own model file, names its weights.
WEIGHTS_SHA256 = "weights sha256"


@dataclass(frozen=True, kw_only=True)
class PeerInfo:
    """What a target of another protocol (protocols.py) says of itself; recserve targets give ServerInfo."""

    protocol: str
    model_name: str
    """"" when the target does not say."""
    dimension: int
    """The width of the vectors it answered the probe call with."""
    server: str
    """Its name and version where the protocol tells them, else ""."""
    max_texts_per_call: int | None
    details: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class Series:
    """The steps run against one target."""

    name: str
    target: str
    """The target's URL (a bare HOST:PORT for recserve)."""
    protocol: str = "recserve"
    server: ServerInfo | PeerInfo
    steps: tuple[StepResult, ...]

    @property
    def peak(self) -> StepResult | None:
        """The completed step that delivered the most texts/s (None when none completed)."""
        ok = [s for s in self.steps if s.measured.completed]
        return max(ok, key=lambda s: s.measured.texts_per_s, default=None)

    def peak_item(self, where: str = "") -> SummaryItem | None:
        """The headline row of `peak`; `where` (e.g. the target) starts its explanation."""
        best = self.peak
        if best is None:
            return None
        m = best.measured
        return SummaryItem(
            title=f"Peak throughput ({self.name})",
            value=m.texts_per_s,
            unit=" texts/s",
            digits=1,
            how=(
                f"{where}{best.label}: {m.calls_per_s} calls/s, p50 {m.latency_ms.p50}, "
                f"p99 {m.latency_ms.p99} ms"
            ),
        )


# --- baselines and the suite ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SingleLatency:
    calls: int
    latency_ms: LatencySummary


@dataclass(frozen=True, kw_only=True)
class RawLimit:
    """The model alone in this process (baseline.raw_limit): the most a server could deliver here."""

    texts: int
    batch_size: int
    threads: int
    precision: str
    provider: str
    model_file: str
    model_sha256: str
    repeats: int
    pass_seconds: tuple[float, ...]
    texts_per_s: float
    tokens_per_s: float
    padding_ratio: float | None
    single: SingleLatency


@dataclass(frozen=True, kw_only=True)
class LoneCalls:
    """Lone one-text calls, interleaved between the raw model and every target (suite.lone_calls)."""

    calls: int
    latency_ms: dict[str, LatencySummary]
    overhead_ms: dict[str, float]
    """Per target: the p50 of its time minus the raw model's for the same text in the same turn."""
    over_bare_ms: dict[str, float] = field(default_factory=dict)
    """Per server of the suite's own rotation but the bare baseline (a peer rotates apart): the same
    against the bare gRPC server's time."""


@dataclass(frozen=True, kw_only=True)
class Served:
    """One target's window in a paired round."""

    texts_per_s: float
    latency_ms: LatencySummary
    failed: int
    server: ServerView | None


@dataclass(frozen=True, kw_only=True)
class Round:
    raw_texts_per_s: float
    served: dict[str, Served]


@dataclass(frozen=True, kw_only=True)
class RoundLoad:
    """What one entry of the paired rounds put on its target in each round's window."""

    callers: int
    texts_per_call: int
    encoding: str
    """Of the vectors asked for (workloads.WorkloadSpec.encoding); a recserve target's only."""


@dataclass(frozen=True, kw_only=True)
class PairedRounds:
    """Raw passes and served windows taken turn about, so that a drifting machine cancels out."""

    callers: int
    """The suite's load point: the most callers compared (an entry's own load is in `loads`)."""
    rounds: tuple[Round, ...]
    efficiency: dict[str, float | None]
    """Per entry: total served texts/s over total raw texts/s."""
    loads: dict[str, RoundLoad]
    """Per entry: its load in every round."""


@dataclass(frozen=True, kw_only=True)
class SummaryItem:
    """A headline figure; `target` and `met` where an issue set a target for it."""

    title: str
    value: float | None
    how: str
    unit: str = ""
    digits: int = 2
    target: str | None = field(default=None, metadata=_OPTIONAL)
    met: bool | None = field(default=None, metadata=_OPTIONAL)


# --- CPU per call by thread group (cpu.py) ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CpuPerCall:
    """A server's CPU by thread group over measured windows, per OK call, and the load generator's."""

    windows: int
    calls: int
    """OK answers that arrived inside the windows (what throughput counts)."""
    seconds: float
    calls_per_s: float
    group_ms: dict[str, float]
    """Milliseconds of CPU per call by thread group (recserve/threads.py), the model's included; `other`
    includes the threads that ended within the windows."""
    ended_ms: float
    """Of `other`: the process's CPU less its live threads' (threads that ended within the windows)."""
    outside_model_ms: float
    """The whole process's CPU less the model group's, per call."""
    model_ms: float
    server_cores: float
    """The whole server process's CPU over the windows' length."""
    client_cores: float
    """The load generator (the benchmark's process, every thread) over the same spans, in cores."""
    client_ms: float

    def cores(self, ms_per_call: float) -> float:
        """A per-call figure of this split (a group's, the model's, outside the model) as cores."""
        return round(ms_per_call * self.calls / self.seconds / 1000.0, 3) if self.seconds > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class CpuSplit:
    """CPU per call by thread group at `callers` closed-loop callers, one text a call, per target."""

    callers: int
    targets: dict[str, CpuPerCall]


# --- overload and soak -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProcessSample:
    """The server process as /proc showed it (process.py); None where it could not be read."""

    pid: int | None
    rss_mib: float | None
    open_fds: int | None
    threads: int | None


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """The calls/s the target delivers at most: a short closed loop at high concurrency, or given."""

    calls_per_s: float
    how: str
    step: StepResult | None = field(default=None, metadata=_OPTIONAL)
    """The closed-loop step it was measured with; None when it was given (--capacity)."""


@dataclass(frozen=True, kw_only=True)
class OverloadLevel:
    """One open-loop step at a multiple of the capacity."""

    level: float
    offered_per_s: float
    goodput_ratio: float | None
    """Goodput over the capacity."""
    outcomes: Outcomes
    rss_end_mib: float | None
    rss_peak_mib: float | None
    """The highest RSS sampled during the step."""
    step: StepResult
    cpu: CpuPerCall | None = field(default=None, metadata=_OPTIONAL)
    """The server's CPU by thread group and the load generator's over the window (with the server's pid);
    per OK call, so `cores` turns it into what each took of the machine."""


@dataclass(frozen=True, kw_only=True)
class FairnessProbe:
    """A one-text caller beside a stream of big Embed calls, and the same caller alone just before."""

    texts_per_call: int
    stream_callers: int
    deadline_s: float
    reference: StepResult
    """The one-text caller alone (closed loop, one caller)."""
    lone: StepResult
    """The one-text caller while the stream runs."""
    stream_seconds: float
    stream_calls: int
    """Big calls answered OK while the one-text caller was measured."""
    stream_texts_per_s: float
    stream_failed: dict[str, int]
    model_texts_per_s: float | None = None
    """Texts/s the server's batches ran for the stream while the one-text caller was measured (its metrics,
    less the one-text calls): a 2,000-text call can take longer than the window, so its answers are a
    coarse count. None without metrics."""


@dataclass(frozen=True, kw_only=True)
class OverloadResult:
    """`bench overload`: capacity, the open-loop levels past it, the fairness probe."""

    deadline_s: float
    capacity: Capacity
    levels: tuple[OverloadLevel, ...]
    rss_before_mib: float | None
    """After the capacity step, before the levels: the baseline that "bounded" is judged against."""
    rss_peak_mib: float | None
    """The highest RSS sampled over the levels."""
    pid: int | None
    fairness: FairnessProbe | None = None


@dataclass(frozen=True, kw_only=True)
class MemoryRound:
    """One burst round of the memory section (memory.py): big mixed-length calls, then the standard load."""

    texts: int
    """Texts of the round's big calls."""
    seconds: float
    load_texts_per_s: float
    """The standard load's throughput after the big calls (64 callers, one text a call)."""
    rss_mib: float | None
    """Once the round ended and the server settled."""
    rss_peak_mib: float | None
    """The highest RSS sampled during the round."""


@dataclass(frozen=True, kw_only=True)
class MemoryResult:
    """The server's resident memory at idle (after start and warm-up) and after burst rounds (memory.py)."""

    pid: int | None
    idle_rss_mib: float | None
    post_burst_rss_mib: float | None
    """After the last round: where the RSS plateaued, or `max_rounds` ended."""
    peak_rss_mib: float | None
    ratio: float | None
    """Post-burst over idle."""
    plateaued: bool
    rounds: tuple[MemoryRound, ...]
    settings: dict[str, Json]


@dataclass(frozen=True, kw_only=True)
class Drift:
    """Latency of the last window against the first (ms; positive: slower at the end)."""

    first_p50_ms: float | None
    first_p99_ms: float | None
    last_p50_ms: float | None
    last_p99_ms: float | None
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, kw_only=True)
class SoakResult:
    """`bench soak`: a long open loop below capacity, and the server process before and after."""

    fraction: float
    capacity: Capacity
    rate_per_s: float
    window_s: float
    windows: int
    before: ProcessSample
    after: ProcessSample
    samples: tuple[ProcessSample, ...]
    """At each window boundary, from the first window's start to the last one's end."""
    rss_growth_mib: float | None
    fds_change: int | None
    threads_change: int | None
    first: Figures
    last: Figures
    drift: Drift
    step: StepResult


# --- fleet: replicas behind one client, the backlog under a load step ------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReplicaShare:
    """One replica during a fleet window: the calls its own metrics counted and the CPU it used."""

    address: str
    pid: int | None
    ok_calls: int | None
    """Embed calls answered OK, from its recserve_requests_total; None when a scrape failed."""
    cpu_cores: float | None
    """utime + stime of /proc/PID/stat over the window, over the window's length."""


@dataclass(frozen=True, kw_only=True)
class FleetStep:
    """A closed loop through one round-robin client over `replicas` local replicas."""

    replicas: int
    texts_per_s: float
    server_cores: float | None
    """The replicas' CPU together, in cores."""
    client_cores: float | None
    """The load generator's own CPU (this process), in cores: it shares the machine with the replicas."""
    shares: tuple[ReplicaShare, ...]
    start_s: float
    """How long the replica added for this step took to say SERVING (load and warm-up)."""
    step: StepResult


@dataclass(frozen=True, kw_only=True)
class ModelRow:
    """A computed row of the paper model: never a measurement."""

    node: str
    cores: int | None
    texts_per_s: float | None
    how: str


@dataclass(frozen=True, kw_only=True)
class ScalePolicy:
    kind: str
    """Pods or Percent."""
    value: int
    period_s: float


@dataclass(frozen=True, kw_only=True)
class HpaSettings:
    """What the HPA model assumes: the shipped manifests' values where they were read, defaults otherwise."""

    source: str
    metric: str
    target_average: float
    """The target averageValue of the metric, per pod."""
    tolerance: float
    sync_period_s: float
    scrape_interval_s: float
    average_window_s: float | None
    """The adapter's avg_over_time window; None: the latest sample."""
    min_replicas: int
    max_replicas: int
    scale_up_window_s: float
    scale_up_policies: tuple[ScalePolicy, ...]
    select_policy: str


@dataclass(frozen=True, kw_only=True)
class HpaVerdict:
    """When the modelled HPA first scales up after the step starts, over every phase of scrapes and syncs."""

    threshold: float
    """The metric value above which it scales: target x (1 + tolerance)."""
    gauge_crossed_s: float | None
    """First sample of the gauge itself above the threshold, seconds after the step started."""
    phases: int
    """Combinations of scrape phase and sync phase modelled (a grid over both periods)."""
    scaled: int
    """Of them, how many scale up within the horizon."""
    earliest_s: float | None
    median_s: float | None
    latest_s: float | None
    replicas_from: int
    replicas_to_min: int | None
    replicas_to_max: int | None
    horizon_s: float
    """The last sync modelled, seconds after the step started: the recording's end plus the averaging window
    (the gauge taken as 0 after the recording: idle)."""


@dataclass(frozen=True, kw_only=True)
class BacklogSample:
    t_s: float
    """Seconds since the recording started."""
    backlog_s: float | None
    """recserve_backlog_seconds; None when that scrape failed."""


@dataclass(frozen=True, kw_only=True)
class LoadStep:
    """One replica: idle, an open loop at `level` x its capacity, idle again; the backlog gauge throughout."""

    capacity_per_s: float
    level: float
    rate_per_s: float
    idle_s: float
    load_s: float
    load_start_s: float
    load_end_s: float
    scrape_every_s: float
    samples: tuple[BacklogSample, ...]
    peak_backlog_s: float | None
    hpa: HpaSettings
    verdict: HpaVerdict
    step: StepResult


@dataclass(frozen=True, kw_only=True)
class FleetResult:
    """`bench fleet`: 1..N replicas behind one round-robin client, the paper model, the load step."""

    callers: int
    threads: int
    usable_cores: int | None
    steps: tuple[FleetStep, ...]
    per_core_texts_per_s: float | None
    """One replica's texts/s over the cores it used, here."""
    model: tuple[ModelRow, ...]
    load_step: LoadStep


# --- the GPU check --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParityCheck:
    """The fp16 variant on the checked provider against a reference, on the parity texts (export's gate)."""

    against: str
    texts: int
    min_cosine: float | None
    mean_cosine: float | None
    max_abs_diff: float | None
    """Cross-encoders: the largest logit difference."""
    threshold: float
    batch_invariance: float | None
    """Largest difference of a text alone against the same text in a padded batch of 32."""
    batch_invariance_threshold: float | None
    accurate: bool
    invariant: bool
    worst: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class IoBindingCheck:
    """Runs of the server's own runner (recserve.runner.Runner) on the provider, counted at the session."""

    provider: str
    expected: bool
    """IO binding is the CUDA path; the CPU provider runs without it."""
    bound_runs: int
    plain_runs: int

    @property
    def ok(self) -> bool:
        used = self.bound_runs > 0 and self.plain_runs == 0
        unused = self.bound_runs == 0 and self.plain_runs > 0
        return used if self.expected else unused


@dataclass(frozen=True, kw_only=True)
class GpuCheckResult:
    """`bench gpu-check`: fp16 on the GPU checked for parity, batch invariance, IO binding and throughput."""

    device: str
    dry_run: bool
    """Run on the CPU provider (--device cpu): the mechanism, not a GPU's figures."""
    gpu: str | None
    """nvidia-smi's name, memory and driver, where it answers."""
    provider: str
    """Of the fp16 session the checks ran on."""
    parity: ParityCheck
    """Against the fp32 variant on the CPU provider."""
    reference: ParityCheck | None
    """Against the PyTorch reference, where torch and the checkpoint are here."""
    reference_skipped: str | None
    io_binding: IoBindingCheck
    served_provider: str
    served_precision: str
    callers: int
    seconds: float
    passed: bool
    """Parity, invariance, IO binding and the served provider all as they must be, and no call failed."""


# --- the document -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TokenStats:
    mean: float
    p50: int
    p90: int
    min: int
    max: int
    source: str


@dataclass(frozen=True, kw_only=True)
class WorkloadSummary:
    """What was sent (workloads.Workload.describe)."""

    lengths: str
    description: str
    seed: int
    texts: int
    distinct_calls: int
    tokens_per_text: TokenStats
    texts_per_call: int
    rpc: dict[str, float]
    candidates: int
    history: int
    encoding: str


@dataclass(frozen=True, kw_only=True)
class Machine:
    cpu_model: str
    cores: int | None
    usable_cores: int | None
    memory_gib: float | None
    platform: str
    python: str
    load_average_start: tuple[float, ...] | None
    load_average_end: tuple[float, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Document:
    """Everything a run or the suite reports; results.json is `to_json` of it."""

    schema: str
    kind: Literal["run", "suite", "overload", "soak", "fleet", "gpu-check"]
    created_at: str
    command: str
    settings: dict[str, Json]
    machine: Machine
    versions: dict[str, str]
    workload: WorkloadSummary | None = None
    raw: RawLimit | None = None
    series: tuple[Series, ...] = ()
    summary: dict[str, SummaryItem] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # The suite's own parts.
    reproduce_hint: str | None = field(default=None, metadata=_OPTIONAL)
    lone: LoneCalls | None = field(default=None, metadata=_OPTIONAL)
    paired: PairedRounds | None = field(default=None, metadata=_OPTIONAL)
    cpu: CpuSplit | None = field(default=None, metadata=_OPTIONAL)
    sections: dict[str, list[str]] | None = field(default=None, metadata=_OPTIONAL)
    """Markdown sections after the series: heading -> lines."""
    overload: OverloadResult | None = field(default=None, metadata=_OPTIONAL)
    soak: SoakResult | None = field(default=None, metadata=_OPTIONAL)
    fleet: FleetResult | None = field(default=None, metadata=_OPTIONAL)
    gpu_check: GpuCheckResult | None = field(default=None, metadata=_OPTIONAL)
    memory: MemoryResult | None = field(default=None, metadata=_OPTIONAL)
