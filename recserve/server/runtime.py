"""The real model behind the seam (server/model.py): ORT sessions for the variant that fits the hardware, and
the repository's fast tokenizer, one per worker thread.

This is the only server module that imports onnxruntime; it knows nothing of gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from recserve.manifest import Manifest, ManifestError, Precision, parity_warning, verify_variant
from recserve.runner import CPU, CUDA, GraphSpec, Runner, encode, open_session
from recserve.server.model import Model
from recserve.server.settings import ServerSettings
from recserve.tensors import Encoded, FloatArray

log = logging.getLogger(__name__)


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


# How long after two batches last overlapped a batch that starts alone still counts as under load.
OVERLAP_HOLD_S = 0.1


class ThreadShare:
    """Which session a batch runs on: the one with every thread when the model is idle, else a narrower one.

    On a CPU, one batch on all cores gives the lowest latency, but under load a single execution leaves
    cores idle: its threads wait for each other at every operator while the server's own Python work
    (gRPC, tokenising, pooling) preempts one of them. Splitting the cores between concurrent batches
    keeps every core busy instead. A lone batch on fewer threads would be slower, though, so a batch that
    starts when nothing else runs gets every thread, unless batches overlapped within the last `hold_s`:
    then load is on, and a wide batch would share the cores with the narrow ones that start beside it
    (three threads on two cores, the wide batch's pair stalling at every operator). docs/decisions/0001
    has the evidence.
    """

    def __init__(self, hold_s: float = OVERLAP_HOLD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._hold_s = hold_s
        self._clock = clock
        self._overlapped = -math.inf  # when a batch last started beside another

    @contextlib.contextmanager
    def enter(self) -> Iterator[bool]:
        """Counts one running batch; yields True when it may take every thread (see the class)."""
        with self._lock:
            now = self._clock()
            if self._running:
                self._overlapped = now
            alone = self._running == 0 and now - self._overlapped > self._hold_s
            self._running += 1
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1


class OnnxBackend:
    """The Backend of a model repository: padded batches through ORT, pooled (server/model.py's contract).

    On the CPU with `concurrent_batches` > 1 it holds two sessions of the same file: one with
    `intra_op_threads` for a batch that starts into an idle model, and one with
    `intra_op_threads // concurrent_batches` for any other (see ThreadShare). On CUDA the GPU does the
    work: one session.
    """

    def __init__(
        self,
        repo: Path,
        manifest: Manifest,
        selection: Selection,
        intra_op_threads: int,
        inter_op_threads: int = 1,
        concurrent_batches: int = 1,
        verified_sha256: str | None = None,
    ) -> None:
        self.selection = selection
        self._concurrent_batches = concurrent_batches
        self._verified_sha256 = verified_sha256
        spec = GraphSpec.of(manifest)
        model_file = repo / manifest.variants[selection.precision].file
        self.alone = Runner(
            open_model_file(model_file, selection.provider, intra_op_threads, inter_op_threads), spec
        )
        if self.alone.provider != selection.provider:
            # ORT silently falls back when the CUDA libraries fail to load; the server must say so.
            log.warning("provider fallback", extra={"asked": selection.provider, "got": self.alone.provider})
            self.selection = Selection(
                selection.precision, self.alone.provider, f"{selection.provider} failed to load"
            )
        # Threads of a batch that starts into an idle model, and of any other.
        shared_threads = intra_op_threads
        if self.provider == CPU:
            shared_threads = max(1, intra_op_threads // concurrent_batches)
        self.threads = (intra_op_threads, shared_threads)
        self.shared = self.alone
        if shared_threads != intra_op_threads:
            self.shared = Runner(open_model_file(model_file, CPU, shared_threads, inter_op_threads), spec)
        self._share = ThreadShare()

    @property
    def verified_sha256(self) -> str | None:
        """The sha256 computed from the served file and found equal to the manifest's; None if skipped."""
        return self._verified_sha256

    @property
    def precision(self) -> Precision:
        return self.selection.precision

    @property
    def provider(self) -> str:
        return self.selection.provider

    @property
    def concurrent_batches(self) -> int:
        return self._concurrent_batches

    def run(self, batch: Sequence[Encoded]) -> FloatArray:
        """One row per item: the pooled (not normalised) vector, or the cross-encoder's logits."""
        with self._share.enter() as alone:
            return (self.alone if alone else self.shared).run(batch)

    def stop_running(self) -> None:
        self.alone.terminate()
        self.shared.terminate()

    def warm_up(self, batch: Sequence[Encoded]) -> None:
        """Runs `batch` on the session of lone batches, and a single text also on the shared one.

        A session's first run pays its one-off start-up cost; later new shapes only grow its memory arena.
        The shared session, with a fraction of the threads, would take several times longer than the other
        over every size class, so it gets the cheap single-text batches only.
        """
        self.alone.run(batch)
        if self.shared is not self.alone and len(batch) == 1:
            self.shared.run(batch)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def open_model_file(
    model_file: Path, provider: str, intra_op_threads: int, inter_op_threads: int = 1
) -> ort.InferenceSession:
    """open_session, with a file ORT cannot load (garbage, truncated) as a one-line ManifestError."""
    try:
        return open_session(model_file, provider, intra_op_threads, inter_op_threads)
    except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...), not OSError
        raise ManifestError(f"model file {model_file} cannot be loaded: {_first_line(exc)}") from None


def verify_served_variant(
    repo: Path, manifest: Manifest, precision: Precision, verify: bool = True
) -> str | None:
    """Checks the served variant's file against its manifest sha256; returns the hash, or None if skipped.

    Only the variant that will be opened is read: its bytes are what answers calls, and hashing the others
    too would multiply the start-up cost (docs/serving.md#verified-repository) for files never loaded.
    """
    variant = manifest.variants[precision]
    if not verify:
        log.warning(
            "model file not verified (skip_verify): its sha256 is not checked against the manifest",
            extra={"file": str(repo / variant.file)},
        )
        return None
    started = time.perf_counter()
    sha256 = verify_variant(repo, variant)
    log.info(
        "model file verified",
        extra={
            "file": str(repo / variant.file),
            "sha256": sha256,
            "size_bytes": variant.size_bytes,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return sha256


def default_concurrent_batches(provider: str, intra_op_threads: int) -> int:
    """Two batches share the cores on a CPU with two or more threads (see ThreadShare); one on a GPU."""
    return 2 if provider == CPU and intra_op_threads >= 2 else 1


def load_backend(
    repo: Path,
    manifest: Manifest,
    device: str,
    precision: str,
    intra_op_threads: int,
    inter_op_threads: int = 1,
    concurrent_batches: int | None = None,
    verify: bool = True,
) -> OnnxBackend:
    """Selects, verifies (unless `verify` is False) and opens the runtime.

    `concurrent_batches` None picks default_concurrent_batches. A variant file whose sha256 differs from
    the manifest's, or that ORT cannot load, raises ManifestError before any session runs.
    """
    selection = select_runtime(ort.get_available_providers(), list(manifest.variants), device, precision)
    if concurrent_batches is None:
        concurrent_batches = default_concurrent_batches(selection.provider, intra_op_threads)
    sha256 = verify_served_variant(repo, manifest, selection.precision, verify)
    backend = OnnxBackend(
        repo, manifest, selection, intra_op_threads, inter_op_threads, concurrent_batches, sha256
    )
    log.info(
        "runtime selected",
        extra={
            "precision": backend.precision,
            "provider": backend.provider,
            "reason": backend.selection.reason,
            "concurrent_batches": concurrent_batches,
            "threads_alone_shared": list(backend.threads),
        },
    )
    unmeasured = parity_warning(manifest, backend.selection.precision, backend.provider)
    if unmeasured is not None:
        # e.g. fp16 exported without a GPU: only smoke-tested on the CPU; served on CUDA it is ungated.
        log.warning("parity unmeasured", extra={"model": manifest.model_name, "detail": unmeasured})
    return backend


class FastTokenizer:
    """The Tokenizer of a model repository: its tokenizer.json, one instance per calling thread.

    A shared fast tokenizer raises "Already borrowed" when two threads use it at once. The repository's
    tokenizer.json already truncates at the model's max length and does not pad; padding is the batch's
    job, to the longest text of each batch.
    """

    def __init__(self, tokenizer_file: Path) -> None:
        self._file = tokenizer_file
        try:
            Tokenizer.from_file(str(tokenizer_file))  # fail at start-up, not on the first call
        except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
            raise ManifestError(
                f"tokenizer file {tokenizer_file} cannot be loaded: {_first_line(exc)}"
            ) from None
        self._local = threading.local()

    def _tokenizer(self) -> Tokenizer:
        tokenizer: Tokenizer | None = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(str(self._file))
            self._local.tokenizer = tokenizer
        return tokenizer

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return encode(self._tokenizer(), texts)

    def encode_pairs(self, query: str, candidates: Sequence[str]) -> list[Encoded]:
        return encode(self._tokenizer(), [(query, candidate) for candidate in candidates])


def load_model(settings: ServerSettings, repo: Path | None = None) -> Model:
    """The repository `repo` (default: the first one `settings` serves) with the runtime its settings and
    this machine choose."""
    if repo is None:
        repo = settings.served_models()[0][1]
    manifest = Manifest.load(repo)
    backend = load_backend(
        repo,
        manifest,
        settings.device,
        settings.precision,
        settings.intra_op_threads,
        settings.inter_op_threads,
        settings.max_concurrent_batches,
        verify=not settings.skip_verify,
    )
    return Model(manifest, FastTokenizer(repo / manifest.tokenizer_file), backend)
