"""ONNX export with optimum, ONNX Runtime transformer fusion, and the fp16 variant.

NOTE: the graph ends at the encoder's token states (`last_hidden_state`) for embedding models; pooling and
normalisation run in the server (recserve/tensors.py says why). Cross-encoders end at `logits`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from recserve.export.checkpoint import Checkpoint
from recserve.export.errors import ExportError
from recserve.manifest import OUTPUT_NAMES, Task

# Contrib operators the ONNX Runtime transformer optimizer fuses BERT subgraphs into.
FUSED_OP_TYPES = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)
_OPTIMUM_TASKS: dict[Task, str] = {"embedding": "feature-extraction", "cross-encoder": "text-classification"}
# Fed by the server in this order when the graph has them.
_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def export_plain(checkpoint: Checkpoint, task: Task, work_dir: Path) -> tuple[Path, list[str]]:
    """optimum's export (dynamic batch and sequence axes) -> (model.onnx, its input names in feed order)."""
    from optimum.exporters.onnx import main_export

    out = work_dir / "optimum"
    try:
        # library_name="transformers": without it optimum recognises a sentence-transformers folder and
        # bakes its pooling into the graph, which the server does instead.
        with _quiet_toolchain():
            main_export(
                str(checkpoint.model_dir),
                out,
                task=_OPTIMUM_TASKS[task],
                library_name="transformers",
                do_validation=False,
                local_files_only=True,
                device="cpu",
            )
    except Exception as exc:  # the input failed to load or trace; say which checkpoint and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot export {checkpoint.root} to ONNX: {first}") from None
    if any(out.glob("*.onnx_data")) or any(out.glob("*.data")):
        raise ExportError(f"{checkpoint.root} is over 2 GB as ONNX; external-data models are not supported")
    model = out / "model.onnx"
    inputs, outputs = graph_io(model)
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ExportError(f"exported graph has inputs {inputs}; expected input_ids and attention_mask")
    if OUTPUT_NAMES[task] not in outputs:
        raise ExportError(f"exported graph has outputs {outputs}; expected {OUTPUT_NAMES[task]}")
    return model, [name for name in _INPUT_ORDER if name in inputs]


@contextlib.contextmanager
def _quiet_toolchain() -> Iterator[None]:
    """Silences the exporter's known noise (tracer warnings about constants, deprecation notices, a hint
    to install accelerate) so that the export's own progress lines stay readable."""
    import torch

    loggers = [logging.getLogger(name) for name in ("transformers", "optimum")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def fuse(plain: Path, checkpoint: Checkpoint, out: Path) -> dict[str, int]:
    """ONNX Runtime's BERT fusion into `out`; returns the fused-operator counts (empty if nothing fused).

    opt_level=0 applies only the Python fusions, so the result is the same graph whichever execution
    provider later runs it (fp32 on CPU, fp16 on CUDA).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(plain),
        model_type="bert",  # covers BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA graphs
        num_heads=checkpoint.num_heads,
        hidden_size=checkpoint.hidden_size,
        opt_level=0,
        use_gpu=False,
    )
    model.save_model_to_file(str(out), use_external_data_format=False)
    return count_fused_ops(out)


def count_fused_ops(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts = collections.Counter(node.op_type for node in graph.node if node.op_type in FUSED_OP_TYPES)
    return dict(sorted(counts.items()))


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute for CUDA; graph inputs and outputs stay fp32 (keep_io_types).

    NOTE: numerically sensitive operators are kept in fp32 where they would otherwise run in fp16: plain
    LayerNormalization and Softmax (present when fusion did not match). The fused SkipLayerNormalization,
    EmbedLayerNormalization and Attention kernels accumulate their means, variances and softmax sums in
    fp32 internally, so a fused graph needs no casts around them.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=[
            *DEFAULT_OP_BLOCK_LIST,
            "LayerNormalization",
            "SimplifiedLayerNormalization",
            "Softmax",
        ],
    )
    model.save_model_to_file(str(dst), use_external_data_format=False)
