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
from typing import Any

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
_OPTIMUM_TASKS: dict[Task, str] = {
    "embedding": "feature-extraction",
    "cross-encoder": "text-classification",
    "classifier": "text-classification",
}
# checkpoint model_type -> the ONNX Runtime transformer optimizer's model type. ORT (1.32) has no type of
# its own for RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA, ALBERT or MPNet: its "bert" fusions match
# their graphs (DistilBERT's masked-fill attention included), as optimum's ORTOptimizer maps them too.
OPTIMIZER_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "albert": "bert",
    "mpnet": "bert",
}
# Model types whose attention adds a bias to the scores between the scaling and the mask (MPNet's relative
# position bias), a pattern ONNX Runtime's attention fusion does not match: the export lifts the bias out,
# lets the fusion match, and hands the bias to each fused Attention as its attention_bias input.
ATTENTION_BIAS_TYPES = ("mpnet",)
# What to say when such a model's attention still does not fuse.
ATTENTION_NOTES: dict[str, str] = {
    "mpnet": (
        "MPNet adds a relative position bias to the attention scores between the scaling and the mask; "
        "ONNX Runtime's attention fusion does not match that pattern (it has no mpnet model type), and the "
        "export's rewrite that passes the bias to the fused Attention as attention_bias did not match "
        "every layer of this graph"
    ),
}
# Fed by the server in this order when the graph has them.
_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def export_plain(
    checkpoint: Checkpoint, task: Task, work_dir: Path
) -> tuple[Path, list[str], dict[str, int]]:
    """optimum's export (dynamic batch and sequence axes) -> (model.onnx, its input names in feed order,
    its fused-operator counts)."""
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
    import onnx

    model = out / "model.onnx"
    graph = onnx.load(str(model)).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    ops = count_fused_ops(graph)
    del graph
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ExportError(f"exported graph has inputs {inputs}; expected input_ids and attention_mask")
    if OUTPUT_NAMES[task] not in outputs:
        raise ExportError(f"exported graph has outputs {outputs}; expected {OUTPUT_NAMES[task]}")
    return model, [name for name in _INPUT_ORDER if name in inputs], ops


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


def fuse(plain: Path, checkpoint: Checkpoint, out: Path) -> dict[str, int]:
    """ONNX Runtime's transformer fusion into `out`; returns the fused-operator counts (empty if nothing
    fused).

    This is what `optimize_model(..., opt_level=0)` does (only the Python fusions, so the result is the
    same graph whichever execution provider later runs it: fp32 on CPU, fp16 on CUDA), with two changes:
    the fusions' shape inference runs on a copy of the graph without its weights (see _light_shapes), and
    an attention bias is lifted out for the fusion and handed back to the fused nodes (see
    ATTENTION_BIAS_TYPES).
    """
    import onnx

    model_type = OPTIMIZER_MODEL_TYPES[checkpoint.model_type]
    if checkpoint.model_type in ATTENTION_BIAS_TYPES:
        optimizer = _fuse_graph(onnx.load(str(plain)), checkpoint, model_type, lift_bias=True)
        if optimizer is None:  # not every layer matched: fuse the untouched graph the ordinary way
            optimizer = _fuse_graph(onnx.load(str(plain)), checkpoint, model_type, lift_bias=False)
    else:
        optimizer = _fuse_graph(onnx.load(str(plain)), checkpoint, model_type, lift_bias=False)
    assert optimizer is not None
    optimizer.save_model_to_file(str(out), use_external_data_format=False)
    return count_fused_ops(optimizer.model.graph)


def _fuse_graph(model: Any, checkpoint: Checkpoint, model_type: str, lift_bias: bool) -> Any:
    """The fused OnnxModel; None when `lift_bias` and some layer's attention did not fuse."""
    from onnx import helper
    from onnxruntime import __version__ as ort_version
    from onnxruntime.transformers.fusion_options import FusionOptions

    lifted = lift_attention_bias(model.graph) if lift_bias else {}
    biases = sorted(set(lifted.values()))
    # A graph output for now, so that the fusion's pruning keeps the bias's subgraph while nothing uses it.
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in biases)
    optimizer = _light_shapes(model_type)(model, checkpoint.num_heads, checkpoint.hidden_size)
    optimizer.optimize(FusionOptions(model_type))
    if lift_bias:
        fused = [n for n in optimizer.model.graph.node if n.op_type == "Attention" and n.output[0] in lifted]
        if not lifted or len(fused) != len(lifted):
            return None
        for node in fused:
            # Attention's inputs: input, weights, bias, mask_index, past, attention_bias.
            node.input.extend([""] * (5 - len(node.input)) + [lifted[node.output[0]]])
        graph_outputs = [o for o in optimizer.model.graph.output if o.name not in biases]
        del optimizer.model.graph.output[:]
        optimizer.model.graph.output.extend(graph_outputs)
        optimizer.prune_graph()
    optimizer.topological_sort()
    optimizer.model.producer_name = "onnxruntime.transformers"
    optimizer.model.producer_version = ort_version
    return optimizer


def lift_attention_bias(graph: Any) -> dict[str, str]:
    """Rewires each `Softmax(Add(Add(scaled scores, bias), mask))` to `Softmax(Add(scaled scores, mask))`,
    the pattern ONNX Runtime's attention fusion matches; returns, per layer, the name of the tensor its
    fused Attention will write (the Reshape after the context MatMul) -> the bias's tensor name.

    NOTE: until the bias is handed back, the rewired graph computes attention without it; fuse() keeps
    the result only if every rewired layer fused, and otherwise starts again from the untouched graph.
    """
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def only(name: str, op_type: str) -> Any:
        """The one consumer of `name` of that type (others, such as Shape, may read it too)."""
        nodes = [node for node in consumers.get(name, []) if node.op_type == op_type]
        return nodes[0] if len(nodes) == 1 else None

    def parent(node: Any, op_types: tuple[str, ...]) -> Any:
        found = producers.get(node.input[0]) if node is not None else None
        return found if found is not None and found.op_type in op_types else None

    lifted: dict[str, str] = {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        mask_add = parent(softmax, ("Add",))
        bias_add = parent(mask_add, ("Add",))
        scaled = parent(bias_add, ("Div", "Mul"))
        context = only(softmax.output[0], "MatMul")
        transpose = only(context.output[0], "Transpose") if context is not None else None
        reshape = only(transpose.output[0], "Reshape") if transpose is not None else None
        if scaled is None or reshape is None:
            continue
        lifted[reshape.output[0]] = bias_add.input[1]
        mask_add.input[0] = scaled.output[0]
    return lifted


# Float initializers larger than this are weights, whose values shape inference never reads (shape
# arithmetic reads integer tensors, such as Reshape targets and position ids, which are all kept).
_SHAPE_DATA_LIMIT = 4096
_FLOATS = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _light_shapes(model_type: str) -> Any:
    """The optimizer class of `model_type`, with shape inference run on a weightless copy of the graph.

    NOTE: ONNX Runtime's fusions (SkipLayerNormalization, Attention's mask) ask for symbolic shape
    inference several times, and each run copies the whole ModelProto, weights included, and keeps the copy
    while the fusion lives: on a base-size model that took the fusion step from 0.5 to 3.9 GB. The copy
    here keeps every node and every small initializer, and only the dims of the large ones.
    """
    from onnxruntime.transformers.optimizer import MODEL_TYPES
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    base: Any = MODEL_TYPES[model_type][0]

    class _LightShapes(base):  # type: ignore[misc,valid-type]
        enable_shape_infer: bool
        shape_infer_helper: Any

        def infer_runtime_shape(self, dynamic_axis_mapping: Any = None, update: bool = False) -> Any:
            # The same contract as OnnxModel.infer_runtime_shape.
            if not self.enable_shape_infer:
                return None
            if self.shape_infer_helper is None or update:
                self.shape_infer_helper = SymbolicShapeInferenceHelper(_weightless(self.model))
            try:
                if self.shape_infer_helper.infer(dynamic_axis_mapping or {}):
                    return self.shape_infer_helper
            except Exception:  # as OnnxModel does: no shapes, and no second try
                self.enable_shape_infer = False
            return None

    return _LightShapes


def _weightless(model: Any) -> Any:
    """A copy of `model` whose large float initializers are graph inputs: name, type and dims, no data."""
    import onnx

    graph = model.graph
    copy = onnx.ModelProto()
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    light = copy.graph
    light.name = graph.name
    light.node.extend(graph.node)
    light.input.extend(graph.input)
    light.output.extend(graph.output)
    light.value_info.extend(graph.value_info)
    for init in graph.initializer:
        if init.data_type in _FLOATS and init.ByteSize() > _SHAPE_DATA_LIMIT:
            # A graph input of the same type and shape: inference knows its shape and, unlike an
            # initializer without data, never tries to read its value.
            light.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            light.initializer.append(init)
    return copy


def attention_warning(checkpoint: Checkpoint, fused_ops: dict[str, int]) -> str | None:
    """Why some or all of the attention layers stayed unfused, or None when each one fused."""
    layers = checkpoint.num_layers
    attention = fused_ops.get("Attention", 0) + fused_ops.get("MultiHeadAttention", 0)
    if layers and attention >= layers:
        return None
    known = ATTENTION_NOTES.get(checkpoint.model_type)
    reason = known or (
        f"ONNX Runtime's {OPTIMIZER_MODEL_TYPES[checkpoint.model_type]!r} attention patterns did not match "
        f"this {checkpoint.architecture} graph"
    )
    return f"attention fused in {attention} of {layers} layers, the rest run unfused: {reason}"


def count_fused_ops(graph: Any) -> dict[str, int]:
    """How many nodes of each FUSED_OP_TYPES type an ONNX GraphProto holds (counted in memory: loading a
    base-size graph again only to count would cost a second or two and 400 MB each time)."""
    counts = collections.Counter(node.op_type for node in graph.node if node.op_type in FUSED_OP_TYPES)
    return dict(sorted(counts.items()))


# Kept in fp32 wherever they appear: plain LayerNormalization and Softmax (present where fusion did not
# match) and the fused embedding sum + LayerNorm.
FP16_BLOCKED_OPS = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "Softmax",
    "EmbedLayerNormalization",
)


def to_fp16(src: Path, dst: Path) -> tuple[list[str], dict[str, int]]:
    """fp16 weights and compute for CUDA; graph inputs and outputs stay fp32 (keep_io_types).

    Returns the names of the nodes kept in fp32 besides FP16_BLOCKED_OPS (see fp32_nodes), and the graph's
    fused-operator counts.

    NOTE: what loses precision in fp16 stays fp32. By op type (FP16_BLOCKED_OPS): LayerNormalization and
    Softmax, and EmbedLayerNormalization, so the sum of the word, position and token-type embeddings and its
    LayerNorm are fp32. By node (fp32_nodes): in unfused graphs the embedding lookups and their sum, and in
    every graph the last LayerNorm and what follows it, so the token states the server pools (or the
    classifier head's input) are computed in fp32 and not rounded to fp16. The fused SkipLayerNormalization
    and Attention kernels accumulate their means, variances and softmax sums in fp32 internally, so they
    run in fp16 without casts around them.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    kept = fp32_nodes(model.model.graph)
    model.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_BLOCKED_OPS],
        node_block_list=kept,
    )
    model.save_model_to_file(str(dst), use_external_data_format=False)
    return kept, count_fused_ops(model.model.graph)


_NORMS = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization")


def fp32_nodes(graph: Any) -> list[str]:
    """Names of the nodes to_fp16 keeps in fp32: the embedding lookups up to their LayerNorm, and the last
    LayerNorm with everything downstream of it."""
    initializers = {init.name for init in graph.initializer}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    keep: dict[str, None] = {}
    # Embeddings: a Gather from a constant table, then the Adds that sum the lookups, up to a norm.
    frontier = [n for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] in initializers]
    while frontier:
        node = frontier.pop()
        if node.name in keep or node.op_type in _NORMS:
            continue
        keep[node.name] = None
        frontier.extend(c for out in node.output for c in consumers[out] if c.op_type in ("Add", "Gather"))
    # The tail: the last norm in graph order (ONNX nodes are topologically sorted) and all it feeds.
    norms = [n for n in graph.node if n.op_type in _NORMS]
    if norms:
        frontier = [norms[-1]]
        while frontier:
            node = frontier.pop()
            if node.name in keep:
                continue
            keep[node.name] = None
            frontier.extend(c for out in node.output for c in consumers[out])
    return [name for name in keep if name]
