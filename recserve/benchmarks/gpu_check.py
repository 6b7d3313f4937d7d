"""`recserve bench gpu-check` (`make gpu-check`): what a GPU machine must show before fp16 on CUDA is served.

On a machine with a CUDA GPU and onnxruntime-gpu, in a few minutes and with nothing but what the GPU image
has (onnxruntime-gpu, numpy, tokenizers, grpcio; no torch, no matplotlib):

1. fp16 parity on the CUDA provider, on every parity text (export/parity_texts.py), by the export's own
   gate (export/parity.check_variant): against the fp32 variant on the CPU provider, and against the
   PyTorch reference too where torch, sentence-transformers and the checkpoint are on this machine;
2. batch invariance there: each text alone against the same text inside a padded, length-sorted batch (the
   same gate as the export's);
3. that the server's runner binds its inputs and outputs (IO binding) on CUDA, counted at the session while
   it runs a batch;
4. the raw fp16 throughput of the workload in process (baseline.raw_limit, through the server's runtime);
5. the served throughput with 64 closed-loop callers: `recserve serve --precision fp16 --device cuda` in
   a child process on free ports, loaded through the harness.

It writes gpu-check.json and GPU-CHECK.md to --out. Without a CUDA provider or a GPU it refuses in one line
(exit 2) before measuring anything; `--device cpu` runs the same steps on the CPU provider as a dry run of
the mechanism, whose figures say nothing of a GPU.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

from recserve.benchmarks import report
from recserve.benchmarks.config import ConfigError, workload_of
from recserve.benchmarks.loadgen import LoadSettings
from recserve.benchmarks.protocols import as_target
from recserve.benchmarks.results import (
    Document,
    GpuCheckResult,
    IoBindingCheck,
    ParityCheck,
    RawLimit,
    Series,
    StepResult,
    SummaryItem,
    to_json,
)
from recserve.benchmarks.sweep import ProgressLine, sweep
from recserve.benchmarks.workloads import Workload, WorkloadSpec

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
JSON_NAME = "gpu-check.json"
MARKDOWN_NAME = "GPU-CHECK.md"
# The served step's calls may queue behind 63 others on a slow start: a deadline only a broken server misses.
CALL_DEADLINE_S = 30.0
# The server loads the model and warms up every size class before it says SERVING; on a GPU that includes
# CUDA's own start. Bounded so the whole check stays well inside its few minutes.
SERVER_START_S = 180.0
# Passes of the raw limit (the median counts) and lone texts timed after them.
RAW_REPEATS = 3
RAW_SINGLES = 50
# Served over raw, as the suite's efficiency figure (informational: it does not fail the check).
EFFICIENCY_TARGET = 0.9


class Refusal(RuntimeError):
    """This machine cannot run the check (no CUDA provider, no GPU): one line, exit 2, nothing measured."""


@dataclass(frozen=True)
class GpuCheckConfig:
    model_repo: Path
    out: Path
    device: Literal["cuda", "cpu"] = "cuda"
    callers: int = 64
    warmup_s: float = 5.0
    window_s: float = 20.0
    threads: int = 1
    reference: str = "auto"
    """auto: the PyTorch reference of the manifest's checkpoint where torch and it are here; none; or a
    checkpoint directory."""
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    progress: bool = True
    command: str = ""


def refusal(available: Sequence[str], device: str) -> str | None:
    """Why this onnxruntime cannot run the check on `device`, or None."""
    if device == "cuda" and CUDA not in available:
        return (
            f"onnxruntime has no {CUDA} (it has {', '.join(available) or 'none'}): the GPU check needs "
            "onnxruntime-gpu (the gpu extra) and a CUDA GPU; --device cpu runs it as a dry run"
        )
    return None


def _gpu_name() -> str | None:
    """The GPU as nvidia-smi names it, where there is one: for the report, never required."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _parity_check(against: str, parity: Any) -> ParityCheck:
    """The export gate's Parity as the report's figures (non-finite figures as None: JSON has no NaN)."""
    min_cos, max_diff = _finite(parity.min_cosine), _finite(parity.max_abs_diff)
    threshold = float(parity.threshold)
    invariance = _finite(parity.batch_invariance)
    limit = _finite(parity.batch_invariance_threshold)
    if parity.min_cosine is not None:  # an embedding model; a NaN figure is no pass
        accurate = min_cos is not None and min_cos >= threshold
    else:
        accurate = max_diff is not None and max_diff <= threshold
    return ParityCheck(
        against=against,
        texts=int(parity.texts),
        min_cosine=min_cos,
        mean_cosine=_finite(parity.mean_cosine),
        max_abs_diff=max_diff,
        threshold=threshold,
        batch_invariance=invariance,
        batch_invariance_threshold=limit,
        accurate=accurate,
        invariant=invariance is not None and (limit is None or invariance <= limit),
        worst=tuple(f"{w['text']} ({w['metric']} {w['value']:.6g})" for w in parity.worst),
    )


class Checker:
    """The sessions of one repository on the checked provider, and the checks that run on them."""

    def __init__(self, cfg: GpuCheckConfig) -> None:
        # Imported here: onnxruntime is heavy, and `recserve bench --help` must not pay for it.
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from recserve.manifest import Manifest, Precision
        from recserve.runner import GraphSpec, Runner, TextRunner, open_session

        why = refusal(ort.get_available_providers(), cfg.device)
        if why is not None:
            raise Refusal(why)
        self.cfg = cfg
        self.manifest = Manifest.load(cfg.model_repo)
        missing = [p for p in ("fp16", "fp32") if p not in self.manifest.variants]
        if missing:
            raise ConfigError(f"--model-repo {cfg.model_repo} has no {' or '.join(missing)} variant to check")
        provider = CUDA if cfg.device == "cuda" else CPU
        spec = GraphSpec.of(self.manifest)
        tokenizer = Tokenizer.from_file(str(cfg.model_repo / self.manifest.tokenizer_file))

        def runner(precision: Precision, on: str) -> TextRunner:
            file = cfg.model_repo / self.manifest.variants[precision].file
            session = open_session(file, on, cfg.threads, log_severity_level=3)
            return TextRunner(Runner(session, spec), tokenizer)

        try:
            self.fp16 = runner("fp16", provider)
        except Exception as exc:  # ORT's own exception types: the CUDA libraries, a driver, the file
            raise Refusal(
                f"onnxruntime cannot open the fp16 variant on {provider}: {_first_line(exc)}"
            ) from None
        if self.fp16.provider != provider:
            # ORT falls back to the CPU silently when CUDA cannot start (no GPU, no driver, wrong libraries).
            raise Refusal(
                f"onnxruntime could not use {provider} (it fell back to {self.fp16.provider}): no usable "
                "CUDA GPU here, or the CUDA and cuDNN libraries do not load"
            )
        self.fp32 = runner("fp32", CPU)

    @property
    def items(self) -> list[Any]:
        from recserve.export.parity_texts import parity_pairs, parity_texts

        return list(parity_pairs()) if self.manifest.task == "cross-encoder" else parity_texts()

    def parity(self) -> tuple[ParityCheck, ParityCheck | None, str | None]:
        """fp16 here against fp32 on the CPU (each text alone: no padding in the reference), and against the
        PyTorch reference where it can be loaded here."""
        from recserve.export.parity import check_variant

        items = self.items
        reference = self._reference_vectors(items)
        fp32 = _parity_check(
            "fp32 on the CPU provider",
            check_variant(self.fp16, "fp16", items, self.fp32(items, batch_size=1)),
        )
        if isinstance(reference, str):
            return fp32, None, reference
        torch = _parity_check("the PyTorch reference", check_variant(self.fp16, "fp16", items, reference))
        return fp32, torch, None

    def _reference_vectors(self, items: list[Any]) -> Any:
        """The PyTorch reference's outputs, or why there are none (a string)."""
        if self.cfg.reference == "none":
            return "not asked for (--reference none)"
        path = Path(self.manifest.source.path if self.cfg.reference == "auto" else self.cfg.reference)
        try:
            import sentence_transformers  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            return "torch or sentence-transformers is not installed here (the GPU image has neither)"
        if not path.is_dir():
            return f"the checkpoint {path} is not on this machine (--reference DIR names one)"
        from recserve.export.checkpoint import inspect_checkpoint
        from recserve.export.errors import ExportError
        from recserve.export.reference import Reference

        try:
            ref = Reference(inspect_checkpoint(path), self.manifest.task, self.manifest.max_length)
            return ref.run(items)
        except ExportError as exc:
            return str(exc)


def io_binding_check(runner: Any, batch: Sequence[Any]) -> IoBindingCheck:
    """Runs `batch` (Encoded texts) through `runner` (a recserve.runner.Runner), counting at its ORT session
    the runs with IO binding and the plain ones: the code that serves, inspected rather than assumed."""
    session = runner.session
    counts = {"run": 0, "run_with_iobinding": 0}

    def counting(name: str) -> Any:
        original = getattr(session, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        return counted

    for name in counts:
        setattr(session, name, counting(name))
    try:
        runner.run(batch)
    finally:
        for name in counts:
            delattr(session, name)  # the class's own methods again
    return IoBindingCheck(
        provider=runner.provider,
        expected=runner.provider == CUDA,
        bound_runs=counts["run_with_iobinding"],
        plain_runs=counts["run"],
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


async def run_gpu_check(cfg: GpuCheckConfig, err: TextIO | None = None) -> int:
    """The check after its flags were checked: 0 when every check holds, 1 when one does not. Raises
    Refusal when this machine cannot run it, ConfigError, TargetError or ServerStartError otherwise."""
    err = err or sys.stderr
    started = time.monotonic()
    progress = ProgressLine(err) if cfg.progress else None

    def say(line: str) -> None:
        if progress is not None:
            progress.finish(line)

    settings = to_json(cfg)
    assert isinstance(settings, dict)
    doc = report.new_document("gpu-check", cfg.command, settings)
    workload = workload_of(cfg.workload)
    checker = await asyncio.to_thread(Checker, cfg)
    say(f"parity: {len(checker.items)} texts, fp16 on {checker.fp16.provider} against fp32 on the CPU")
    parity, reference, skipped = await asyncio.to_thread(checker.parity)

    from recserve.benchmarks.baseline import RawModel, raw_limit

    def raw_model() -> RawModel:
        return RawModel(
            cfg.model_repo, threads=cfg.threads, precision="fp16", device=cfg.device, query=workload.texts[0]
        )

    model = await asyncio.to_thread(raw_model)
    # The server's own backend (load_backend), as `recserve serve` builds it: its runner is the one checked.
    batch = checker.fp32.encode(workload.texts[:32])
    binding = await asyncio.to_thread(io_binding_check, model.backend.alone, batch)
    say(f"IO binding: {binding.bound_runs} bound run(s), {binding.plain_runs} plain, on {binding.provider}")
    say(f"raw limit: {len(workload.texts)} texts, fp16, {RAW_REPEATS} passes")
    raw = await asyncio.to_thread(raw_limit, model, workload.texts, repeats=RAW_REPEATS, singles=RAW_SINGLES)
    del model  # its GPU memory, before the server takes its own
    step, info = await _served(cfg, workload, raw, progress)
    result = GpuCheckResult(
        device=cfg.device,
        dry_run=cfg.device != "cuda",
        gpu=await asyncio.to_thread(_gpu_name),
        provider=checker.fp16.provider,
        parity=parity,
        reference=reference,
        reference_skipped=skipped,
        io_binding=binding,
        served_provider=info.provider,
        served_precision=info.precision,
        callers=cfg.callers,
        seconds=round(time.monotonic() - started, 1),
        passed=False,
    )
    result = replace(result, passed=all(ok for _, _, ok in checks(result, step)))
    notes = []
    if result.dry_run:
        notes.append(
            "DRY RUN on the CPU provider (--device cpu): the steps of the GPU check, none of its figures "
            "says anything about a GPU"
        )
    done = replace(
        doc,
        workload=workload.describe(),
        raw=raw,
        series=(
            Series(name=f"served fp16, {cfg.callers} callers", target="local", server=info, steps=(step,)),
        ),
        summary=summary(result, step, raw),
        sections={"Checks": checks_section(result, step)},
        gpu_check=result,
        notes=tuple(notes),
        reproduce_hint="`make gpu-check` runs this check on the default model (MODEL_REPO in the Makefile).",
    )
    write_report(done, cfg.out)
    return 0 if result.passed else 1


async def _served(
    cfg: GpuCheckConfig, workload: Workload, raw: RawLimit, progress: ProgressLine | None
) -> tuple[StepResult, Any]:
    """`recserve serve --precision fp16 --device D` in a child process, `callers` closed-loop callers."""
    from recserve.benchmarks.servers import local_server
    from recserve.benchmarks.targets import check_target, connected

    log = cfg.out / "logs" / "server-fp16.log"
    extra = ["--precision", "fp16", "--device", cfg.device]
    plan = LoadSettings(
        warmup_s=cfg.warmup_s, window_s=cfg.window_s, max_windows=1, deadline_s=CALL_DEADLINE_S
    ).plan("closed", concurrency=cfg.callers, seed=workload.spec.seed)
    async with (
        local_server(
            cfg.model_repo, threads=cfg.threads, log_path=log, extra=extra, start_timeout=SERVER_START_S
        ) as srv,
        connected(srv.address) as client,
    ):
        info = await check_target(client, srv.address)
        (step,) = await sweep(
            as_target(client, srv.metrics_url),
            [plan],
            workload,
            metrics_url=srv.metrics_url,
            progress=progress,
            raw_texts_per_s=raw.texts_per_s,
            series="served fp16",
        )
    return step, info


def checks(result: GpuCheckResult, step: StepResult) -> list[tuple[str, str, bool]]:
    """Every check that must hold: (what, what was found, whether it holds)."""
    p = result.parity
    rows = [
        (f"fp16 parity against {p.against}", _parity_text(p), p.accurate),
        (
            "batch invariance (alone against the gate's padded batches)",
            f"largest difference {p.batch_invariance} (bound {p.batch_invariance_threshold})",
            p.invariant,
        ),
    ]
    if result.reference is not None:
        rows.append(
            (
                f"fp16 parity against {result.reference.against}",
                _parity_text(result.reference),
                result.reference.accurate,
            )
        )
    b = result.io_binding
    wanted = "every run bound" if b.expected else "none bound (the CPU provider runs without it)"
    rows.append(
        (f"IO binding on {b.provider}: {wanted}", f"{b.bound_runs} bound, {b.plain_runs} plain run(s)", b.ok)
    )
    asked = CUDA if result.device == "cuda" else CPU
    rows.append(
        (
            f"served as fp16 on {asked}",
            f"{result.served_precision} on {result.served_provider}",
            result.served_provider == asked and result.served_precision == "fp16",
        )
    )
    m = step.measured
    rows.append(
        (f"{result.callers} callers, no call failed", f"{m.failed} of {m.sent} failed", m.failed == 0)
    )
    return rows


def _parity_text(p: ParityCheck) -> str:
    if p.min_cosine is not None:
        return f"min cosine {p.min_cosine:.6f} (bound {p.threshold}), mean {p.mean_cosine}, {p.texts} texts"
    return f"largest logit difference {p.max_abs_diff} (bound {p.threshold:.3g}), {p.texts} texts"


def checks_section(result: GpuCheckResult, step: StepResult) -> list[str]:
    rows = [[what, found, "met" if ok else "**missed**"] for what, found, ok in checks(result, step)]
    lines = [
        f"fp16 on `{result.provider}`" + (f" ({result.gpu})" if result.gpu else "") + f", {result.seconds} s "
        f"in all. {'Every check holds.' if result.passed else 'A check does not hold.'}",
        "",
        *report.md_table(["check", "found", ""], rows),
    ]
    if result.reference_skipped:
        lines += ["", f"The PyTorch reference was not compared: {result.reference_skipped}."]
    worst = result.parity.worst
    if worst:
        lines += ["", "Worst texts against fp32: " + "; ".join(worst) + "."]
    return lines


def summary(result: GpuCheckResult, step: StepResult, raw: RawLimit) -> dict[str, SummaryItem]:
    m = step.measured
    ratio = step.ratio_to_raw
    p = result.parity
    held = [ok for _, _, ok in checks(result, step)]
    return {
        "checks": SummaryItem(
            title="Checks that hold",
            value=sum(held),
            unit=f" of {len(held)}",
            digits=0,
            how="parity, batch invariance, IO binding, the served provider and precision, no failed call "
            "(below)",
            target="all",
            met=all(held),
        ),
        "fp16_parity": SummaryItem(
            title=f"fp16 parity against {p.against} (min cosine)",
            value=p.min_cosine,
            digits=6,
            how=f"{p.texts} parity texts, fp16 on {result.provider}, in padded batches of 32",
            target=f">= {p.threshold}",
            met=p.accurate,
        ),
        "raw_fp16": SummaryItem(
            title="Raw fp16 throughput",
            value=raw.texts_per_s,
            unit=" texts/s",
            digits=1,
            how=f"in process on {raw.provider}, length-sorted batches of {raw.batch_size}, median of "
            f"{raw.repeats} passes",
        ),
        "served_fp16": SummaryItem(
            title=f"Served fp16 throughput, {result.callers} callers",
            value=m.texts_per_s,
            unit=" texts/s",
            digits=1,
            how=f"closed loop, one text a call, p50 {m.latency_ms.p50} ms, p99 {m.latency_ms.p99} ms",
        ),
        "served_over_raw": SummaryItem(
            title="Served over raw",
            value=ratio,
            how="the served texts/s over the raw limit's, taken minutes apart (the suite pairs them)",
            target=f">= {EFFICIENCY_TARGET}",
            met=ratio is not None and ratio >= EFFICIENCY_TARGET,
        ),
    }


def write_report(doc: Document, out: Path) -> dict[str, Path]:
    """gpu-check.json and GPU-CHECK.md in `out` (no plots: the GPU image has no matplotlib)."""
    doc = report.finish(doc)
    paths = {
        "json": report.write_json(doc, out / JSON_NAME),
        "markdown": report.write_markdown(doc, out / MARKDOWN_NAME, {}, out),
    }
    report.print_tables(doc)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return paths
