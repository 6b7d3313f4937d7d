"""Native thread names by role, and the CPU each role used, read from /proc.

Python 3.11 names its threads for Python only: `top -H`, perf and /proc show the process's name on every
one, so nobody outside can tell the event loop from a model thread. The server (and the bare baseline)
name their worker threads at the OS level with a prefix per role; ONNX Runtime's pool threads inherit the
name of the thread that opens a session, so sessions are opened under the model's name. The event loop
runs on the main thread, which keeps the process's name (what ps, top and pkill show). `cpu_by_group` then
sums a process's CPU per role, which is how the harness splits a call's CPU into the model and the rest.
Linux only; elsewhere naming is a no-op and the groups are empty.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOKENIZE = "rs-tokenize"
MODEL = "rs-model"
SEARCH = "rs-search"
# The thread gRPC's asyncio integration polls its completion queue on (a Python thread that gRPC starts).
GRPC_POLLER = "grpc-poller"

# Role of a thread by the start of its native name. gRPC's own C++ threads name themselves.
GROUPS: dict[str, str] = {
    TOKENIZE: "tokenize",
    MODEL: "model",
    SEARCH: "search",
    GRPC_POLLER: "grpc",
    "event_engine": "grpc",
    "grpc_": "grpc",
    "lifeguard": "grpc",
}
# The main thread, which runs the event loop.
LOOP = "loop"
OTHER = "other"
# Linux keeps 15 bytes of a thread's name.
_MAX_NAME = 15


def _comm(tid: int, pid: str = "self") -> Path:
    return Path(f"/proc/{pid}/task/{tid}/comm")


def name_thread(name: str, tid: int | None = None) -> None:
    """Gives a thread of this process (the calling one by default) a native name; best effort."""
    with contextlib.suppress(OSError):  # not Linux, or the thread has gone
        _comm(threading.get_native_id() if tid is None else tid).write_text(name[:_MAX_NAME])


@contextmanager
def named(name: str) -> Iterator[None]:
    """The calling thread carries `name` inside the block: threads started there (ORT's) inherit it."""
    path = _comm(threading.get_native_id())
    try:
        before = path.read_text().strip()
    except OSError:
        yield
        return
    name_thread(name)
    try:
        yield
    finally:
        name_thread(before)


def start_as(name: str, nice: int = 0) -> None:
    """A worker thread's initializer: its native name and, above 0, a lower priority (a higher nice)."""
    name_thread(name)
    if nice > 0:
        lower_priority(name, nice)


def _threads_named(name: str) -> list[int]:
    """The ids of this process's threads whose native name is `name` (as Linux keeps it); [] off Linux."""
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []
    named = []
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread has gone
            if _comm(tid).read_text().strip() == name[:_MAX_NAME]:
                named.append(tid)
    return named


def lower_priority(name: str, nice: int) -> None:
    """Sets `nice` on every thread of this process named `name`, unless it runs lower already; best effort.

    Linux keeps a nice value per thread, and raising one's own needs no privilege (lowering it back does).
    """
    for tid in _threads_named(name):
        with contextlib.suppress(OSError):
            # Never above the process's own priority (a server started under `nice` stays below it).
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


def restore_priority(name: str) -> None:
    """Gives every thread of this process named `name` the calling thread's nice value again; best effort:
    lowering a nice value needs CAP_SYS_NICE (or RLIMIT_NICE), so without it nothing changes."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for tid in _threads_named(name):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, base)


def name_grpc_poller() -> None:
    """Names gRPC's poller thread, which exists once a grpc.aio server or channel has started."""
    for thread in threading.enumerate():
        if "_poll_wrapper" in thread.name and thread.native_id is not None:
            name_thread(GRPC_POLLER, thread.native_id)


def group_of(name: str) -> str:
    return next((group for prefix, group in GROUPS.items() if name.startswith(prefix)), OTHER)


def cpu_by_thread(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of process `pid`: its group (the main thread's is LOOP) and the CPU-seconds (user +
    system) it has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = _comm(int(tid), str(pid)).read_text().strip()
            # Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended between the listing and the read
        group = LOOP if tid == str(pid) else group_of(name)
        out[int(tid)] = (group, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def cpu_by_group(pid: int) -> dict[str, float]:
    """CPU-seconds (user + system) each role's threads of process `pid` have used so far.

    Threads that ended are not counted: compare two readings of a server whose threads live as long as it.
    """
    totals: dict[str, float] = {}
    for group, seconds in cpu_by_thread(pid).values():
        totals[group] = totals.get(group, 0.0) + seconds
    return totals


def process_cpu(pid: int) -> float | None:
    """CPU-seconds (user + system) of process `pid`, threads that ended included; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
