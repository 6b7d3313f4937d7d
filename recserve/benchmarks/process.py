"""The server process as Linux's /proc shows it: resident memory, open file descriptors and threads.

Readable only for a process on this machine (a local server, or `--pid`); every figure is None otherwise,
and the reports say "unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from types import TracebackType

from recserve.benchmarks.results import ProcessSample

PROC = Path("/proc")
# How often RssWatch samples during a step: often enough to see a queue's memory grow within a window.
SAMPLE_EVERY_S = 0.25


def exists(pid: int) -> bool:
    return (PROC / str(pid) / "status").is_file()


def _status(pid: int) -> dict[str, str]:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def _kib(value: str | None) -> int | None:
    # "123456 kB"
    if not value:
        return None
    try:
        return int(value.split()[0])
    except (ValueError, IndexError):
        return None


def rss_mib(pid: int | None) -> float | None:
    """VmRSS of `pid` in MiB; None when unknown."""
    if pid is None:
        return None
    kib = _kib(_status(pid).get("VmRSS"))
    return None if kib is None else round(kib / 1024, 1)


def read_process(pid: int | None) -> ProcessSample:
    """RSS (VmRSS), open descriptors (entries of /proc/PID/fd) and threads (Threads) of `pid`."""
    if pid is None:
        return ProcessSample(pid=None, rss_mib=None, open_fds=None, threads=None)
    status = _status(pid)
    kib = _kib(status.get("VmRSS"))
    try:
        threads: int | None = int(status["Threads"])
    except (KeyError, ValueError):
        threads = None
    try:
        fds: int | None = len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:  # gone, or another user's process
        fds = None
    return ProcessSample(
        pid=pid, rss_mib=None if kib is None else round(kib / 1024, 1), open_fds=fds, threads=threads
    )


class RssWatch:
    """`async with RssWatch(pid) as watch:` samples the RSS while open; `peak` and `end` after.

    NOTE: a periodic sample, not a wait on a condition: a few microseconds of /proc reading every
    SAMPLE_EVERY_S on the load generator's loop, cancelled on exit.
    """

    def __init__(self, pid: int | None, every_s: float = SAMPLE_EVERY_S) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak: float | None = None
        self.end: float | None = None
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> float | None:
        value = rss_mib(self.pid)
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value
        return value

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> RssWatch:
        if self.pid is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.end = self._sample()
