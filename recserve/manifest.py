"""The model repository format: what `recserve export` writes and `recserve serve` reads.

A model repository is a directory holding `manifest.json`, one ONNX file per precision variant and the
tokenizer files (`tokenizer.json` configured to truncate at `max_length` and not to pad). This module is
the one place that knows its layout; it imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"

Task = Literal["embedding", "cross-encoder"]
Pooling = Literal["mean", "cls", "max"]
Precision = Literal["fp32", "fp16", "int8"]
VARIANT_NAMES: tuple[Precision, ...] = ("fp32", "fp16", "int8")


class ManifestError(ValueError):
    """The directory is not a usable model repository; the message says what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parity(_Strict):
    """How a variant compares with the PyTorch reference on the built-in parity texts."""

    texts: int
    # Embedding models: cosine similarity of each text's vector with the reference's.
    min_cosine: float | None = None
    mean_cosine: float | None = None
    # Cross-encoders: largest absolute difference of a logit.
    max_abs_diff: float | None = None
    # Largest absolute difference between a text run alone and inside a padded batch of 32.
    batch_invariance: float
    provider: str
    # min_cosine must reach it (embedding); max_abs_diff must stay within it (cross-encoder).
    threshold: float
    # batch_invariance must stay within it.
    batch_invariance_threshold: float | None = None
    passed: bool
    worst: list[dict[str, Any]] = Field(default_factory=list)


class Variant(_Strict):
    file: str
    precision: Precision
    size_bytes: int
    sha256: str
    # The ONNX Runtime execution provider this variant is meant for.
    provider: str
    # "fused" (ONNX Runtime transformer optimizer) or "plain" (the exporter's graph).
    graph: Literal["fused", "plain"]
    fused_ops: dict[str, int]
    # Seconds to run the timing workload, per graph considered (fp32 keeps the faster one).
    timings: dict[str, float] = Field(default_factory=dict)
    parity: Parity
    # fp16 is checked on the CPU provider everywhere and, where the exporting machine has one, on CUDA too.
    parity_cuda: Parity | None = None
    notes: str = ""


class Source(_Strict):
    path: str
    weights_sha256: str


class ExportInfo(_Strict):
    duration_s: float
    versions: dict[str, str]
    created_at: str
    steps: dict[str, float] = Field(default_factory=dict)
    # What ONNX Runtime's transformer fusion produced, whichever graph each variant then kept.
    fused_ops: dict[str, int] = Field(default_factory=dict)
    # Variants asked for but not written, with the reason (a failed parity gate, say).
    rejected: dict[str, str] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    model_name: str
    source: Source
    task: Task
    architecture: str
    model_type: str
    hidden_size: int
    # Vector dimension (embedding) or number of logits (cross-encoder).
    output_dim: int
    # Embedding models only; the server pools the encoder's token states (see export/onnx_export.py).
    pooling: Pooling | None
    normalize: bool
    max_length: int
    pad_token_id: int
    # ONNX graph input names, in the order the server feeds them.
    inputs: list[str]
    # "last_hidden_state" (embedding) or "logits" (cross-encoder).
    output_name: str
    tokenizer_file: str = TOKENIZER_FILE
    variants: dict[Precision, Variant]
    export: ExportInfo

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Reads and validates `directory/manifest.json`; ManifestError names what is wrong."""
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise ManifestError(f"model repository {directory} does not exist or is not a directory")
        if not path.is_file():
            raise ManifestError(f"{directory} is not a model repository: {MANIFEST_FILE} is missing")
        try:
            manifest = cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ManifestError(f"{path} is not a valid manifest: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format_version {manifest.format_version}; this server reads {FORMAT_VERSION}"
            )
        return manifest
