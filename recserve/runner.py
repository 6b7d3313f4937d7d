"""One ONNX Runtime session and the one way a batch goes through it: pad -> run -> pool (recserve.tensors).

The server's runtime, the export's parity gate and timing, and the tests all run graphs through `Runner`,
and texts through `TextRunner`, so the gate tests the code that serves.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from recserve import tensors, threads
from recserve.manifest import Manifest, Pooling, Precision, Task
from recserve.tensors import Encoded, Feeds, FloatArray, IntArray, Item

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class GraphSpec:
    """The manifest fields that decide how a graph is fed and how its output becomes a result."""

    task: Task
    inputs: tuple[str, ...]
    output_name: str
    pooling: Pooling | None
    normalize: bool
    pad_token_id: int

    @classmethod
    def of(cls, manifest: Manifest) -> GraphSpec:
        return cls(
            task=manifest.task,
            inputs=tuple(manifest.inputs),
            output_name=manifest.output_name,
            pooling=manifest.pooling,
            normalize=manifest.normalize,
            pad_token_id=manifest.pad_token_id,
        )


# NOTE: one CPU memory arena for every session of the process (ORT's environment allocator), instead of
# one per session. On a CPU a model has two sessions (runtime.ThreadShare), and each grew an arena of its
# own to the biggest batches it had run: bursts of mixed-length calls took the server from about 640 MiB
# idle to 1,000 (1.4x to 1.6x). Sharing one, a batch on either session reuses what the other freed: 1.1x
# to 1.2x, at the same throughput. Growth stays ORT's default (kNextPowerOfTwo): kSameAsRequested started
# higher and ended higher after the same bursts. docs/decisions/0007 has the evidence.
_ARENA_EXTEND_NEXT_POWER_OF_TWO = 0
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def register_shared_cpu_arena() -> None:
    """Registers the process's shared CPU arena with ORT's environment, once; sessions opt in by config."""
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # Registering again would replace it: sessions opened after that would not share with earlier ones.
        ort.create_and_register_allocator(
            memory, ort.OrtArenaCfg({"arena_extend_strategy": _ARENA_EXTEND_NEXT_POWER_OF_TWO})
        )
        _shared_arena_registered = True


def open_session(
    model_file: Path | str,
    provider: str = CPU,
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    log_severity_level: int = 2,
) -> ort.InferenceSession:
    """An ORT session with the server's options; `intra_op_threads` 0 lets ORT pick (one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The exported graph is already fused offline; this level re-applies only what is cheap and safe.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # ORT's pool threads spin after a run in case another follows. Left on, one burns a core for tens of
    # milliseconds after every run, the core the loop and gRPC need to answer the call that just finished
    # (and CPU quota in a pod); docs/decisions/0003 has the evidence.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # 3 silences the warning per inserted cast that an fp16 graph logs on the CPU provider.
    options.log_severity_level = log_severity_level
    if provider == CPU:
        # The process's one CPU arena (above). On CUDA a model has one session and the arena that grows is
        # the GPU's, which this does not touch.
        register_shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    providers: list[Any] = [(CUDA, {"device_id": 0}), CPU] if provider == CUDA else [provider]
    # ORT's pool threads start here and inherit this thread's name: they count as the model's.
    with threads.named(threads.MODEL):
        return ort.InferenceSession(str(model_file), options, providers=providers)


class Runner:
    """Runs padded batches of Encoded through one session: pooled vectors (not normalised) or logits."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec) -> None:
        self.session = session
        self.spec = spec
        self.provider: str = session.get_providers()[0]
        self._io_binding = self.provider == CUDA
        # The options of the runs in progress, so that terminate() can stop them (one per calling thread).
        self._running: set[ort.RunOptions] = set()
        self._lock = threading.Lock()

    def feeds(self, batch: Sequence[Encoded]) -> tuple[Feeds, IntArray]:
        return tensors.pad(batch, self.spec.pad_token_id, self.spec.inputs)

    def run_feeds(self, feeds: Feeds) -> np.ndarray:
        """The graph's raw output for `feeds`, blocking; raises if terminate() stops it."""
        output = self.spec.output_name
        options = ort.RunOptions()
        with self._lock:
            self._running.add(options)
        try:
            if not self._io_binding:
                result: np.ndarray = self.session.run([output], feeds, options)[0]
                return result
            # CUDA: each input is copied to the device once, and the output is written straight into host
            # memory, instead of ORT staging both through extra buffers.
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(output, "cpu")
            self.session.run_with_iobinding(binding, options)
            copied: np.ndarray = binding.copy_outputs_to_cpu()[0]
            return copied
        finally:
            with self._lock:
                self._running.discard(options)

    def terminate(self) -> None:
        """Stops the runs in progress at their next operator (they raise); later runs are not affected.

        For a shutdown whose grace period is over: a long batch on a CPU can take seconds, and nobody is
        waiting for its answer any more.
        """
        with self._lock:
            for options in self._running:
                options.terminate = True

    def finish(self, output: np.ndarray, mask: IntArray) -> FloatArray:
        """Raw output -> one row per item: the pooled vector (embedding) or the logits (cross-encoder,
        classifier)."""
        if self.spec.task != "embedding":
            return np.ascontiguousarray(output, dtype=np.float32)
        assert self.spec.pooling is not None
        return tensors.pool(output, mask, self.spec.pooling)

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        feeds, mask = self.feeds(batch)
        return self.finish(self.run_feeds(feeds), mask)


def encode(tokenizer: Tokenizer, items: Sequence[Item]) -> list[Encoded]:
    """Texts (or (query, candidate) pairs) through a repository's tokenizer.json, unpadded."""
    # _fast: without the character offsets, which nothing here reads (about 15% less CPU).
    return [tensors.encoded(e) for e in tokenizer.encode_batch_fast(list(items))]


class TextRunner:
    """Texts in, results out, as a served call computes them: tokenise, pad, run, pool, normalise.

    Outside the server (parity gate, timing, tests, benchmarks), one batch at a time on one session.
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer) -> None:
        self.runner = runner
        self.tokenizer = tokenizer

    @classmethod
    def open(
        cls,
        model_file: Path,
        tokenizer_file: Path,
        spec: GraphSpec,
        provider: str = CPU,
        intra_op_threads: int = 0,
    ) -> TextRunner:
        session = open_session(model_file, provider, intra_op_threads, log_severity_level=3)
        return cls(Runner(session, spec), Tokenizer.from_file(str(tokenizer_file)))

    @classmethod
    def of_repository(
        cls, repo: Path, precision: Precision = "fp32", intra_op_threads: int = 0
    ) -> TextRunner:
        manifest = Manifest.load(repo)
        return cls.open(
            repo / manifest.variants[precision].file,
            repo / manifest.tokenizer_file,
            GraphSpec.of(manifest),
            intra_op_threads=intra_op_threads,
        )

    @property
    def spec(self) -> GraphSpec:
        return self.runner.spec

    @property
    def provider(self) -> str:
        return self.runner.provider

    def encode(self, items: Sequence[Item]) -> list[Encoded]:
        return encode(self.tokenizer, items)

    def __call__(self, items: Sequence[Item], batch_size: int | None = None) -> FloatArray:
        """[len(items), dim] vectors (pooled, normalised if the model is) or logits, in batches."""
        step = batch_size or max(1, len(items))
        rows = [self.infer(self.encode(items[i : i + step])) for i in range(0, len(items), step)]
        return np.concatenate(rows)

    def infer(self, batch: Sequence[Encoded]) -> FloatArray:
        """One already tokenised batch: run, pool and (for a normalising embedding model) normalise."""
        rows = self.runner.run(batch)
        if self.spec.task == "embedding" and self.spec.normalize:
            return tensors.l2_normalize(rows)
        return rows
