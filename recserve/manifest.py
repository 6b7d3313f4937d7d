"""The model repository format: what `recserve export` writes and `recserve serve` reads.

A model repository is a directory holding `manifest.json`, one ONNX file per precision variant and the
tokenizer files (`tokenizer.json` configured to truncate at `max_length` and not to pad). This module is
the one place that knows its layout and what a valid one is; it imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"

Task = Literal["embedding", "cross-encoder", "classifier"]
Pooling = Literal["mean", "cls", "max"]
Precision = Literal["fp32", "fp16", "int8"]
VARIANT_NAMES: tuple[Precision, ...] = ("fp32", "fp16", "int8")
# The ONNX graph inputs the server knows how to feed (recserve.tensors.pad), and the output of each task.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
REQUIRED_INPUTS = ("input_ids", "attention_mask")
OUTPUT_NAMES: dict[Task, str] = {
    "embedding": "last_hidden_state",
    "cross-encoder": "logits",
    "classifier": "logits",
}


class ManifestError(ValueError):
    """The directory is not a usable model repository; the message says what is wrong."""


def _sha256_hex(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be a sha256: 64 lowercase hex digits")
    return value


def _relative_path(value: str) -> str:
    # NOTE: only the spelling is checked here; Manifest.load also resolves it (symlinks followed) against
    # the repository directory, which a pydantic validator does not know.
    pure = PurePosixPath(value)
    if (
        not pure.parts
        or "\\" in value
        or "\x00" in value
        or pure.is_absolute()
        or PureWindowsPath(value).drive
        or ".." in pure.parts
    ):
        raise ValueError("must be a relative path inside the repository (no leading /, no .., no backslash)")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256_hex)]
RelativePath = Annotated[str, AfterValidator(_relative_path)]
Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parity(_Strict):
    """How a variant compares with the PyTorch reference on the built-in parity texts.

    NOTE: the measured figures may be NaN here, so that the export's gate can reject a variant whose
    outputs are NaN instead of failing to describe it; Manifest.load refuses them in a served repository.
    """

    texts: int = Field(ge=1)
    # Embedding models: cosine similarity of each text's vector with the reference's.
    min_cosine: float | None = None
    mean_cosine: float | None = None
    # Cross-encoders and classifiers: largest absolute difference of a logit.
    max_abs_diff: float | None = None
    # Classifiers: the share of texts whose arg-max label is the reference's (the gate needs 1.0).
    label_agreement: float | None = None
    # Largest absolute difference between a text run alone and inside a length-sorted batch of up to 32
    # texts padded to at least twice the longest of them (older exports: a batch of 32 padded to the
    # longest parity text).
    batch_invariance: float
    provider: str = Field(min_length=1)
    # min_cosine must reach it (embedding); max_abs_diff must stay within it (cross-encoder, classifier).
    threshold: Finite
    # mean_cosine must reach it, where the precision has a bar on the mean too (fp16).
    mean_threshold: Finite | None = None
    # batch_invariance must stay within it.
    batch_invariance_threshold: Finite | None = None
    passed: bool
    worst: list[dict[str, Any]] = Field(default_factory=list)

    def measured(self) -> dict[str, float]:
        """The figures measured by the gate (not the limits), by field name."""
        figures = {
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "max_abs_diff": self.max_abs_diff,
            "label_agreement": self.label_agreement,
            "batch_invariance": self.batch_invariance,
        }
        return {name: value for name, value in figures.items() if value is not None}


class Variant(_Strict):
    file: RelativePath
    precision: Precision
    size_bytes: Count
    sha256: Sha256
    # The ONNX Runtime execution provider this variant is meant for.
    provider: str = Field(min_length=1)
    # "fused" (ONNX Runtime transformer optimizer) or "plain" (the exporter's graph).
    graph: Literal["fused", "plain"]
    fused_ops: dict[str, Count]
    # Seconds to run the timing workload, per graph considered (fp32 keeps the faster one).
    timings: dict[str, NonNegative] = Field(default_factory=dict)
    # The check that gated the variant, on `provider` where the exporting machine has it, else on the CPU
    # (`parity.provider` says which).
    parity: Parity
    # The check on CUDA, where the exporting machine has a GPU (for fp16 the same as `parity`).
    parity_cuda: Parity | None = None
    notes: str = ""
    # True: `parity` was measured on `provider`, where the variant is served. False: only a smoke test on
    # another provider (fp16 exported without a GPU: its parity on CUDA is unmeasured; the server warns
    # at start, see parity_warning). None: exported before this was recorded.
    parity_measured: bool | None = None


class Source(_Strict):
    path: str
    weights_sha256: Sha256


class ExportInfo(_Strict):
    duration_s: NonNegative
    versions: dict[str, str]
    created_at: str
    steps: dict[str, NonNegative] = Field(default_factory=dict)
    # What ONNX Runtime's transformer fusion produced, whichever graph each variant then kept.
    fused_ops: dict[str, Count] = Field(default_factory=dict)
    # The ONNX Runtime optimizer model type the fusion ran with ("bert" covers every supported family);
    # None where no fusion ran.
    optimizer_model_type: str | None = None
    # What the export could not do as usual but did not fail for (attention left unfused, and why).
    warnings: list[str] = Field(default_factory=list)
    # Variants asked for but not written, with the reason (a failed parity gate, say).
    rejected: dict[str, str] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    model_name: str = Field(min_length=1)
    source: Source
    task: Task
    architecture: str
    model_type: str
    hidden_size: int = Field(ge=1)
    # Vector dimension (embedding) or number of logits (cross-encoder).
    output_dim: int = Field(ge=1)
    # Embedding models only; the server pools the encoder's token states (see export/onnx_export.py).
    pooling: Pooling | None
    normalize: bool
    # At least [CLS] and [SEP].
    max_length: int = Field(ge=2)
    pad_token_id: int = Field(ge=0)
    # ONNX graph input names, in the order the server feeds them.
    inputs: list[str] = Field(min_length=1)
    # "last_hidden_state" (embedding) or "logits" (cross-encoder).
    output_name: str
    tokenizer_file: RelativePath = TOKENIZER_FILE
    variants: dict[Precision, Variant]
    export: ExportInfo
    # A classifier's labels in the order of its logits (from the checkpoint's id2label); empty otherwise.
    labels: list[str] = Field(default_factory=list)
    # A classifier whose labels are independent (problem_type multi_label_classification): sigmoid, not
    # softmax.
    multi_label: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        unknown = [name for name in self.inputs if name not in INPUT_NAMES]
        missing = [name for name in REQUIRED_INPUTS if name not in self.inputs]
        if unknown or missing or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(
                f"inputs {self.inputs}: each must be one of {', '.join(INPUT_NAMES)}, named once, and "
                f"{' and '.join(REQUIRED_INPUTS)} are required"
            )
        if self.output_name != OUTPUT_NAMES[self.task]:
            raise ValueError(
                f"output_name {self.output_name!r} must be {OUTPUT_NAMES[self.task]!r} for task {self.task}"
            )
        if (self.pooling is None) != (self.task != "embedding"):
            raise ValueError(
                f"pooling {self.pooling!r}: an embedding model needs one, a cross-encoder or classifier none"
            )
        if self.task == "classifier" and len(self.labels) != self.output_dim:
            raise ValueError(
                f"a classifier needs one label per logit: {len(self.labels)} for {self.output_dim}"
            )
        for key, variant in self.variants.items():
            if variant.precision != key:
                raise ValueError(f"variants.{key}.precision is {variant.precision!r}; it must be {key!r}")
        return self

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Reads and validates `directory/manifest.json`; ManifestError names what is wrong, in one line.

        Beyond the schema: every path in it stays inside `directory` once resolved (symlinks followed),
        and the parity figures are finite numbers.
        """
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise ManifestError(f"model repository {directory} does not exist or is not a directory")
        if not path.is_file():
            raise ManifestError(f"{directory} is not a model repository: {MANIFEST_FILE} is missing")
        try:
            manifest = cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ManifestError(f"{path} is not a valid manifest: {describe_error(exc)}") from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path} cannot be read: {exc}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format_version {manifest.format_version}; this server reads {FORMAT_VERSION}"
            )
        for field, relative in manifest.paths().items():
            _check_inside(directory, field, relative, path)
        for key, variant in manifest.variants.items():
            for name, parity in (("parity", variant.parity), ("parity_cuda", variant.parity_cuda)):
                for figure, value in (parity.measured() if parity else {}).items():
                    if not math.isfinite(value):
                        raise ManifestError(
                            f"{path} is not a valid manifest: variants.{key}.{name}.{figure}: "
                            f"must be a finite number (got {value})"
                        )
        return manifest

    def paths(self) -> dict[str, str]:
        """Every file the manifest names, relative to the repository, by the field that names it."""
        named = {"tokenizer_file": self.tokenizer_file}
        named.update({f"variants.{key}.file": variant.file for key, variant in self.variants.items()})
        return named


def _check_inside(directory: Path, field: str, relative: str, manifest_path: Path) -> None:
    try:
        root = directory.resolve(strict=True)
        target = (directory / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ManifestError(f"{manifest_path}: {field} {relative!r} cannot be resolved: {exc}") from None
    if not target.is_relative_to(root):
        raise ManifestError(
            f"{manifest_path}: {field} {relative!r} resolves to {target}, outside the repository {root}; "
            "every file must lie inside the repository"
        )


def describe_error(exc: ValidationError) -> str:
    """The first error of `exc` in one line: which field, what it should be, and the value it got."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "manifest"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        text = f"{where}: missing (required)"
    elif first["type"] == "json_invalid":
        text = f"not valid JSON: {message}"
    elif first["loc"]:
        shown = repr(first["input"])
        text = f"{where}: {message} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    else:
        text = message
    more = len(errors) - 1
    return text + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as the manifest records it (lowercase hex)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_variant(directory: Path, variant: Variant) -> str:
    """Checks a variant's file against the manifest (size, then sha256); returns the hash it computed.

    ManifestError names the file, what the manifest says and what the file holds.
    """
    path = directory / variant.file
    try:
        size = path.stat().st_size
        if size != variant.size_bytes:
            raise ManifestError(
                f"model file {path} has {size} bytes but the manifest says {variant.size_bytes}: "
                "it is truncated or was replaced; re-export the repository"
            )
        actual = file_sha256(path)
    except OSError as exc:
        raise ManifestError(f"model file {path} cannot be read: {exc.strerror or exc}") from None
    if actual != variant.sha256:
        raise ManifestError(
            f"model file {path} does not match the manifest: sha256 {actual[:12]}..., expected "
            f"{variant.sha256[:12]}...; the file is corrupt or was replaced: re-export the repository"
        )
    return actual


def parity_warning(manifest: Manifest, precision: Precision, provider: str) -> str | None:
    """One line for the server to log at start when the variant it serves was never gated on `provider`.

    The common case: fp16 exported on a machine without a GPU was only smoke-tested on the CPU, so its
    parity on CUDA, where it runs, is unmeasured. None when the gate measured it where it runs.
    """
    variant = manifest.variants[precision]
    checks = [check for check in (variant.parity, variant.parity_cuda) if check is not None]
    if any(check.provider == provider for check in checks):
        return None
    where = ", ".join(sorted({check.provider for check in checks}))
    return (
        f"variant {precision} runs on {provider}, but the export's parity gate measured it only on {where}"
        f"{' (a smoke test)' if variant.parity_measured is False else ''}: its parity on {provider} is "
        "unmeasured; re-export on a machine with that provider to gate it there"
    )
