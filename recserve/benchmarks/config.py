"""What `bench run`, `suite`, `overload` and `soak` were asked to do, once the flags are checked, and how
they exit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recserve.benchmarks.loadgen import LoadSettings, StepPlan
from recserve.benchmarks.protocols import Access, Endpoint
from recserve.benchmarks.results import Json, to_json
from recserve.benchmarks.workloads import Workload, WorkloadError, WorkloadSpec, build_workload

EXIT_USAGE = 2
EXIT_TARGET = 3


class ConfigError(ValueError):
    """An invalid flag, flag combination or workload: a usage error (EXIT_USAGE), found before any load."""


def workload_of(spec: WorkloadSpec) -> Workload:
    """The texts and calls of `spec`; ConfigError when they cannot be built (e.g. an unreadable file)."""
    try:
        return build_workload(spec)
    except (WorkloadError, OSError) as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class RunConfig:
    target: str
    """The target's URL (protocols.py; a recserve target as its client takes it)."""
    endpoint: Endpoint
    mode: Literal["closed", "open"]
    concurrency: tuple[int, ...]
    rates: tuple[float, ...]
    arrival: Literal["poisson", "fixed"]
    workload: WorkloadSpec
    load: LoadSettings
    out: Path
    markdown: Path | None = None
    metrics_url: str | None = "auto"
    tls: bool = False
    root_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    model_repo: Path | None = None
    batching_off: bool = False
    threads: int = 1
    progress: bool = True
    command: str = ""

    @property
    def access(self) -> Access:
        return Access(
            tls=self.tls,
            root_cert=self.root_cert,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            token_file=self.token_file,
            metrics_url=self.metrics_url,
        )

    def plans(self) -> list[StepPlan]:
        seed = self.workload.seed
        if self.mode == "closed":
            return [self.load.plan("closed", concurrency=c, seed=seed) for c in self.concurrency]
        return [self.load.plan("open", rate=r, arrival=self.arrival, seed=seed) for r in self.rates]


@dataclass(frozen=True)
class PeerSpec:
    """`suite --peer NAME=URL`: a server the suite measures beside its own, under this name."""

    name: str
    endpoint: Endpoint


@dataclass(frozen=True)
class SuiteConfig:
    model_repo: Path
    out: Path
    markdown: Path
    threads: int
    load: LoadSettings
    workload: WorkloadSpec
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
    compare: tuple[int, ...] = (1, 64)
    raw_repeats: int = 3
    rounds: int = 6
    singles: int = 200
    p99_target_ms: float = 100.0
    progress: bool = True
    command: str = ""
    overload: bool = True
    """The overload section (overload.py), on a server of its own, with the steps' warm-up and window."""
    peers: tuple[PeerSpec, ...] = ()


@dataclass(frozen=True)
class OverloadSettings:
    """How `bench overload` (and the suite's overload section) measures."""

    levels: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    """Open-loop rates as multiples of the capacity."""
    deadline_s: float = 2.0
    capacity_per_s: float | None = None
    """Given: no capacity measurement."""
    capacity_callers: int = 64
    capacity_window_s: float = 5.0
    warmup_s: float = 2.0
    window_s: float = 10.0
    max_in_flight: int = 4096
    probe: bool = True
    probe_texts: int = 2000
    probe_callers: int = 3
    probe_window_s: float = 10.0
    probe_deadline_s: float = 60.0
    """Long, so that a one-text call's real wait behind the big calls is measured, not cut off."""


@dataclass(frozen=True)
class TargetChoice:
    """The server of `overload` and `soak`: a local one started from `model_repo`, or `target` (with `pid`
    for /proc readings, if it runs on this machine)."""

    target: str | None
    model_repo: Path | None
    pid: int | None
    threads: int
    metrics_url: str | None = "auto"

    @property
    def name(self) -> str:
        return self.target or f"a local server of {self.model_repo}"


@dataclass(frozen=True)
class OverloadConfig:
    server: TargetChoice
    workload: WorkloadSpec
    settings: OverloadSettings
    out: Path
    markdown: Path | None = None
    progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class SoakConfig:
    server: TargetChoice
    workload: WorkloadSpec
    """The mixed workload: an RPC mix of embed, score and history."""
    fraction: float
    window_s: float
    windows: int
    """--minutes in windows of `window_s`: the first and the last are compared."""
    warmup_s: float
    deadline_s: float
    capacity_per_s: float | None
    capacity_callers: int
    capacity_window_s: float
    max_in_flight: int
    out: Path
    progress: bool = True
    command: str = ""


def settings(config: RunConfig | SuiteConfig | OverloadConfig | SoakConfig) -> dict[str, Json]:
    """The config as the report's `settings`."""
    out = to_json(config)
    assert isinstance(out, dict)
    return out
