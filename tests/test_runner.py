"""The runner's ORT sessions: the options every session gets, and one CPU arena shared by all of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from recserve import runner
from recserve.manifest import Manifest
from recserve.runner import open_session


def model_file(repo: Path) -> Path:
    return repo / Manifest.load(repo).variants["fp32"].file


def test_cpu_sessions_get_the_servers_options(tiny_repo: Path) -> None:
    sessions = [open_session(model_file(tiny_repo), intra_op_threads=n) for n in (2, 1)]
    for session, threads in zip(sessions, (2, 1), strict=True):
        options = session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        # The process's one CPU arena, not one per session (docs/decisions/0007).
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        assert options.enable_cpu_mem_arena and options.enable_mem_pattern


def test_the_shared_arena_is_registered_once(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second registration would replace the arena: sessions opened after it would not share."""
    open_session(model_file(tiny_repo))
    calls: list[object] = []
    monkeypatch.setattr(ort, "create_and_register_allocator", lambda *args: calls.append(args))
    runner.register_shared_cpu_arena()
    open_session(model_file(tiny_repo))
    assert calls == []


# Two sessions of one file, each runs the same big batch: with one arena the second reuses what the first
# grew; with an arena each it grows its own. In a child process: the arena is the process's.
_SECOND_SESSION_GROWTH = """
import sys
from pathlib import Path
import numpy as np
from recserve.manifest import Manifest
from recserve.runner import open_session

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

repo = Path(sys.argv[1])
manifest = Manifest.load(repo)
a, b = (open_session(repo / manifest.variants["fp32"].file, intra_op_threads=1) for _ in range(2))
feeds = {name: np.ones((32, 512), dtype=np.int64) for name in manifest.inputs}
before = rss_mib()
a.run(None, feeds)
first = rss_mib()
b.run(None, feeds)
print(first - before, rss_mib() - first)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_session_reuses_the_arena_the_first_grew(tiny_repo: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SECOND_SESSION_GROWTH, str(tiny_repo)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    first, second = (float(x) for x in out.stdout.split())
    # [32, 2 heads, 512, 512] float32 attention scores alone are 64 MiB.
    assert first > 50, out.stdout
    assert second < first / 4, out.stdout


def test_sessions_sharing_the_arena_run_at_once_and_agree(tiny_repo: Path) -> None:
    """Two threads, one session each, on one arena: the same rows as one session alone."""
    from concurrent.futures import ThreadPoolExecutor

    from recserve.runner import GraphSpec, Runner
    from recserve.server.app import warmup_batches

    manifest = Manifest.load(tiny_repo)
    spec = GraphSpec.of(manifest)
    runners = [Runner(open_session(model_file(tiny_repo), intra_op_threads=1), spec) for _ in range(2)]
    batches = warmup_batches(8, 512, manifest.max_length) * 4
    expected = [runners[0].run(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda ib: runners[ib[0] % 2].run(ib[1]), enumerate(batches)))
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-5)
