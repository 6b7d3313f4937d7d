"""The export, step by step: checkpoint -> reference -> ONNX -> tokenizer -> fusion -> variants -> gate.

Each step prints what it does and how long it took; the durations land in the manifest too.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from recserve.export import int8, onnx_export, parity, repository, timing
from recserve.export.checkpoint import Checkpoint, inspect_checkpoint, weights_sha256
from recserve.export.errors import ExportError, ParityFailure
from recserve.export.parity_texts import parity_pairs, parity_texts
from recserve.manifest import (
    OUTPUT_NAMES,
    TOKENIZER_FILE,
    ExportInfo,
    Manifest,
    Parity,
    Precision,
    Source,
    Task,
    Variant,
    file_sha256,
)
from recserve.runner import CPU, CUDA, GraphSpec, TextRunner
from recserve.tensors import FloatArray, Item

GraphKind = Literal["fused", "plain"]
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PROVIDERS: dict[Precision, str] = {
    "fp32": CPU,
    "fp16": CUDA,
    "int8": CPU,
}
_VERSIONED = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "sentence-transformers",
)


@dataclass(frozen=True)
class ExportOptions:
    model: Path
    out: Path
    task: Task | None = None
    max_length: int | None = None
    variants: tuple[Precision, ...] = ("fp32", "fp16", "int8")
    force: bool = False
    keep_failing: bool = False
    model_name: str | None = None


@dataclass
class ExportResult:
    manifest: Manifest
    # One line per variant that failed the gate (written only with --keep-failing).
    failures: list[str] = field(default_factory=list)


class Progress:
    """Prints each step and its duration; remembers the durations for the manifest."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.steps: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def step(self, key: str, what: str) -> Iterator[None]:
        self.echo(f"[export] {what} ...")
        start = time.perf_counter()
        yield
        self.steps[key] = round(time.perf_counter() - start, 3)
        self.echo(f"[export]   done in {self.steps[key]:.2f} s")


def export(options: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    """Runs the whole export; raises ExportError (bad input) or ParityFailure (nothing passed)."""
    progress = Progress(echo)
    with progress.step("inspect", f"inspecting checkpoint {options.model}"):
        checkpoint = inspect_checkpoint(options.model)
        task = options.task or checkpoint.default_task()
        max_length = _resolve_max_length(checkpoint, options.max_length)
        if task == "cross-encoder" and not checkpoint.is_classifier:
            raise ExportError(
                f"task cross-encoder needs a *ForSequenceClassification checkpoint; {options.model} is "
                f"{checkpoint.architecture}"
            )
        repository.check_target(options.out, options.force)
        echo(
            f"[export]   {checkpoint.architecture} ({checkpoint.layout} layout), task {task}, max length "
            f"{max_length}, pooling {checkpoint.pooling if task == 'embedding' else 'none'}, normalize "
            f"{checkpoint.normalize if task == 'embedding' else False}"
        )
    items: list[Item] = list(parity_texts()) if task == "embedding" else list(parity_pairs())
    with repository.Staging(options.out) as staging:
        work = staging.path / ".work"
        work.mkdir()
        with progress.step("reference", f"running the PyTorch reference on {len(items)} parity texts"):
            from recserve.export.reference import Reference

            reference = Reference(checkpoint, task, max_length)
            expected = reference.run(items)
            reference_ids = reference.token_ids(items)
        with progress.step("onnx_export", "exporting to ONNX with optimum (dynamic batch and sequence axes)"):
            plain, inputs = onnx_export.export_plain(checkpoint, task, work)
        with progress.step("tokenizer", f"writing the tokenizer (truncation at {max_length}, no padding)"):
            pad_id = repository.save_tokenizer(checkpoint.model_dir, staging.path, max_length)
            from tokenizers import Tokenizer

            shipped = Tokenizer.from_file(str(staging.path / TOKENIZER_FILE))
            parity.check_tokens([e.ids for e in shipped.encode_batch(items)], reference_ids, items)
        with progress.step("fusion", "fusing the graph with ONNX Runtime's transformer optimizer"):
            fused: Path | None = work / "fused.onnx"
            fused_ops = _fuse(plain, checkpoint, work / "fused.onnx", echo)
            if not fused_ops:
                fused = None
            echo(f"[export]   fused operators: {fused_ops or 'none'}")
        spec = GraphSpec(
            task=task,
            inputs=tuple(inputs),
            output_name=OUTPUT_NAMES[task],
            pooling=checkpoint.pooling if task == "embedding" else None,
            normalize=checkpoint.normalize if task == "embedding" else False,
            pad_token_id=pad_id,
        )
        tokenizer_file = staging.path / TOKENIZER_FILE
        built = _build_variants(options.variants, plain, fused, work, progress)
        timings: dict[str, dict[str, float]] = {}
        if built.candidates:
            with progress.step(
                "timing", "timing the CPU graphs (fp32 fused vs plain, int8) on mixed lengths"
            ):
                encoders = {
                    name: TextRunner.open(path, tokenizer_file, spec)
                    for name, path in built.candidates.items()
                }
                timings = timing.time_graphs(encoders, items)
                for name, t in timings.items():
                    echo(
                        f"[export]   {name}: {t['batched']:.3f} s length-sorted batches, "
                        f"{t['batch1']:.3f} s batch 1"
                    )
        if "fp32" in options.variants:
            built.pick_fp32(timings)
            echo(f"[export]   fp32 keeps the {built.graphs['fp32']} graph")
        variants: dict[Precision, Variant] = {}
        rejected: dict[str, str] = {}
        failures: list[str] = []
        for precision in options.variants:
            with progress.step(f"parity_{precision}", f"parity gate for {precision} on {len(items)} texts"):
                checks = _gate(precision, built.files[precision], tokenizer_file, spec, items, expected)
                for check in checks.values():
                    echo(f"[export]   {_summary(check)}")
            failed = [parity.describe_failure(precision, c) for c in checks.values() if not c.passed]
            failures.extend(failed)
            if failed and not options.keep_failing:
                rejected[precision] = "; ".join(failed)
                continue
            variants[precision] = _place_variant(precision, built, timings, checks, staging.path)
        if not variants:
            raise ParityFailure("no variant passed the parity gate: " + " | ".join(failures))
        shutil.rmtree(work)
        manifest = Manifest(
            model_name=options.model_name or checkpoint.root.name,
            source=Source(path=str(checkpoint.root), weights_sha256=weights_sha256(checkpoint.weights)),
            task=task,
            architecture=checkpoint.architecture,
            model_type=checkpoint.model_type,
            hidden_size=checkpoint.hidden_size,
            output_dim=int(expected.shape[1]),
            pooling=spec.pooling,
            normalize=spec.normalize,
            max_length=max_length,
            pad_token_id=pad_id,
            inputs=list(inputs),
            output_name=spec.output_name,
            variants=variants,
            export=ExportInfo(
                duration_s=round(time.perf_counter() - progress.started, 3),
                versions=_versions(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                steps=progress.steps,
                fused_ops=fused_ops,
                rejected=rejected,
            ),
        )
        manifest.write(staging.path)
        staging.commit()
    echo(f"[export] wrote {options.out} ({', '.join(variants)}) in {manifest.export.duration_s:.1f} s")
    return ExportResult(manifest=manifest, failures=failures)


def _resolve_max_length(checkpoint: Checkpoint, requested: int | None) -> int:
    if requested is None:
        return checkpoint.default_max_length
    if not 2 <= requested <= checkpoint.max_positions:
        raise ExportError(
            f"--max-length {requested} is out of range: {checkpoint.architecture} takes 2 to "
            f"{checkpoint.max_positions} tokens"
        )
    return requested


def _fuse(plain: Path, checkpoint: Checkpoint, out: Path, echo: Callable[[str], None]) -> dict[str, int]:
    try:
        return onnx_export.fuse(plain, checkpoint, out)
    except Exception as exc:  # NOTE: fusion is an optimisation; a graph it cannot handle ships plain
        echo(f"[export]   fusion failed ({type(exc).__name__}: {exc}); continuing with the plain graph")
        return {}


@dataclass
class _Built:
    """The variant files built so far, the graph each came from, and the fp32 candidates."""

    candidates: dict[str, Path]
    files: dict[Precision, Path]
    graphs: dict[Precision, GraphKind]
    notes: dict[Precision, str]

    def pick_fp32(self, timings: dict[str, dict[str, float]]) -> None:
        if "fused" not in self.candidates:
            self.files["fp32"], self.graphs["fp32"] = self.candidates["plain"], "plain"
            self.notes["fp32"] = "the fusion matched nothing, so the plain graph ships"
            return
        fused, plain = timings["fused"]["batched"], timings["plain"]["batched"]
        winner: GraphKind = "fused" if fused <= plain else "plain"
        self.files["fp32"], self.graphs["fp32"] = self.candidates[winner], winner
        self.notes["fp32"] = (
            f"{winner} graph kept: faster on length-sorted batches of {timing.BATCH} "
            f"({min(fused, plain):.3f} s vs {max(fused, plain):.3f} s)"
        )

    def timings_for(self, precision: Precision, timings: dict[str, dict[str, float]]) -> dict[str, float]:
        names = ["plain", "fused"] if precision == "fp32" else [precision]
        out: dict[str, float] = {}
        for name in names:
            if name in timings:
                out[name] = timings[name]["batched"]
                out[f"{name}_batch1"] = timings[name]["batch1"]
        return out


def _build_variants(
    requested: tuple[Precision, ...], plain: Path, fused: Path | None, work: Path, progress: Progress
) -> _Built:
    built = _Built(candidates={}, files={}, graphs={}, notes={})
    if "fp32" in requested:
        built.candidates["plain"] = plain
        if fused is not None:
            built.candidates["fused"] = fused
    if "fp16" in requested:
        with progress.step("fp16", "building the fp16 variant (fp32 inputs and outputs)"):
            built.files["fp16"] = work / "fp16.onnx"
            onnx_export.to_fp16(fused or plain, built.files["fp16"])
            built.graphs["fp16"] = "fused" if fused is not None else "plain"
            built.notes["fp16"] = (
                "for CUDA; inputs and outputs stay fp32 (keep_io_types); "
                "LayerNorm and softmax accumulate in fp32"
            )
    if "int8" in requested:
        with progress.step(
            "int8", "building the int8 variant (blockwise int8 weights, per-token activations)"
        ):
            built.files["int8"] = work / "int8.onnx"
            counts = int8.quantize_int8(plain, built.files["int8"])
            built.graphs["int8"] = "plain"
            quantized = ", ".join(f"{n} {op}" for op, n in counts.items())
            built.notes["int8"] = f"{int8.DESCRIPTION}; nodes: {quantized}"
            built.candidates["int8"] = built.files["int8"]
    return built


def _place_variant(
    precision: Precision,
    built: _Built,
    timings: dict[str, dict[str, float]],
    checks: dict[str, Parity],
    repo: Path,
) -> Variant:
    """Moves a gated variant into the repository and describes it for the manifest."""
    final = repo / f"model.{precision}.onnx"
    shutil.move(built.files[precision], final)
    cpu = checks[CPU]
    failed = not all(check.passed for check in checks.values())
    return Variant(
        file=final.name,
        precision=precision,
        size_bytes=final.stat().st_size,
        sha256=file_sha256(final),
        provider=PROVIDERS[precision],
        graph=built.graphs[precision],
        fused_ops=onnx_export.count_fused_ops(final),
        timings=built.timings_for(precision, timings),
        parity=cpu,
        parity_cuda=checks.get(CUDA),
        notes=built.notes[precision] + (" FAILED the parity gate; kept by --keep-failing." if failed else ""),
    )


def _gate(
    precision: Precision,
    path: Path,
    tokenizer: Path,
    spec: GraphSpec,
    items: list[Item],
    expected: FloatArray,
) -> dict[str, Parity]:
    """Parity on the CPU provider always; fp16 also on CUDA when this machine has it."""
    import onnxruntime as ort

    providers = [CPU]
    if precision == "fp16" and CUDA in ort.get_available_providers():
        providers.append(CUDA)
    return {
        provider: parity.check_variant(
            TextRunner.open(path, tokenizer, spec, provider), precision, items, expected
        )
        for provider in providers
    }


def _summary(check: Parity) -> str:
    accuracy = (
        f"min cosine {check.min_cosine:.6f}, mean {check.mean_cosine:.6f}"
        if check.min_cosine is not None and check.mean_cosine is not None
        else f"max abs logit diff {check.max_abs_diff:.3g}"
    )
    verdict = "passed" if check.passed else "FAILED"
    return f"{check.provider}: {accuracy}, batch invariance {check.batch_invariance:.3g} -> {verdict}"


def _versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
