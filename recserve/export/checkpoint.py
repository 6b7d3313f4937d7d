"""Inspect and validate an input checkpoint before any heavy work (json and the standard library only).

Everything a user can get wrong about the input is caught here, cheaply, as an ExportError naming the
problem: a missing path, a directory that is not a checkpoint, an architecture that is not an encoder or
that transformers does not know, a sentence-transformers pipeline the server cannot reproduce, a max
length that is absent or absurd, sharded, truncated or corrupt weights, classifier labels that do not
match the head.
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

# model_type -> the class-name prefix of its transformers architectures (BertModel, XLMRobertaFor...).
ARCHITECTURE_PREFIXES: dict[str, str] = {
    "bert": "Bert",
    "distilbert": "DistilBert",
    "albert": "Albert",
    "electra": "Electra",
    "roberta": "Roberta",
    "xlm-roberta": "XLMRoberta",
    "camembert": "Camembert",
    "mpnet": "MPNet",
}
# The heads whose checkpoint holds the plain encoder the export needs (an embedding model takes the
# encoder and drops the head; a *ForSequenceClassification is exported with its head).
ARCHITECTURE_SUFFIXES = (
    "Model",
    "ForMaskedLM",
    "ForPreTraining",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
)
# Token counts a max length must lie between: [CLS] and [SEP] at least, the position table at most.
MIN_MAX_LENGTH = 2
# Tokenizers without a limit store a huge sentinel (int(1e30)) as model_max_length: no limit set.
_NO_LIMIT = 1_000_000

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
    # max_seq_length from sentence_bert_config.json, or the tokenizer's model_max_length; None when neither
    # is set or usable, with the reason in `max_length_problem` (then --max-length is needed).
    default_max_length: int | None
    weights: tuple[Path, ...]
    num_layers: int = 0
    max_length_problem: str | None = None
    # A classification head's labels in logit order (id2label), and whether they are independent.
    labels: tuple[str, ...] = ()
    multi_label: bool = False

    @property
    def is_classifier(self) -> bool:
        return self.architecture.endswith("ForSequenceClassification")

    def default_task(self) -> Task:
        """A plain classification checkpoint with one logit is a cross-encoder (the logit scores a pair);
        with several it is a classifier (one logit per label); everything else is embedded."""
        if self.layout == "transformers" and self.is_classifier:
            return "cross-encoder" if self.num_labels == 1 else "classifier"
        return "embedding"


def resolve_max_length(checkpoint: Checkpoint, requested: int | None) -> int:
    """--max-length if given (within the position table), else the checkpoint's own; ExportError if none."""
    if requested is None:
        if checkpoint.default_max_length is None:
            raise ExportError(f"{checkpoint.max_length_problem}; pass --max-length N (2 to "
                              f"{checkpoint.max_positions} for {checkpoint.architecture})")  # fmt: skip
        return checkpoint.default_max_length
    if not MIN_MAX_LENGTH <= requested <= checkpoint.max_positions:
        raise ExportError(
            f"--max-length {requested} is out of range: {checkpoint.architecture} takes 2 to "
            f"{checkpoint.max_positions} tokens"
        )
    return requested


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
    _check_architecture(config, architectures, model_type, config_path)
    hidden_size = _positive_int(config, ("hidden_size", "dim"), config_path)
    num_heads = _positive_int(config, ("num_attention_heads", "n_heads"), config_path)
    num_layers = _positive_int(config, ("num_hidden_layers", "n_layers"), config_path)
    positions = _positive_int(config, ("max_position_embeddings",), config_path)
    max_pos = positions - SUPPORTED_MODEL_TYPES[model_type]
    if max_pos < MIN_MAX_LENGTH:
        raise ExportError(f"{config_path}: max_position_embeddings {positions} leaves no room for a text")
    labels, multi_label = _labels(config, config_path)
    num_labels = int(config.get("num_labels") or len(labels) or 2)
    weights = _find_weights(model_dir)
    for w in weights:
        verify_weights_file(w)
    default_max_length, problem = _default_max_length(model_dir, max_pos)
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
        default_max_length=default_max_length,
        weights=weights,
        num_layers=num_layers,
        max_length_problem=problem,
        labels=labels,
        multi_label=multi_label,
    )


def _positive_int(config: dict[str, Any], keys: tuple[str, ...], path: Path) -> int:
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{path}: {key} must be a positive integer (got {value!r})")
        return value
    raise ExportError(f"{path} has no {' or '.join(keys)}")


def _check_architecture(
    config: dict[str, Any], architectures: list[Any], model_type: str, path: Path
) -> None:
    """Refuses what transformers cannot build from its own classes (remote code, renamed classes)."""
    if config.get("auto_map"):
        raise ExportError(
            f"{path} maps its classes to custom code (auto_map); the export does not run a checkpoint's "
            "own code (trust_remote_code): only transformers' own encoder classes are supported"
        )
    prefix = ARCHITECTURE_PREFIXES[model_type]
    for name in architectures:
        if not isinstance(name, str) or name.removeprefix(prefix) not in ARCHITECTURE_SUFFIXES:
            known = ", ".join(prefix + suffix for suffix in ARCHITECTURE_SUFFIXES[:4])
            raise ExportError(
                f"architecture {name!r} in {path} is unknown for model_type {model_type!r} "
                f"(known: {known}, ...)"
            )


def _labels(config: dict[str, Any], path: Path) -> tuple[tuple[str, ...], bool]:
    """id2label in id order, and whether the labels are independent (multi-label)."""
    raw = config.get("id2label") or {}
    try:
        by_id = {int(key): str(value) for key, value in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ExportError(f"{path}: id2label must map label ids 0..n-1 to names (got {raw!r})") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ExportError(f"{path}: id2label must map label ids 0..n-1 to names (got ids {sorted(by_id)})")
    if "num_labels" in config and by_id and int(config["num_labels"]) != len(by_id):
        raise ExportError(f"{path}: num_labels {config['num_labels']} but id2label names {len(by_id)}")
    labels = tuple(by_id[i] for i in range(len(by_id)))
    return labels, config.get("problem_type") == "multi_label_classification"


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


def _default_max_length(model_dir: Path, max_positions: int) -> tuple[int | None, str | None]:
    """(max length, None), or (None, why there is none): absent, or absurd (past the position table).

    NOTE: an absurd value is refused rather than capped: a checkpoint that claims 4096 tokens on a
    512-position table was configured by mistake, and which of the two its authors meant is a guess.
    """
    for name in _ST_CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            config = _read_json(path)
            # sentence-transformers < 5 writes max_seq_length; 5.x leaves it to processor_kwargs or the
            # tokenizer's model_max_length.
            value = config.get("max_seq_length")
            if value is None:
                value = (config.get("processor_kwargs") or {}).get("model_max_length")
            if value is not None:
                return _sane(value, f"max_seq_length {value!r} in {path}", max_positions)
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = _read_json(tokenizer_config).get("model_max_length")
        if value is not None and not (isinstance(value, int | float) and value >= _NO_LIMIT):
            return _sane(value, f"model_max_length {value!r} in {tokenizer_config}", max_positions)
    return None, (
        f"{model_dir} sets no max length (no max_seq_length in a sentence-transformers config, and its "
        "tokenizer's model_max_length is absent or unlimited)"
    )


def _sane(value: Any, what: str, max_positions: int) -> tuple[int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        return None, f"{what} is not a whole number of tokens"
    if not MIN_MAX_LENGTH <= value <= max_positions:
        return None, f"{what} is absurd: the position table holds {max_positions} tokens"
    return int(value), None


def _find_weights(model_dir: Path) -> tuple[Path, ...]:
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (model_dir / single).is_file():
            return (model_dir / single,)
        if (model_dir / index).is_file():
            # NOTE: transformers shards only past several GB (5 GB by default), far beyond the 2 GB one
            # ONNX file holds; a small model saved in shards is refused too, with what to do about it.
            weight_map = _read_json(model_dir / index).get("weight_map", {})
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            raise ExportError(
                f"the weights in {model_dir} are sharded ({index}, {len(shards)} shards): the export takes "
                f"one {single}, as exported graphs are limited to 2 GB; if the model is smaller than that, "
                "save it again as one file (save_pretrained with a larger max_shard_size)"
            )
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
