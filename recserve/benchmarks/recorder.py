"""What the load loops record of each call: when it was due, left and ended, its status, and its window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np

OK = 0
# The server answered, but with the wrong number of vectors or scores: counted as a failure.
MISMATCH = -1
# No status yet: the call is in flight, or was cancelled before it ever started. Neither completed nor
# failed, but sent: the consistency check then says so.
PENDING = -2
# The call raised something its target's protocol did not map (a harness or client-library bug): counted as a
# failure under its own name, so that a caller's loop never dies of it.
CLIENT_ERROR = -3
# HTTP targets (protocols.py) record an answer's HTTP status as HTTP_BASE + status, named HTTP_<status>,
# rather than translating it into a gRPC code it does not mean.
HTTP_BASE = 1000
CODE_NAMES: dict[int, str] = (
    {c.value[0]: c.name for c in grpc.StatusCode}
    | {MISMATCH: "MISMATCHED_REPLY", CLIENT_ERROR: "CLIENT_ERROR"}
    | {HTTP_BASE + status: f"HTTP_{status}" for status in range(100, 600)}
)
WARMUP = -1


@dataclass(frozen=True)
class Windows:
    """A step's clock: measurement starts at `start` (loop time) and is cut into windows of `length` s."""

    start: float
    length: float

    def of(self, t: float) -> int:
        """WARMUP before the measurement, else the index of the window holding `t`."""
        if t < self.start:
            return WARMUP
        return int((t - self.start) // self.length)

    def bounds(self, first: int, last: int | None = None) -> tuple[float, float]:
        """From the start of window `first` to the end of window `last` (default: `first`)."""
        last = first if last is None else last
        return self.start + first * self.length, self.start + (last + 1) * self.length


@dataclass(frozen=True)
class CallTable:
    """The recorded calls as arrays, one row per call in the order they were admitted."""

    sched: np.ndarray  # due: the closed loop's send time, the open loop's scheduled time
    start: np.ndarray  # when it was actually sent
    end: np.ndarray  # when its answer (or error) came; NaN while pending
    code: np.ndarray  # gRPC status value, MISMATCH or PENDING
    index: np.ndarray  # which prebuilt call of the workload's ring
    window: np.ndarray  # the window of `sched` (WARMUP before the measurement)

    def within(self, first: int, last: int) -> np.ndarray:
        """Rows of the calls that belong to windows `first`..`last`."""
        return (self.window >= first) & (self.window <= last)


class Recorder:
    """Every call of one step: a row is added when the call is admitted and completed when it ends.

    Rows exist from admission on, so calls sent but still in flight are counted as sent and never lost.
    """

    def __init__(self, windows: Windows) -> None:
        self.windows = windows
        self.sched: list[float] = []
        self.start: list[float] = []
        self.end: list[float] = []
        self.code: list[int] = []
        self.index: list[int] = []
        self.window: list[int] = []
        self.finished: list[int] = []  # rows in the order their calls ended

    def admit(self, sched: float, start: float, index: int) -> int:
        """Records a call about to be sent; returns its row."""
        self.sched.append(sched)
        self.start.append(start)
        self.end.append(math.nan)
        self.code.append(PENDING)
        self.index.append(index)
        self.window.append(self.windows.of(sched))
        return len(self.sched) - 1

    def finish(self, row: int, end: float, code: int) -> None:
        self.end[row] = end
        self.code[row] = code
        self.finished.append(row)

    def recent_latencies(self, calls: int) -> np.ndarray:
        """Seconds from due to answer of the last `calls` calls to end (the live progress line)."""
        rows = self.finished[-calls:]
        return np.array([self.end[r] - self.sched[r] for r in rows])

    def recent_lags(self, calls: int) -> np.ndarray:
        """Seconds each of the last `calls` admitted calls left after it was due."""
        lags: np.ndarray = np.array(self.start[-calls:]) - np.array(self.sched[-calls:])
        return lags

    def table(self) -> CallTable:
        return CallTable(
            sched=np.array(self.sched),
            start=np.array(self.start),
            end=np.array(self.end),
            code=np.array(self.code, dtype=np.int64),
            index=np.array(self.index, dtype=np.int64),
            window=np.array(self.window, dtype=np.int64),
        )
