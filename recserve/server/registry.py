"""The models one server serves, by name: every RPC resolves its `model` field here, once.

Each served model has its own tokenizer threads, model threads, batcher and engine, so a slow reranker
never holds the embedder's batches: nothing of one model waits for another's. Under load at once, their
batches share the cores as the OS schedules threads (docs/serving.md#several-models says what that costs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from recserve import threads
from recserve.server.batcher import Batcher, BatcherConfig
from recserve.server.engine import Engine, Limits
from recserve.server.errors import NotFound
from recserve.server.metrics import ModelMetrics
from recserve.server.model import Model
from recserve.server.settings import ServerSettings
from recserve.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


def health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model, so a probe can check it alone."""
    return f"{SERVICE_NAME}/{model}"


@dataclass
class ServedModel:
    name: str
    model: Model
    engine: Engine
    metrics: ModelMetrics
    tokenize_executor: ThreadPoolExecutor
    model_executor: ThreadPoolExecutor
    # What Info answers for it; set once every model is known (it lists them all).
    info: pb.InfoResponse = field(default_factory=pb.InfoResponse)

    @property
    def batcher(self) -> Batcher:
        return self.engine.batcher

    @property
    def health_name(self) -> str:
        return health_name(self.name)

    def shutdown(self, wait_for_model: bool = True) -> None:
        """Ends its threads (after the batcher has stopped). Without `wait_for_model`, a batch still
        running (told to stop by Backend.stop_running) ends at its next operator on its own."""
        self.tokenize_executor.shutdown(wait=True, cancel_futures=True)
        self.model_executor.shutdown(wait=wait_for_model, cancel_futures=True)


def compose(
    name: str,
    model: Model,
    settings: ServerSettings,
    limits: Limits,
    metrics: ModelMetrics,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> ServedModel:
    """One model's serving parts, wired (not started): its tokenizer and model threads, its batcher
    (reporting into `metrics`) and the engine over them. The server and `recserve index` both serve a
    model through this."""
    backend = model.backend
    tokenize_executor = ThreadPoolExecutor(
        settings.tokenizer_threads,
        thread_name_prefix=f"tokenize-{name}",
        initializer=threads.name_thread,
        initargs=(threads.TOKENIZE,),
    )
    model_executor = ThreadPoolExecutor(
        backend.concurrent_batches,
        thread_name_prefix=f"model-{name}",
        initializer=threads.start_as,
        initargs=(threads.MODEL, settings.model_threads_nice),
    )
    if settings.model_threads_nice > 0:
        threads.lower_priority(threads.MODEL, settings.model_threads_nice)  # ORT's own pool threads
    batcher = Batcher(
        backend.run,
        BatcherConfig.from_settings(settings, backend.concurrent_batches),
        model_executor,
        observer=metrics,
        on_fatal=on_fatal,
    )
    engine = Engine(
        model.manifest,
        model.tokenizer,
        tokenize_executor,
        settings.tokenizer_threads,
        settings.inline_tokenize_chars,
        batcher,
        limits,
    )
    metrics.watch(backlog_seconds=lambda: batcher.stats.backlog_seconds, in_flight=lambda: engine.in_flight)
    return ServedModel(name, model, engine, metrics, tokenize_executor, model_executor)


class ServedModels:
    """The served models in the order given; the default one answers calls that name none."""

    def __init__(self, models: Sequence[ServedModel], default: str | None = None) -> None:
        if not models:
            raise ValueError("a server serves at least one model")
        self._by_name = {served.name: served for served in models}
        self.default = self._by_name[default] if default is not None else models[0]

    def get(self, name: str) -> ServedModel:
        """The model a call named ("" = the default); NotFound listing the served names otherwise."""
        if not name:
            return self.default
        served = self._by_name.get(name)
        if served is None:
            # NOTE: the caller's name is cut, so a hostile one cannot fill the message (and the log).
            raise NotFound(
                f"no model named {name[:100]!r} is served here; the models are: {', '.join(self.names)}"
            )
        return served

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
