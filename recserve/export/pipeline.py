"""The export, step by step: checkpoint -> reference -> ONNX -> tokenizer -> fusion -> variants -> gate.

Each step prints what it does and how long it took; the durations land in the manifest too.
"""

from __future__ import annotations

import ctypes
import gc
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
from recserve.export.checkpoint import Checkpoint, inspect_checkpoint, resolve_max_length, weights_sha256
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
        release_memory()
        self.steps[key] = round(time.perf_counter() - start, 3)
        self.echo(f"[export]   done in {self.steps[key]:.2f} s")


def release_memory() -> None:
    """Collects garbage and hands the freed heap back to the system.

    NOTE: each step builds and drops protobufs and arrays the size of the model (a base-size graph is
    440 MB, and fusion or the fp16 conversion hold two or three copies at once). glibc keeps much of such
    freed memory in its heap, so without malloc_trim what the fusion left behind stayed resident under
    the fp16 and int8 steps: a base-size export peaked at 5.2 GB, and 3.9 GB with the trim (before the
    fusion's own copies were cut, onnx_export._light_shapes).
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return
    libc.malloc_trim(0)


def export(options: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    """Runs the whole export; raises ExportError (bad input) or ParityFailure (nothing passed)."""
    progress = Progress(echo)
    with progress.step("inspect", f"inspecting checkpoint {options.model}"):
        checkpoint = inspect_checkpoint(options.model)
        task = options.task or checkpoint.default_task()
        max_length = resolve_max_length(checkpoint, options.max_length)
        _check_task(checkpoint, task, options.model)
        repository.check_target(options.out, options.force)
        echo(
            f"[export]   {checkpoint.architecture} ({checkpoint.layout} layout), task {task}, max length "
            f"{max_length}, pooling {checkpoint.pooling if task == 'embedding' else 'none'}, normalize "
            f"{checkpoint.normalize if task == 'embedding' else False}"
            + (f", labels {', '.join(checkpoint.labels)}" if task == "classifier" else "")
        )
    items: list[Item] = list(parity_pairs()) if task == "cross-encoder" else list(parity_texts())
    with repository.Staging(options.out) as staging:
        work = staging.path / ".work"
        work.mkdir()
        tokenizer_file = staging.path / TOKENIZER_FILE
        # First, so that a checkpoint without a usable fast tokenizer fails before torch loads the model.
        with progress.step("tokenizer", f"writing the tokenizer (truncation at {max_length}, no padding)"):
            pad_id = repository.save_tokenizer(checkpoint.model_dir, staging.path, max_length)
            from tokenizers import Tokenizer

            shipped_ids = [e.ids for e in Tokenizer.from_file(str(tokenizer_file)).encode_batch(items)]
        with progress.step("reference", f"running the PyTorch reference on {len(items)} parity texts"):
            expected, reference_ids = _reference(checkpoint, task, max_length, items)
            parity.check_tokens(shipped_ids, reference_ids, items)
        with progress.step("onnx_export", "exporting to ONNX with optimum (dynamic batch and sequence axes)"):
            plain, inputs, plain_ops = onnx_export.export_plain(checkpoint, task, work)
        warnings: list[str] = []
        with progress.step("fusion", "fusing the graph with ONNX Runtime's transformer optimizer"):
            fused: Path | None = work / "fused.onnx"
            fused_ops = _fuse(plain, checkpoint, work / "fused.onnx", echo)
            if not fused_ops:
                fused = None
            echo(f"[export]   fused operators: {fused_ops or 'none'}")
            unfused = onnx_export.attention_warning(checkpoint, fused_ops)
            if unfused:
                warnings.append(unfused)
                echo(f"[export]   warning: {unfused}")
        spec = GraphSpec(
            task=task,
            inputs=tuple(inputs),
            output_name=OUTPUT_NAMES[task],
            pooling=checkpoint.pooling if task == "embedding" else None,
            normalize=checkpoint.normalize if task == "embedding" else False,
            pad_token_id=pad_id,
        )
        built = _build_variants(options.variants, (plain, plain_ops), (fused, fused_ops), work, progress)
        runners = _Runners(tokenizer_file, spec)
        timings: dict[str, dict[str, float]] = {}
        if built.candidates:
            with progress.step(
                "timing", "timing the CPU graphs (fp32 fused vs plain, int8) on a sample of mixed lengths"
            ):
                encoders = {name: runners.get(name, path) for name, path in built.candidates.items()}
                timings = timing.time_graphs(encoders, items)
                del encoders
                for name, t in timings.items():
                    echo(
                        f"[export]   {name}: {t['batched']:.3f} s length-sorted batches, "
                        f"{t['batch1']:.3f} s batch 1"
                    )
        if "fp32" in options.variants:
            built.pick_fp32(timings)
            runners.rename(built.graphs["fp32"], "fp32")
            runners.close("plain", "fused")  # the losing graph's session
            echo(f"[export]   fp32 keeps the {built.graphs['fp32']} graph")
        variants: dict[Precision, Variant] = {}
        rejected: dict[str, str] = {}
        failures: list[str] = []
        for precision in options.variants:
            provider = _gate_provider(precision)
            what = f"parity gate for {precision} on {len(items)} texts, {provider}"
            if provider != PROVIDERS[precision]:
                what += f" (a smoke test: no {PROVIDERS[precision]} here)"
            with progress.step(f"parity_{precision}", what):
                runner = runners.get(precision, built.files[precision], provider)
                labelled = task == "classifier"
                check = parity.check_variant(runner, precision, items, expected, labelled=labelled)
                del runner
                runners.close(precision)
                echo(f"[export]   {_summary(check)}")
            if not check.passed:
                failures.append(parity.describe_failure(precision, check))
                if not options.keep_failing:
                    rejected[precision] = failures[-1]
                    continue
            variants[precision] = _place_variant(precision, built, timings, check, staging.path)
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
            labels=list(checkpoint.labels) if task == "classifier" else [],
            multi_label=checkpoint.multi_label if task == "classifier" else False,
            export=ExportInfo(
                duration_s=round(time.perf_counter() - progress.started, 3),
                versions=_versions(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                steps=progress.steps,
                fused_ops=fused_ops,
                optimizer_model_type=onnx_export.OPTIMIZER_MODEL_TYPES[checkpoint.model_type],
                warnings=warnings,
                rejected=rejected,
            ),
        )
        manifest.write(staging.path)
        staging.commit()
    echo(f"[export] wrote {options.out} ({', '.join(variants)}) in {manifest.export.duration_s:.1f} s")
    return ExportResult(manifest=manifest, failures=failures)


def _check_task(checkpoint: Checkpoint, task: Task, model: Path) -> None:
    if task != "embedding" and not checkpoint.is_classifier:
        raise ExportError(
            f"task {task} needs a *ForSequenceClassification checkpoint; {model} is {checkpoint.architecture}"
        )
    if task == "classifier" and len(checkpoint.labels) < 2:
        raise ExportError(
            f"task classifier needs two or more labels (id2label in config.json); {model} has "
            f"{len(checkpoint.labels)}: export it as a cross-encoder"
        )


def _reference(
    checkpoint: Checkpoint, task: Task, max_length: int, items: list[Item]
) -> tuple[FloatArray, list[list[int]]]:
    """The reference's outputs and token ids, computed once; the model is freed before the next step."""
    from recserve.export.reference import Reference

    reference = Reference(checkpoint, task, max_length)
    expected = reference.run(items)
    ids = reference.token_ids(items)
    del reference
    gc.collect()
    return expected, ids


class _Runners:
    """One ORT session per graph, opened once and shared by the timing and the gate, closed when done.

    NOTE: a base-size graph's session holds its weights plus an arena that grows to the largest batch it
    ran (about 0.5 to 1 GB each here), so every session is closed once its variant is gated; the export
    used to keep them all open to the end.
    """

    def __init__(self, tokenizer: Path, spec: GraphSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self._open: dict[str, TextRunner] = {}

    def get(self, name: str, path: Path, provider: str = CPU) -> TextRunner:
        runner = self._open.get(name)
        if runner is None or runner.provider != provider:
            runner = self._open[name] = TextRunner.open(path, self.tokenizer, self.spec, provider)
        return runner

    def rename(self, old: str, new: str) -> None:
        if old in self._open:
            self._open[new] = self._open.pop(old)

    def close(self, *names: str) -> None:
        for name in names:
            self._open.pop(name, None)
        gc.collect()


def _gate_provider(precision: Precision) -> str:
    """Where the gate runs a variant: where it is served (PROVIDERS) if this machine has it, else the CPU."""
    import onnxruntime as ort

    wanted = PROVIDERS[precision]
    return wanted if wanted in ort.get_available_providers() else CPU


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
    # Fused-operator counts of each file in `files` and `candidates`, by its key there.
    ops: dict[str, dict[str, int]] = field(default_factory=dict)

    def pick_fp32(self, timings: dict[str, dict[str, float]]) -> None:
        if "fused" not in self.candidates:
            self.files["fp32"], self.graphs["fp32"] = self.candidates["plain"], "plain"
            self.ops["fp32"] = self.ops.get("plain", {})
            self.notes["fp32"] = "the fusion matched nothing, so the plain graph ships"
            return
        fused, plain = timings["fused"]["batched"], timings["plain"]["batched"]
        winner: GraphKind = "fused" if fused <= plain else "plain"
        self.files["fp32"], self.graphs["fp32"] = self.candidates[winner], winner
        self.ops["fp32"] = self.ops.get(winner, {})
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
    requested: tuple[Precision, ...],
    plain_graph: tuple[Path, dict[str, int]],
    fused_graph: tuple[Path | None, dict[str, int]],
    work: Path,
    progress: Progress,
) -> _Built:
    """Builds the requested variants' files from the plain and (where fusion matched) the fused graph."""
    (plain, plain_ops), (fused, fused_ops) = plain_graph, fused_graph
    built = _Built(candidates={}, files={}, graphs={}, notes={}, ops={"plain": plain_ops, "fused": fused_ops})
    if "fp32" in requested:
        built.candidates["plain"] = plain
        if fused is not None:
            built.candidates["fused"] = fused
    if "fp16" in requested:
        with progress.step("fp16", "building the fp16 variant (fp32 inputs and outputs)"):
            built.files["fp16"] = work / "fp16.onnx"
            kept, built.ops["fp16"] = onnx_export.to_fp16(fused or plain, built.files["fp16"])
            built.graphs["fp16"] = "fused" if fused is not None else "plain"
            built.notes["fp16"] = (
                "for CUDA; inputs and outputs stay fp32 (keep_io_types); fp32: "
                f"{', '.join(onnx_export.FP16_BLOCKED_OPS)} nodes, the embedding sum and the last LayerNorm "
                f"with what follows it ({len(kept)} nodes by name); fused LayerNorm and attention "
                "kernels accumulate in fp32"
            )
    if "int8" in requested:
        with progress.step(
            "int8", "building the int8 variant (blockwise int8 weights, per-token activations)"
        ):
            built.files["int8"] = work / "int8.onnx"
            counts = int8.quantize_int8(plain, built.files["int8"])
            built.graphs["int8"] = "plain"
            built.ops["int8"] = plain_ops
            quantized = ", ".join(f"{n} {op}" for op, n in counts.items())
            built.notes["int8"] = f"{int8.DESCRIPTION}; nodes: {quantized}"
            built.candidates["int8"] = built.files["int8"]
    return built


def _place_variant(
    precision: Precision,
    built: _Built,
    timings: dict[str, dict[str, float]],
    check: Parity,
    repo: Path,
) -> Variant:
    """Moves a gated variant into the repository and describes it for the manifest."""
    final = repo / f"model.{precision}.onnx"
    shutil.move(built.files[precision], final)
    measured = check.provider == PROVIDERS[precision]
    notes = built.notes[precision]
    if not measured:
        notes += (
            f" Its parity on {PROVIDERS[precision]} is unmeasured: this machine has none, so the gate ran it "
            f"on {check.provider} as a smoke test."
        )
    if not check.passed:
        notes += " FAILED the parity gate; kept by --keep-failing."
    return Variant(
        file=final.name,
        precision=precision,
        size_bytes=final.stat().st_size,
        sha256=file_sha256(final),
        provider=PROVIDERS[precision],
        graph=built.graphs[precision],
        fused_ops=built.ops[precision],
        timings=built.timings_for(precision, timings),
        parity=check,
        parity_cuda=check if check.provider == CUDA else None,
        notes=notes,
        parity_measured=measured,
    )


def _summary(check: Parity) -> str:
    accuracy = (
        f"min cosine {check.min_cosine:.6f}, mean {check.mean_cosine:.6f}"
        if check.min_cosine is not None and check.mean_cosine is not None
        else f"max abs logit diff {check.max_abs_diff:.3g}"
    )
    if check.label_agreement is not None:
        accuracy += f", arg-max label agrees on {check.label_agreement:.1%} of the texts"
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
