"""`recserve bench gpu-check` (recserve/benchmarks/gpu_check.py) where there is no GPU: the one-line refusal,
the IO binding count, and a dry run of every step on the CPU provider with the tiny exported model, whose
report (JSON and Markdown) is the one a GPU machine writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from recserve.benchmarks.gpu_check import CPU, CUDA, io_binding_check, refusal
from tests.support.bench import bench

HAS_CUDA = CUDA in ort.get_available_providers()
QUICK = ["--callers", "4", "--warmup", "0.2", "--duration", "0.5", "--threads", "1", "--quiet"]


def test_refusal_names_what_is_missing() -> None:
    why = refusal([CPU], "cuda")
    assert why is not None and "no CUDAExecutionProvider" in why and "onnxruntime-gpu" in why
    assert refusal([CUDA, CPU], "cuda") is None
    assert refusal([CPU], "cpu") is None  # the dry run needs no GPU


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has a CUDA provider: nothing to refuse")
def test_without_cuda_it_refuses_in_one_line_and_measures_nothing(
    tiny_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(["gpu-check", "--model-repo", str(tiny_repo), "--out", str(tmp_path / "gpu"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("recserve bench gpu-check: onnxruntime has no CUDAExecutionProvider")
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "gpu").exists()


def test_bad_flags_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench(["gpu-check", "--model-repo", str(tmp_path / "none"), "--quiet"]) == 2
    assert "--model-repo:" in capsys.readouterr().err


class Session:
    """Stands in for an ORT session: counts nothing itself, the check wraps its two run methods."""

    def run(self, *args: Any) -> None:
        pass

    def run_with_iobinding(self, *args: Any) -> None:
        pass


class Runner:
    def __init__(self, provider: str, bind: bool) -> None:
        self.session, self.provider, self.bind = Session(), provider, bind

    def run(self, batch: Any) -> None:
        (self.session.run_with_iobinding if self.bind else self.session.run)()


def test_io_binding_is_counted_at_the_session() -> None:
    bound = io_binding_check(Runner(CUDA, bind=True), [])
    assert (bound.expected, bound.bound_runs, bound.plain_runs, bound.ok) == (True, 1, 0, True)
    assert not io_binding_check(Runner(CUDA, bind=False), []).ok  # CUDA without binding: the check fails
    assert io_binding_check(Runner(CPU, bind=False), []).ok
    runner = Runner(CUDA, bind=True)
    io_binding_check(runner, [])
    assert "run" not in vars(runner.session)  # the session's own methods are back


def test_a_dry_run_on_the_cpu_writes_the_report(tiny_repo: Path, tmp_path: Path) -> None:
    """Every step of the check on the CPU provider: parity against fp32 and (torch is here, the tiny
    checkpoint too) the PyTorch reference, IO binding (none on the CPU), raw and served fp16."""
    out = tmp_path / "gpu"
    assert (
        bench(["gpu-check", "--model-repo", str(tiny_repo), "--out", str(out), "--device", "cpu", *QUICK])
        == 0
    )
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["kind"] == "gpu-check"
    check = doc["gpu_check"]
    assert check["dry_run"] and check["provider"] == CPU and check["passed"]
    parity = check["parity"]
    assert parity["texts"] >= 200 and parity["accurate"] and parity["invariant"]
    assert parity["min_cosine"] >= parity["threshold"]
    assert check["reference"]["against"] == "the PyTorch reference" and check["reference"]["accurate"]
    binding = check["io_binding"]
    assert binding["expected"] is False and binding["bound_runs"] == 0 and binding["plain_runs"] >= 1
    assert (check["served_precision"], check["served_provider"]) == ("fp16", CPU)
    assert doc["raw"]["precision"] == "fp16" and doc["raw"]["texts_per_s"] > 0
    (step,) = doc["series"][0]["steps"]
    assert step["concurrency"] == 4 and step["failed"] == 0 and step["completed"] > 0
    assert step["ratio_to_raw"] > 0 and step["server"]["batches"] > 0  # the local server's metrics
    assert {"fp16_parity", "raw_fp16", "served_fp16", "served_over_raw"} <= set(doc["summary"])
    md = (out / "GPU-CHECK.md").read_text()
    assert md.startswith("# recserve GPU check: fp16 on CUDA") and "## Checks" in md and "DRY RUN" in md
    assert "| IO binding on CPUExecutionProvider: none bound" in md and "**missed**" not in md
