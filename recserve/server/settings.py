"""Every server setting in one class: command-line flag, environment variable (RECSERVE_*), default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def _default_intra_op_threads() -> int:
    # ORT's intra-op pool should own the cores; tokenisation and gRPC take little beside it.
    return max(1, os.cpu_count() or 1)


class ServerSettings(BaseSettings):
    """Settings of `recserve serve`. Each field maps to `--flag-name` and `RECSERVE_FIELD_NAME`."""

    model_config = SettingsConfigDict(env_prefix="RECSERVE_", extra="forbid", frozen=True)

    model_repo: Path | None = Field(
        None,
        description="model repository directory written by `recserve export`, served under its directory's"
        " name; or use --model",
    )
    model: list[str] = Field(
        default_factory=list,
        description="NAME=DIR (or DIR, named after its directory): a model repository to serve; repeat the"
        " flag for several models, each with its own tokenizers and batcher",
    )
    catalog: list[str] = Field(
        default_factory=list,
        description="NAME=DIR (or DIR): an item catalog written by `recserve index` for Recommend and"
        " Score by id, memory-mapped; repeatable. It must have been built by one of the served models",
    )
    default_model: str | None = Field(
        None, description="the model a call that names none gets; unset = the first model"
    )
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 inside a container")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests)")
    metrics_port: int | None = Field(
        8000, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one; unset disables"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the /metrics endpoint binds, apart from --host so that 0.0.0.0 does not expose"
        " it; 0.0.0.0 (or the pod IP) for a Prometheus outside the pod",
    )
    metrics: bool = Field(True, description="serve Prometheus /metrics; --no-metrics turns the endpoint off")
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the gRPC port; with --tls-key-file turns TLS on; re-read when"
        " it changes or on SIGHUP",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key (unencrypted) of --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, only clients with a certificate it signed connect (mTLS)"
    )
    auth_token_file: Path | None = Field(
        None,
        description="file holding the bearer token every call but health and reflection must send; re-read"
        " when it changes",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="the bearer token itself; set it as RECSERVE_AUTH_TOKEN rather than as a flag (flags show"
        " in ps)",
    )
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="variant to load; auto = fp16 on CUDA, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="execution provider; auto = CUDA when onnxruntime-gpu sees a GPU"
    )
    intra_op_threads: int = Field(
        default_factory=_default_intra_op_threads,
        ge=1,
        description="ORT threads of a batch that runs alone (concurrent batches share them)",
    )
    inter_op_threads: int = Field(1, ge=1, description="ORT threads across graph branches (BERT has none)")
    tokenizer_threads: int = Field(2, ge=1, description="worker threads that tokenise, one tokenizer each")
    inline_tokenize_chars: int = Field(
        256,
        ge=0,
        description="a call whose texts have at most this many characters in all, arriving while the model"
        " is idle, is tokenised on the event loop (about 0.1 ms at 256) instead of in a tokeniser thread"
        " (a hop that costs a lone call about 0.4 ms); 0 = never",
    )
    model_threads_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="nice value of the model's threads (ORT's pool too): above 0, when the cores are busy,"
        " the event loop, gRPC and tokenising run first, so answers and refusals do not wait behind model"
        " runs; 0 = the same priority",
    )
    max_batch_size: int = Field(32, ge=1, description="texts per batch; 1 turns batching off")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per batch (longest x count)")
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="longest wait for batch mates after the first text; 0 = leave as soon as the model is"
        " free (under load, batches fill while the model runs)",
    )
    max_queue_texts: int = Field(4096, ge=1, description="queued texts before calls get RESOURCE_EXHAUSTED")
    max_queue_seconds: float = Field(
        5.0,
        gt=0,
        description="seconds of queued work a call may wait behind (queued tokens / measured rate); a call"
        " that would wait longer, or whose wait would take over half of what its deadline leaves after its"
        " own work, gets RESOURCE_EXHAUSTED at once",
    )
    window_texts: int = Field(
        64,
        ge=1,
        description="look-ahead window sorted by length before cutting; larger pads less but serves the"
        " queue further from arrival order, which admission by time assumes",
    )
    max_padding_ratio: float = Field(
        1.15, ge=1.0, description="padded/real tokens a batch may reach before a longer text starts the next"
    )
    min_wait_share: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="a text joins a batch only if it has waited this share of the wait of the batch's first"
        " text: the queue is served near arrival order (a closed loop's p99 near 1.4x its mean, not 2x) in"
        " smaller batches (a few % of throughput); 0 = by length only",
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        description="model executions in flight at once; unset = 2 on a CPU with 2+ threads (a batch that"
        " starts while another runs gets intra_op_threads / this many threads), 1 on a GPU",
    )
    max_texts_per_call: int = Field(2048, ge=1, description="texts in one Embed/Score call")
    max_text_bytes: int = Field(65536, ge=1, description="UTF-8 bytes of one text")
    max_message_bytes: int = Field(64 * MiB, ge=1024, description="gRPC message size, both directions")
    grace_period_s: float = Field(30.0, ge=0, description="time in-flight calls get to finish on SIGTERM")
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="a client connection is closed gracefully after this long, so clients re-resolve and"
        " spread onto replicas added since; 0 = never",
    )
    warmup: bool = Field(True, description="run a batch of each size class before reporting SERVING")
    skip_verify: bool = Field(
        False,
        description="do not check the served model file's sha256 against the manifest at start (trusted"
        " read-only volumes only; logs a warning)",
    )
    log_format: Literal["json", "text"] = Field("json", description="one line per event, JSON or key=value")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log threshold")

    @model_validator(mode="after")
    def _batcher_accepts_them(self) -> ServerSettings:
        # The batcher's own checks, run here so that a bad combination is a one-line setting error.
        from recserve.server.batcher import BatcherConfig

        BatcherConfig.from_settings(self)
        return self

    @model_validator(mode="after")
    def _models_are_named_once(self) -> ServerSettings:
        catalogs = [name for name, _ in self.catalogs()]
        if len(set(catalogs)) != len(catalogs):
            raise ValueError("a catalog name is given twice; name them apart (NAME=DIR)")
        names = [name for name, _ in self.served_models()]
        if not names:
            raise ValueError("name a model repository: --model-repo DIR or --model NAME=DIR")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"model name(s) given twice: {', '.join(repeated)}; name them apart (NAME=DIR)")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"--default-model {self.default_model!r} is not served: {', '.join(names)}")
        return self

    def served_models(self) -> list[tuple[str, Path]]:
        """(name, repository) of every model to serve, in the order given: --model-repo first."""
        given = [] if self.model_repo is None else [(self.model_repo.name, self.model_repo)]
        return given + [_named_path("--model", entry) for entry in self.model]

    def catalogs(self) -> list[tuple[str, Path]]:
        """(name, directory) of every catalog to load, in the order given."""
        return [_named_path("--catalog", entry) for entry in self.catalog]

    @model_validator(mode="after")
    def _security_is_whole(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both --tls-cert-file and --tls-key-file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
        if self.auth_token_file is not None and self.auth_token is not None:
            raise ValueError("set one of --auth-token-file and RECSERVE_AUTH_TOKEN, not both")
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("RECSERVE_AUTH_TOKEN is empty")
        return self


def _named_path(flag: str, entry: str) -> tuple[str, Path]:
    """NAME=DIR, or DIR named after its last part."""
    name, sep, where = entry.partition("=")
    if not sep:
        name, where = Path(entry).name, entry
    if not name or not where:
        raise ValueError(f"{flag} {entry!r}: use NAME=DIR or DIR")
    return name, Path(where)
