"""The model runtime: an ONNX Runtime session for the variant that fits the hardware, and tokenizer workers.

This is the only server module that imports onnxruntime; it knows nothing of gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from recserve.manifest import Manifest, Precision
from recserve.pooling import pool
from recserve.server.types import Encoded, FloatArray

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class RuntimeSelectionError(RuntimeError):
    """No variant of the repository can run with what this machine has."""


@dataclass(frozen=True)
class Selection:
    """Which variant runs on which provider, and why (shown by Info and logged at start)."""

    precision: Precision
    provider: str
    reason: str


def select_runtime(
    available_providers: Sequence[str],
    variants: Sequence[str],
    device: str = "auto",
    precision: str = "auto",
) -> Selection:
    """Chooses (variant, provider): fp16 on CUDA when a GPU build of ORT is present, fp32 on CPU otherwise.

    `device` and `precision` are the user's settings ("auto" or a name). An explicit request that cannot be
    met raises; an automatic choice falls back (CUDA -> CPU, fp16 -> fp32) and says so in `reason`.
    """
    has_cuda = CUDA in available_providers
    if device == "cuda" and not has_cuda:
        raise RuntimeSelectionError(
            "device=cuda was asked for but onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available_providers)}); install the gpu extra or use device=cpu"
        )
    use_cuda = has_cuda and device != "cpu"
    provider = CUDA if use_cuda else CPU
    notes = []
    if device == "auto" and not has_cuda:
        notes.append("no CUDAExecutionProvider in this onnxruntime build, using the CPU")

    if precision != "auto":
        if precision not in variants:
            raise RuntimeSelectionError(
                f"precision={precision} was asked for but the repository holds only: {', '.join(variants)}"
            )
        if precision == "fp16" and not use_cuda:
            notes.append("fp16 on the CPU provider runs, but slowly; fp32 is the CPU variant")
        return Selection(precision, provider, "; ".join(notes) or f"{precision} as asked")  # type: ignore[arg-type]

    preferred: list[Precision] = ["fp16", "fp32"] if use_cuda else ["fp32", "int8"]
    for candidate in preferred:
        if candidate in variants:
            if candidate != preferred[0]:
                notes.append(f"{preferred[0]} variant missing, using {candidate}")
            return Selection(
                candidate, provider, "; ".join(notes) or f"{candidate} is the {provider} default"
            )
    # Last resort: whatever exists, on the provider we have.
    if variants:
        fallback: Precision = variants[0]  # type: ignore[assignment]
        notes.append(f"no preferred variant present, using {fallback}")
        return Selection(fallback, provider, "; ".join(notes))
    raise RuntimeSelectionError("the repository lists no variants")


class ThreadShare:
    """Which session a batch runs on: the one with every thread when it runs alone, else a narrower one.

    On a CPU, one batch on all cores gives the lowest latency, but under load a single execution leaves
    cores idle: its threads wait for each other at every operator while the server's own Python work
    (gRPC, tokenising, pooling) preempts one of them. Splitting the cores between concurrent batches
    keeps every core busy instead. A lone batch on fewer threads would be slower, though, so a batch that
    starts when nothing else runs still gets every thread. BENCHMARKS.md compares the two.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self.started = {"alone": 0, "shared": 0}  # batches by how they started, for tests and debugging

    @contextlib.contextmanager
    def enter(self) -> Iterator[bool]:
        """Counts one running batch; yields True when no other batch was running as it started."""
        with self._lock:
            alone = self._running == 0
            self._running += 1
            self.started["alone" if alone else "shared"] += 1
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1


class OnnxBackend:
    """Runs padded batches through ORT and pools them; blocking, for `concurrent_batches` executor threads.

    On the CPU with `concurrent_batches` > 1 it holds two sessions of the same file: one with
    `intra_op_threads` for a batch that starts alone, and one with `intra_op_threads // concurrent_batches`
    for a batch that starts while others run (see ThreadShare). On CUDA the GPU does the work: one session.
    """

    def __init__(
        self,
        repo: Path,
        manifest: Manifest,
        selection: Selection,
        intra_op_threads: int,
        inter_op_threads: int = 1,
        concurrent_batches: int = 1,
    ) -> None:
        self.manifest = manifest
        self.selection = selection
        self.concurrent_batches = concurrent_batches
        model_file = str(repo / manifest.variants[selection.precision].file)
        providers: list[Any] = [selection.provider]
        if selection.provider == CUDA:
            providers = [(CUDA, {"device_id": 0}), CPU]
        self.session = self._open(model_file, providers, intra_op_threads, inter_op_threads)
        in_use = self.session.get_providers()[0]
        if in_use != selection.provider:
            # ORT silently falls back when the CUDA libraries fail to load; the server must say so.
            log.warning("provider fallback", extra={"asked": selection.provider, "got": in_use})
            self.selection = Selection(selection.precision, in_use, f"{selection.provider} failed to load")
        # Threads of a batch that starts alone, and of one that starts while others run.
        shared_threads = intra_op_threads
        if self.selection.provider == CPU:
            shared_threads = max(1, intra_op_threads // concurrent_batches)
        self.threads = (intra_op_threads, shared_threads)
        self._shared_session = self.session
        if shared_threads != intra_op_threads:
            self._shared_session = self._open(model_file, [CPU], shared_threads, inter_op_threads)
        self.share = ThreadShare()
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._use_io_binding = self.selection.provider == CUDA

    @staticmethod
    def _open(
        model_file: str, providers: list[Any], intra_op_threads: int, inter_op_threads: int
    ) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The exported graph is already fused offline; this level re-applies only what is cheap and safe.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # ORT's pool threads spin after a run in case another follows. Left on, one burns a core for tens of
        # milliseconds after every run, the core the loop and gRPC need to answer the call that just
        # finished (and CPU quota in a pod). Under load throughput measured the same either way (README).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(model_file, options, providers=providers)

    @property
    def provider(self) -> str:
        return self.selection.provider

    def _feeds(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        longest = max(item.length for item in batch)
        ids = np.full((len(batch), longest), self.manifest.pad_token_id, dtype=np.int64)
        types = np.zeros((len(batch), longest), dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, item in enumerate(batch):
            ids[row, : item.length] = item.ids
            types[row, : item.length] = item.type_ids
            mask[row, : item.length] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feeds[name] for name in self._input_names}

    def _run_session(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
        output = self.manifest.output_name
        if not self._use_io_binding:
            result: np.ndarray = session.run([output], feeds)[0]
            return result
        # CUDA: each input is copied to the device once, and the output is written straight into host
        # memory, instead of ORT staging both through extra buffers.
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(output, "cpu")
        session.run_with_iobinding(binding)
        copied: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return copied

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        """One row per item: the pooled (not normalised) vector, or the cross-encoder's logits."""
        feeds = self._feeds(batch)
        with self.share.enter() as alone:
            output = self._run_session(self.session if alone else self._shared_session, feeds)
        return self._finish(output, feeds)

    def warm_up(self, batch: Sequence[Encoded]) -> None:
        """Runs `batch` on the session of lone batches, and a single text also on the shared one.

        A session's first run pays its one-off start-up cost; later new shapes only grow its memory arena.
        The shared session, with a fraction of the threads, would take several times longer than the other
        over every size class, so it gets the cheap single-text batches only.
        """
        feeds = self._feeds(batch)
        self._run_session(self.session, feeds)
        if self._shared_session is not self.session and len(batch) == 1:
            self._run_session(self._shared_session, feeds)

    def _finish(self, output: np.ndarray, feeds: dict[str, np.ndarray]) -> FloatArray:
        if self.manifest.task == "cross-encoder":
            return np.ascontiguousarray(output, dtype=np.float32)
        assert self.manifest.pooling is not None
        return pool(output, feeds["attention_mask"], self.manifest.pooling)


def default_concurrent_batches(provider: str, intra_op_threads: int) -> int:
    """Two batches share the cores on a CPU with two or more threads (see ThreadShare); one on a GPU."""
    return 2 if provider == CPU and intra_op_threads >= 2 else 1


def load_backend(
    repo: Path,
    manifest: Manifest,
    device: str,
    precision: str,
    intra_op_threads: int,
    inter_op_threads: int,
    concurrent_batches: int | None = None,
) -> OnnxBackend:
    """Selects and opens the runtime; `concurrent_batches` None picks default_concurrent_batches."""
    selection = select_runtime(ort.get_available_providers(), list(manifest.variants), device, precision)
    if concurrent_batches is None:
        concurrent_batches = default_concurrent_batches(selection.provider, intra_op_threads)
    backend = OnnxBackend(repo, manifest, selection, intra_op_threads, inter_op_threads, concurrent_batches)
    log.info(
        "runtime selected",
        extra={
            "precision": backend.selection.precision,
            "provider": backend.selection.provider,
            "reason": backend.selection.reason,
            "concurrent_batches": concurrent_batches,
            "threads_alone_shared": list(backend.threads),
        },
    )
    return backend


def _to_encoded(encoding: Encoding) -> Encoded:
    return Encoded(
        ids=np.asarray(encoding.ids, dtype=np.int64),
        type_ids=np.asarray(encoding.type_ids, dtype=np.int64),
        truncated=bool(encoding.overflowing),
    )


class TokenizerPool:
    """Tokenises in worker threads, each with its own fast tokenizer (a shared one raises "Already borrowed").

    The repository's tokenizer.json already truncates at the model's max length and does not pad; padding
    is the batcher's job, to the longest text of each batch.
    """

    def __init__(self, tokenizer_file: Path, threads: int) -> None:
        self._file = tokenizer_file
        Tokenizer.from_file(str(tokenizer_file))  # fail at start-up, not on the first call
        self._local = threading.local()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    def _tokenizer(self) -> Tokenizer:
        tokenizer: Tokenizer | None = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(str(self._file))
            self._local.tokenizer = tokenizer
        return tokenizer

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Blocking; run it in `self.executor`."""
        return [_to_encoded(e) for e in self._tokenizer().encode_batch(list(texts))]

    def encode_pairs(self, query: str, candidates: Sequence[str]) -> list[Encoded]:
        """(query, candidate) pairs for a cross-encoder. Blocking; run it in `self.executor`."""
        pairs = [(query, candidate) for candidate in candidates]
        return [_to_encoded(e) for e in self._tokenizer().encode_batch(pairs)]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
