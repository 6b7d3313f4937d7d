"""Native thread names by role and the CPU per role read from /proc (recserve/threads.py), in this process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from recserve import threads

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux's /proc only")


def native_name(tid: int | None = None) -> str:
    return Path(f"/proc/self/task/{tid or threading.get_native_id()}/comm").read_text().strip()


def test_a_thread_named_by_role_has_its_cpu_counted_in_that_group() -> None:
    burnt, release = threading.Event(), threading.Event()
    tid: list[int] = []

    def tokenizer() -> None:
        threads.name_thread(threads.TOKENIZE)
        tid.append(threading.get_native_id())
        end = time.thread_time() + 0.2
        while time.thread_time() < end:  # CPU, not wall time: a busy machine must not shorten it
            pass
        burnt.set()
        release.wait(10)  # alive while read: a thread that ended is in no group

    before = threads.cpu_by_group(os.getpid()).get("tokenize", 0.0)
    worker = threading.Thread(target=tokenizer)
    worker.start()
    try:
        assert burnt.wait(30)
        assert native_name(tid[0]) == threads.TOKENIZE
        by_thread = threads.cpu_by_thread(os.getpid())
        group, cpu = by_thread[tid[0]]
        assert group == "tokenize" and cpu >= 0.15  # 0.2 s burnt, read in ticks of 10 ms
        by_group = threads.cpu_by_group(os.getpid())
        assert by_group["tokenize"] - before >= 0.15
        assert by_thread[os.getpid()][0] == threads.LOOP  # the main thread is the event loop's
        process = threads.process_cpu(os.getpid())
        assert process is not None and process >= sum(by_group.values()) - 0.01 * len(by_thread)
    finally:
        release.set()
        worker.join()


def test_named_holds_a_name_for_its_block_and_threads_started_there_keep_it() -> None:
    seen: dict[str, str] = {}

    def child() -> None:
        seen["child"] = native_name()

    def body() -> None:
        threads.name_thread("rs-before")
        with threads.named(threads.MODEL):
            seen["inside"] = native_name()
            started = threading.Thread(target=child)  # as ORT's pool threads start inside the block
            started.start()
            started.join()
        seen["after"] = native_name()

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == {"inside": threads.MODEL, "child": threads.MODEL, "after": "rs-before"}


def test_names_are_cut_to_what_linux_keeps() -> None:
    seen: list[str] = []

    def body() -> None:
        threads.name_thread("rs-tokenize-and-more")
        seen.append(native_name())

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == ["rs-tokenize-and"]  # 15 bytes


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("rs-tokenize", "tokenize"),
        ("rs-model", "model"),
        ("rs-search", "search"),
        ("grpc-poller", "grpc"),
        ("event_engine", "grpc"),
        ("grpc_global_tim", "grpc"),
        ("lifeguard", "grpc"),
        ("python", threads.OTHER),
        ("ThreadPoolExecu", threads.OTHER),
        ("model", threads.OTHER),  # by prefix: a name that merely contains a role is not it
    ],
)
def test_group_of_a_name(name: str, group: str) -> None:
    assert threads.group_of(name) == group


def test_a_process_that_is_not_there_has_no_threads() -> None:
    gone = 2**22 + 1  # above Linux's largest pid_max
    assert threads.cpu_by_group(gone) == {} and threads.cpu_by_thread(gone) == {}
    assert threads.process_cpu(gone) is None


@pytest.mark.parametrize("nice", [0, 7])
def test_a_served_models_threads_run_at_the_nice_value_it_is_given(nice: int) -> None:
    from tests.support.fake_model import fake_model
    from tests.support.serving import embed, serving

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # `nice make test` starts above 0
    before = set(os.listdir("/proc/self/task"))  # other tests' ORT threads may live on, at their nice
    with serving(Path("fake"), fake_model(), metrics_port=None, model_threads_nice=nice) as server:
        embed(server.stub(), ["wakes a model thread"])
        model_threads = [
            int(tid)
            for tid in set(os.listdir("/proc/self/task")) - before
            if native_name(int(tid)) == threads.MODEL
        ]
        assert model_threads
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in model_threads} == {max(nice, base)}
        # The loop (this test's server thread) and gRPC keep the process's priority.
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a nice value back needs CAP_SYS_NICE")
def test_restore_priority_gives_a_lowered_thread_the_callers_nice_again() -> None:
    """What the server does before it ends the model's threads: at their low priority, ending them beside
    busy threads took a noticeable part of a second."""
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        threads.name_thread("rs-prio-test")
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert ready.wait(10)
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        threads.lower_priority("rs-prio-test", base + 7)
        assert os.getpriority(os.PRIO_PROCESS, tid[0]) == base + 7
        threads.restore_priority("rs-prio-test")
        assert os.getpriority(os.PRIO_PROCESS, tid[0]) == base
    finally:
        done.set()
        t.join()
