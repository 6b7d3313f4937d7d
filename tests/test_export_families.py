"""Held-out checkpoints: a tiny random encoder and cross-encoder of each mainstream family, built here (no
download), exported end to end and served, each answer checked against the PyTorch reference.

Each family's checkpoint is exported once (module-scoped fixtures), fp32 only: the other precisions go
through the same code and are covered on BERT in test_export.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.export.checkpoint import inspect_checkpoint
from recserve.export.parity_texts import parity_pairs, parity_texts
from recserve.manifest import Manifest
from recserve.v1 import inference_pb2 as pb
from tests.support.checkpoints import (
    FAMILIES,
    INPUTS,
    PAD_TOKEN_ID,
    TINY_MAX_LENGTH,
    Family,
    StPooling,
    build_encoder,
    build_sequence_classifier,
)
from tests.support.export import run_export
from tests.support.serving import embed, serving

# Each family with another sentence-transformers pooling set-up, so every mode is read from its config.
POOLING: dict[Family, tuple[StPooling, bool]] = {
    "bert": ("cls", True),
    "roberta": ("mean", True),
    "distilbert": ("max", False),
    "mpnet": ("mean", True),
    "xlm-roberta": ("cls", False),
}
TINY_LAYERS = 2
# Two families are exported at the longest length their position table allows (see the position test).
FULL_TABLE: tuple[Family, ...] = ("roberta", "mpnet")
# The texts sent over gRPC: every kind of parity text (empty, scripts, emoji, past max length).
SERVED = parity_texts()[:48] + [t for t in parity_texts() if len(t) > 2000][:3]


def _built(tmp: Path, build: Any, family: Family, **kwargs: Any) -> tuple[Path, Path]:
    checkpoint = build(tmp / "checkpoint", family, **kwargs)
    repo = tmp / "repo"
    assert run_export("--model", checkpoint, "--out", repo, "--variants", "fp32") == 0
    return checkpoint, repo


@pytest.fixture(scope="module", params=FAMILIES)
def encoder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Family, Path, Path]:
    family: Family = request.param
    pooling, normalize = POOLING[family]
    checkpoint, repo = _built(
        tmp_path_factory.mktemp(f"{family}-encoder"),
        build_encoder,
        family,
        pooling=pooling,
        normalize=normalize,
        max_length=512 if family in FULL_TABLE else TINY_MAX_LENGTH,
    )
    return family, checkpoint, repo


@pytest.fixture(scope="module", params=FAMILIES)
def cross_encoder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Family, Path, Path]:
    family: Family = request.param
    checkpoint, repo = _built(tmp_path_factory.mktemp(f"{family}-cross"), build_sequence_classifier, family)
    return family, checkpoint, repo


def _check_graph(m: Manifest, family: Family) -> None:
    assert m.model_type == family
    assert m.inputs == INPUTS[family], "only BERT feeds token_type_ids"
    assert m.pad_token_id == PAD_TOKEN_ID[family]
    assert m.export.optimizer_model_type == "bert"
    ops = m.export.fused_ops
    # Every family's attention fuses: MPNet's through the export's attention_bias rewrite.
    assert ops["Attention"] == TINY_LAYERS and m.export.warnings == []
    assert ops.get("SkipLayerNormalization", 0) >= 2 * TINY_LAYERS - 1 and ops.get("BiasGelu") == TINY_LAYERS
    assert m.variants["fp32"].fused_ops == (ops if m.variants["fp32"].graph == "fused" else {})
    fp32 = m.variants["fp32"]
    assert fp32.parity.passed and fp32.parity_measured is True and fp32.parity.texts >= 200
    assert fp32.parity.batch_invariance <= 1e-4


def test_encoder_exports_with_its_family_layout(encoder: tuple[Family, Path, Path]) -> None:
    family, _, repo = encoder
    m = Manifest.load(repo)
    _check_graph(m, family)
    assert (m.task, m.pooling, m.normalize) == ("embedding", *POOLING[family])
    assert (
        m.variants["fp32"].parity.min_cosine is not None and m.variants["fp32"].parity.min_cosine >= 0.99999
    )


def test_encoder_serves_the_reference_vectors(encoder: tuple[Family, Path, Path]) -> None:
    from recserve.export.reference import reference_embeddings

    _, checkpoint, repo = encoder
    expected = reference_embeddings(checkpoint, SERVED)
    with serving(repo, metrics_port=None) as server:
        got = embed(server.stub(), SERVED)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_position_ids_reach_the_end_of_the_table(encoder: tuple[Family, Path, Path], tmp_path: Path) -> None:
    """RoBERTa-style models start positions at pad + 1, so their 514-row tables hold 512 tokens. Exported
    at that length (max_seq_length 512), the parity texts past it must still match the reference; one
    token more is refused."""
    family, checkpoint, repo = encoder
    m = Manifest.load(repo)
    limit = inspect_checkpoint(checkpoint).max_positions
    assert limit == 512
    if family in FULL_TABLE:
        assert m.max_length == limit and m.variants["fp32"].parity.passed
    assert run_export("--model", checkpoint, "--out", tmp_path / "x", "--max-length", limit + 1) == 2


def test_cross_encoder_exports_with_its_family_layout(cross_encoder: tuple[Family, Path, Path]) -> None:
    family, _, repo = cross_encoder
    m = Manifest.load(repo)
    _check_graph(m, family)
    assert (m.task, m.output_dim, m.pooling, m.labels) == ("cross-encoder", 1, None, [])
    assert m.variants["fp32"].parity.max_abs_diff is not None


def test_cross_encoder_serves_the_reference_scores(cross_encoder: tuple[Family, Path, Path]) -> None:
    from recserve.export.reference import reference_logits

    _, checkpoint, repo = cross_encoder
    pairs = parity_pairs()
    candidates = [item for _, item in pairs[:40]]
    with serving(repo, metrics_port=None) as server:
        stub = server.stub()
        for query in (pairs[5][0], pairs[40][0], ""):
            expected = reference_logits(checkpoint, [(query, c) for c in candidates])[:, -1]
            reply = stub.Score(pb.ScoreRequest(query_text=query, candidates=candidates))
            np.testing.assert_allclose(reply.scores, expected, rtol=0, atol=1e-4)


def test_attention_that_does_not_fuse_ships_unfused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the attention_bias rewrite, ONNX Runtime cannot fuse MPNet's attention: the export still
    ships, says why, and records it."""
    from recserve.export import onnx_export

    monkeypatch.setattr(onnx_export, "lift_attention_bias", lambda graph: {})
    checkpoint = build_encoder(tmp_path / "checkpoint", "mpnet")
    assert run_export("--model", checkpoint, "--out", tmp_path / "repo", "--variants", "fp32") == 0
    m = Manifest.load(tmp_path / "repo")
    assert "Attention" not in m.export.fused_ops and m.variants["fp32"].parity.passed
    (warning,) = m.export.warnings
    assert "attention fused in 0 of 2 layers" in warning and "relative position bias" in warning
    assert f"warning: {warning}" in capsys.readouterr().out


def test_fused_graph_computes_what_the_plain_graph_does(
    encoder: tuple[Family, Path, Path], tmp_path: Path
) -> None:
    """Timing may ship the plain fp32 graph, so the fused one (which fp16 is built from) is checked here,
    MPNet's lifted attention bias included."""
    from recserve.export import onnx_export
    from recserve.runner import GraphSpec, TextRunner

    _, checkpoint, repo = encoder
    m = Manifest.load(repo)
    plain, inputs, _ = onnx_export.export_plain(inspect_checkpoint(checkpoint), "embedding", tmp_path)
    ops = onnx_export.fuse(plain, inspect_checkpoint(checkpoint), tmp_path / "fused.onnx")
    assert ops["Attention"] == TINY_LAYERS
    spec = GraphSpec("embedding", tuple(inputs), m.output_name, m.pooling, m.normalize, m.pad_token_id)
    texts = parity_texts()
    fused = TextRunner.open(tmp_path / "fused.onnx", repo / m.tokenizer_file, spec)(texts, batch_size=16)
    unfused = TextRunner.open(plain, repo / m.tokenizer_file, spec)(texts, batch_size=16)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=1e-5)
