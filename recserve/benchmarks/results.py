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

    @property
    def offered(self) -> float:
        """Callers (closed loop) or calls/s (open loop): what the step put on the server."""
        if self.mode == "closed":
            return float(self.concurrency or 0)
        return self.rate or 0.0


@dataclass(frozen=True, kw_only=True)
class Series:
    """The steps run against one target."""

    name: str
    target: str
    server: ServerInfo
    steps: tuple[StepResult, ...]


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
    """p50 minus the raw p50, per target."""


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
class PairedRounds:
    """Raw passes and served windows taken turn about, so that a drifting machine cancels out."""

    callers: int
    rounds: tuple[Round, ...]
    efficiency: dict[str, float | None]
    """Per target: total served texts/s over total raw texts/s."""


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
    kind: Literal["run", "suite"]
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
    sections: dict[str, list[str]] | None = field(default=None, metadata=_OPTIONAL)
    """Markdown sections after the series: heading -> lines."""
