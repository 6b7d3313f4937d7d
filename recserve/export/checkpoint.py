"""Inspect and validate an input checkpoint before any heavy work (json and the standard library only).

Everything a user can get wrong about the input is caught here, cheaply, as an ExportError naming the
problem: a missing path, a directory that is not a checkpoint, an architecture that is not an encoder, a
sentence-transformers pipeline the server cannot reproduce, a truncated or corrupt weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recserve.export.errors import ExportError
from recserve.manifest import Pooling, Task

Layout = Literal["sentence-transformers", "transformers"]

# model_type -> how many position ids the tokenizer may use. RoBERTa-style models offset positions by
# padding_idx + 1, so two rows of their position table are never reachable.
SUPPORTED_MODEL_TYPES: dict[str, int] = {
    "bert": 0,
    "distilbert": 0,
    "albert": 0,
    "electra": 0,
    "roberta": 2,
    "xlm-roberta": 2,
    "camembert": 2,
    "mpnet": 2,
}

_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

_ST_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
)

_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Checkpoint:
    """What the export needs to know about the input, read from its config files."""

    root: Path
    # The transformers model directory: `root`, or a module folder such as `0_Transformer` in older
    # sentence-transformers layouts.
    model_dir: Path
    layout: Layout
    config: dict[str, Any]
    model_type: str
    architecture: str
    hidden_size: int
    num_heads: int
    num_labels: int
    max_positions: int
    pooling: Pooling
    normalize: bool
    # max_seq_length from sentence_bert_config.json, or the tokenizer's model_max_length when sane.
    default_max_length: int
    weights: tuple[Path, ...]

    @property
    def is_classifier(self) -> bool:
        return self.architecture.endswith("ForSequenceClassification")

    def default_task(self) -> Task:
        """A plain classifier checkpoint is a cross-encoder; everything else is embedded."""
        if self.layout == "transformers" and self.is_classifier:
            return "cross-encoder"
        return "embedding"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None


def inspect_checkpoint(path: Path) -> Checkpoint:
    """Reads and validates a checkpoint directory; raises ExportError naming what is wrong."""
    if not path.exists():
        raise ExportError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ExportError(f"model path {path} is not a directory")
    root = path.resolve()
    layout: Layout = "sentence-transformers" if (root / "modules.json").is_file() else "transformers"
    pooling: Pooling = "mean"
    normalize = False
    model_dir = root
    if layout == "sentence-transformers":
        model_dir, pooling, normalize = _read_sentence_transformers(root)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} is not a model config (expected a JSON object)")
    model_type = str(config.get("model_type", ""))
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else f"{model_type or 'unknown'} (no architectures)"
    if model_type not in SUPPORTED_MODEL_TYPES or config.get("is_decoder"):
        raise ExportError(
            f"{architecture} (model_type {model_type!r}) is not a supported encoder; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    hidden_size = int(config.get("hidden_size") or config.get("dim") or 0)
    num_heads = int(config.get("num_attention_heads") or config.get("n_heads") or 0)
    max_pos = int(config.get("max_position_embeddings") or 512) - SUPPORTED_MODEL_TYPES[model_type]
    num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    weights = _find_weights(model_dir)
    for w in weights:
        verify_weights_file(w)
    return Checkpoint(
        root=root,
        model_dir=model_dir,
        layout=layout,
        config=config,
        model_type=model_type,
        architecture=architecture,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_labels=num_labels,
        max_positions=max_pos,
        pooling=pooling,
        normalize=normalize,
        default_max_length=_default_max_length(model_dir, max_pos),
        weights=weights,
    )


def _read_sentence_transformers(root: Path) -> tuple[Path, Pooling, bool]:
    """modules.json -> (transformer folder, pooling mode, normalize); only pipelines the server reproduces."""
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise ExportError(f"{root / 'modules.json'} lists no modules")
    transformer_dir: Path | None = None
    pooling: Pooling | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = root / str(module.get("path", ""))
        if kind == "Transformer" and transformer_dir is None:
            transformer_dir = folder
        elif kind == "Pooling" and pooling is None:
            pooling = _read_pooling(folder / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ExportError(
                f"sentence-transformers module {module.get('type')!r} in {root} is not supported: "
                "the server reproduces only Transformer -> Pooling (cls, mean, max) -> Normalize"
            )
    if transformer_dir is None:
        raise ExportError(f"{root / 'modules.json'} has no Transformer module")
    return transformer_dir, pooling or "mean", normalize


def _read_pooling(path: Path) -> Pooling:
    if not path.is_file():
        raise ExportError(f"sentence-transformers pooling config {path} is missing")
    config = _read_json(path)
    mode = config.get("pooling_mode")
    if mode is None:  # the pre-5.0 format: one boolean per mode
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes if modes else ["mean"]
    if isinstance(mode, list):
        if len(mode) != 1:
            raise ExportError(
                f"pooling modes {mode} in {path} are not supported: choose one of cls, mean, max"
            )
        mode = mode[0]
    if mode == "cls":
        return "cls"
    if mode == "mean":
        return "mean"
    if mode == "max":
        return "max"
    raise ExportError(f"pooling mode {mode!r} in {path} is not supported: choose one of cls, mean, max")


def _default_max_length(model_dir: Path, max_positions: int) -> int:
    for name in _ST_CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            config = _read_json(path)
            # sentence-transformers < 5 writes max_seq_length; 5.x leaves it to processor_kwargs or the
            # tokenizer's model_max_length.
            value = config.get("max_seq_length") or (config.get("processor_kwargs") or {}).get(
                "model_max_length"
            )
            if value:
                return min(int(value), max_positions)
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = _read_json(tokenizer_config).get("model_max_length")
        # Tokenizers without a limit store a huge sentinel (int(1e30)).
        if isinstance(value, int | float) and 0 < value < 1_000_000:
            return min(int(value), max_positions)
    return max_positions


def _find_weights(model_dir: Path) -> tuple[Path, ...]:
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (model_dir / single).is_file():
            return (model_dir / single,)
        if (model_dir / index).is_file():
            weight_map = _read_json(model_dir / index).get("weight_map", {})
            shards = tuple(model_dir / name for name in sorted(set(weight_map.values())))
            missing = [s.name for s in shards if not s.is_file()]
            if missing or not shards:
                raise ExportError(
                    f"weights shards missing in {model_dir}: {', '.join(missing) or 'none listed'}"
                )
            return shards
    raise ExportError(
        f"{model_dir} is not a Hugging Face checkpoint: "
        "no weights file (model.safetensors or pytorch_model.bin)"
    )


def verify_weights_file(path: Path) -> None:
    """Cheap structural check that catches truncated and corrupt weights before the export loads them."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        _verify_safetensors(path, size)
    elif zipfile.is_zipfile(path):
        # torch.save writes a zip archive; its CRCs detect corruption anywhere in the file.
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ExportError(f"weights file {path} is corrupt: {exc}") from None
        if bad is not None:
            raise ExportError(f"weights file {path} is corrupt: member {bad} fails its checksum")
    elif size < 64:
        raise ExportError(f"weights file {path} is truncated ({size} bytes)")


def _verify_safetensors(path: Path, size: int) -> None:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportError(f"weights file {path} is truncated ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise ExportError(
                f"weights file {path} is corrupt or truncated: header length {header_len} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ExportError(f"weights file {path} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ExportError(f"weights file {path} is corrupt: unexpected header")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            expected = math.prod(int(d) for d in entry["shape"]) * _SAFETENSORS_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"weights file {path} is corrupt: bad entry for tensor {name!r}") from None
        if stop - begin != expected:
            raise ExportError(f"weights file {path} is corrupt: tensor {name!r} has the wrong byte length")
        end = max(end, stop)
    data = size - 8 - header_len
    if data < end:
        raise ExportError(f"weights file {path} is truncated: {data} data bytes, its header needs {end}")
    if data > end:
        raise ExportError(f"weights file {path} is corrupt: {data - end} unexpected bytes after the tensors")


def weights_sha256(weights: tuple[Path, ...]) -> str:
    """sha256 of the weights bytes, shards concatenated in name order."""
    digest = hashlib.sha256()
    for path in sorted(weights):
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
