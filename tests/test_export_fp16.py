"""FP16 that means what it says: gated where it is served when the machine has a GPU, recorded as a CPU
smoke test when it has none (and said so at serve time), a bar on the mean too, and the layers that lose
precision in fp16 kept in fp32."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from recserve.export import parity
from recserve.manifest import Manifest, Parity, parity_warning
from recserve.runner import CPU, CUDA
from tests.support.checkpoints import build_encoder
from tests.support.export import run_export

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def roberta_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RoBERTa, whose embeddings the fusion leaves as Gathers, Adds and a LayerNormalization."""
    tmp = tmp_path_factory.mktemp("roberta-fp16")
    checkpoint = build_encoder(tmp / "checkpoint", "roberta")
    assert run_export("--model", checkpoint, "--out", tmp / "repo", "--variants", "fp16") == 0
    return tmp / "repo"


def _initializer_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {init.name: init.data_type for init in graph.initializer}


def test_fp16_without_a_gpu_is_a_recorded_smoke_test(tiny_repo: Path) -> None:
    m = Manifest.load(tiny_repo)
    fp16 = m.variants["fp16"]
    assert fp16.provider == CUDA and fp16.parity.provider == CPU and fp16.parity_cuda is None
    assert fp16.parity_measured is False
    assert "parity on CUDAExecutionProvider is unmeasured" in fp16.notes
    assert (fp16.parity.threshold, fp16.parity.mean_threshold) == (0.999, 0.9999)
    for name in ("fp32", "int8"):
        assert m.variants[name].parity_measured is True and m.variants[name].parity.mean_threshold is None  # type: ignore[index]


def test_the_server_can_say_fp16_is_unmeasured(tiny_repo: Path) -> None:
    m = Manifest.load(tiny_repo)
    warning = parity_warning(m, "fp16", CUDA)
    assert warning is not None and len(warning.splitlines()) == 1
    assert "runs on CUDAExecutionProvider" in warning and "(a smoke test)" in warning
    assert "unmeasured" in warning
    assert parity_warning(m, "fp16", CPU) is None
    assert parity_warning(m, "fp32", CPU) is None
    # fp32 served on a GPU was never gated there either.
    assert parity_warning(m, "fp32", CUDA) is not None
    # An fp16 variant gated on CUDA (by an export on a GPU machine) needs no warning.
    gated = m.variants["fp16"].parity.model_copy(update={"provider": CUDA})
    on_gpu = m.model_copy(
        update={
            "variants": {
                "fp16": m.variants["fp16"].model_copy(update={"parity": gated, "parity_cuda": gated})
            }
        }
    )
    assert parity_warning(on_gpu, "fp16", CUDA) is None


def test_older_manifests_still_load(tiny_repo: Path, tmp_path: Path) -> None:
    """A manifest written before these fields: parity_measured and the rest take their defaults."""
    data = json.loads((tiny_repo / "manifest.json").read_text())
    for variant in data["variants"].values():
        del variant["parity_measured"]
        for key in ("mean_threshold", "label_agreement"):
            variant["parity"].pop(key, None)
    for key in ("optimizer_model_type", "warnings"):
        del data["export"][key]
    repo = tmp_path / "old"
    shutil.copytree(tiny_repo, repo, copy_function=os.link)  # hard links: cheap, and inside the repository
    (repo / "manifest.json").unlink()
    (repo / "manifest.json").write_text(json.dumps(data))
    m = Manifest.load(repo)
    assert m.variants["fp16"].parity_measured is None and m.export.warnings == []
    warning = parity_warning(m, "fp16", CUDA)
    assert warning is not None and "(a smoke test)" not in warning


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_a_gpu_that_fails_to_load_is_not_recorded_as_measured(
    tmp_path: Path, tiny_bert_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate asks for CUDA when onnxruntime lists it; if the session falls back to the CPU, the
    manifest records the provider that really ran, so the fp16 parity stays unmeasured."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    out = tmp_path / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "fp16") == 0
    fp16 = Manifest.load(out).variants["fp16"]
    assert fp16.parity.provider == CPU and fp16.parity_measured is False


def test_fp16_fails_loudly_on_its_mean_bar(
    tmp_path: Path,
    tiny_bert_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(parity.MIN_MEAN_COSINE, "fp16", 1.5)  # unreachable
    out = tmp_path / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "fp32,fp16") == 1
    err = capsys.readouterr().err
    assert "variant fp16 failed parity on CPUExecutionProvider: mean cosine" in err and "< 1.5" in err
    assert "worst: '" in err and "(cosine " in err
    assert set(Manifest.load(out).variants) == {"fp32"}


def test_describe_failure_names_min_and_mean() -> None:
    check = Parity(
        texts=3,
        min_cosine=0.998,
        mean_cosine=0.9995,
        batch_invariance=0.0,
        provider=CPU,
        threshold=0.999,
        mean_threshold=0.9999,
        passed=False,
        worst=[{"text": "'x'", "metric": "cosine", "value": 0.998}],
    )
    line = parity.describe_failure("fp16", check)
    assert "min cosine 0.998000 < 0.999" in line and "mean cosine 0.999500 < 0.9999" in line


def _runs_in_fp32(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """Every float input of `node` is fp32: a fp32 initializer, or a Cast to fp32 (which the fp16
    converter puts before a node it keeps in fp32, even for a weight shared with fp16 nodes)."""
    types = _initializer_types(graph)
    producers = {out: n for n in graph.node for out in n.output}
    floats = []
    for name in node.input:
        if name in types:
            floats.append(types[name] == FLOAT if types[name] in (FLOAT, FLOAT16) else None)
        elif name in producers and producers[name].op_type == "Cast":
            to = next(a.i for a in producers[name].attribute if a.name == "to")
            floats.append(to == FLOAT if to in (FLOAT, FLOAT16) else None)
    return all(f is not False for f in floats) and any(floats)


def test_fused_fp16_keeps_the_embedding_sum_and_the_pooled_states_fp32(tiny_repo: Path) -> None:
    graph = onnx.load(str(tiny_repo / "model.fp16.onnx")).graph
    types = _initializer_types(graph)
    (embed,) = [n for n in graph.node if n.op_type == "EmbedLayerNormalization"]
    assert _runs_in_fp32(embed, graph)
    assert {types[name] for name in embed.input[2:5]} == {FLOAT}, "word, position, type tables"
    (last,) = [n for n in graph.node if "last_hidden_state" in n.output]
    assert last.op_type == "SkipLayerNormalization" and _runs_in_fp32(last, graph)
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention and all(types[n.input[1]] == FLOAT16 for n in attention)


def test_unfused_fp16_keeps_embeddings_and_layer_norms_fp32(roberta_fp16: Path) -> None:
    m = Manifest.load(roberta_fp16)
    fp16 = m.variants["fp16"]
    assert fp16.parity.passed and "LayerNormalization" in fp16.notes
    graph = onnx.load(str(roberta_fp16 / "model.fp16.onnx")).graph
    types = _initializer_types(graph)
    tables = [n for n in graph.node if n.op_type == "Gather" and types.get(n.input[0]) in (FLOAT, FLOAT16)]
    assert len(tables) >= 2 and all(types[n.input[0]] == FLOAT for n in tables), "embedding tables stay fp32"
    (embedding_norm,) = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert _runs_in_fp32(embedding_norm, graph)
    (last,) = [n for n in graph.node if "last_hidden_state" in n.output]
    assert _runs_in_fp32(last, graph)
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Attention") and n.input[1] in types]
    assert any(types[n.input[1]] == FLOAT16 for n in matmuls), "the encoder's weights are fp16"
