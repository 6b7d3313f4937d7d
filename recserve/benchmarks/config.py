"""What `bench run` and `bench suite` were asked to do, once the flags are checked, and how they exit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recserve.benchmarks.loadgen import LoadSettings, StepPlan
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
    model_repo: Path | None = None
    batching_off: bool = False
    threads: int = 1
    progress: bool = True
    command: str = ""

    def plans(self) -> list[StepPlan]:
        seed = self.workload.seed
        if self.mode == "closed":
            return [self.load.plan("closed", concurrency=c, seed=seed) for c in self.concurrency]
        return [self.load.plan("open", rate=r, arrival=self.arrival, seed=seed) for r in self.rates]


@dataclass(frozen=True)
class SuiteConfig:
    model_repo: Path
    out: Path
    markdown: Path
    threads: int
    load: LoadSettings
    workload: WorkloadSpec
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1)
    compare: tuple[int, ...] = (1, 64)
    raw_repeats: int = 3
    rounds: int = 6
    singles: int = 200
    p99_target_ms: float = 100.0
    progress: bool = True
    command: str = ""


def settings(config: RunConfig | SuiteConfig) -> dict[str, Json]:
    """The config as the report's `settings`."""
    out = to_json(config)
    assert isinstance(out, dict)
    return out
