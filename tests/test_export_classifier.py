"""Classifier export: a sequence-classification checkpoint with several labels becomes task `classifier`,
its labels and multi-label flag in the manifest, gated on its logits and on its arg-max label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recserve.export import parity
from recserve.export.checkpoint import inspect_checkpoint
from recserve.export.parity_texts import parity_texts
from recserve.manifest import Manifest
from recserve.runner import GraphSpec, TextRunner, encode, open_session
from recserve.tensors import pad
from tests.support.checkpoints import build_tiny_classifier
from tests.support.export import run_export


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("classifier")
    checkpoint = build_tiny_classifier(tmp / "checkpoint")
    assert run_export("--model", checkpoint, "--out", tmp / "repo") == 0
    return checkpoint, tmp / "repo"


@pytest.fixture(scope="module")
def chinese(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("chinese")
    checkpoint = build_tiny_classifier(tmp / "checkpoint", chinese=True)
    assert run_export("--model", checkpoint, "--out", tmp / "repo", "--variants", "fp32") == 0
    return checkpoint, tmp / "repo"


def _logits(repo: Path, texts: list[str]) -> np.ndarray:
    """The exported graph's logits, straight from ONNX Runtime (no runner on top)."""
    from tokenizers import Tokenizer

    m = Manifest.load(repo)
    session = open_session(repo / m.variants["fp32"].file)
    tokenizer = Tokenizer.from_file(str(repo / m.tokenizer_file))
    rows = []
    for text in texts:  # one at a time: no padding involved
        feeds, _ = pad(encode(tokenizer, [text]), m.pad_token_id, m.inputs)
        rows.append(session.run([m.output_name], feeds)[0][0])
    return np.stack(rows)


def test_several_labels_make_a_classifier(classifier: tuple[Path, Path]) -> None:
    checkpoint, repo = classifier
    assert inspect_checkpoint(checkpoint).default_task() == "classifier"
    m = Manifest.load(repo)
    assert (m.task, m.architecture, m.output_name) == (
        "classifier",
        "BertForSequenceClassification",
        "logits",
    )
    assert (m.labels, m.multi_label, m.output_dim, m.pooling) == (
        ["label_0", "label_1", "label_2"],
        False,
        3,
        None,
    )
    assert set(m.variants) == {"fp32", "fp16", "int8"}
    for name, v in m.variants.items():
        assert v.parity.passed and v.parity.label_agreement == 1.0, name
        assert v.parity.max_abs_diff is not None and v.parity.max_abs_diff <= v.parity.threshold
        assert v.parity.texts == len(parity_texts())


def test_classifier_logits_and_labels_are_the_reference(classifier: tuple[Path, Path]) -> None:
    from recserve.export.reference import reference_logits

    checkpoint, repo = classifier
    texts = parity_texts()[:40]
    expected = reference_logits(checkpoint, texts)
    got = _logits(repo, texts)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_a_changed_label_fails_the_gate(classifier: tuple[Path, Path]) -> None:
    """The reference with its labels rotated: the logits are off and every arg-max differs."""
    from recserve.export.reference import reference_logits

    checkpoint, repo = classifier
    texts = parity_texts()[:64]
    m = Manifest.load(repo)
    spec = GraphSpec("classifier", tuple(m.inputs), m.output_name, None, False, m.pad_token_id)
    runner = TextRunner.open(repo / m.variants["fp32"].file, repo / m.tokenizer_file, spec)
    rotated = np.roll(reference_logits(checkpoint, texts), 1, axis=1)
    check = parity.check_variant(runner, "fp32", texts, rotated, labelled=True)
    assert not check.passed and check.label_agreement is not None and check.label_agreement < 1.0
    assert any(w["metric"] == "label" for w in check.worst)
    assert "arg-max label differs on" in parity.describe_failure("fp32", check)


def test_multi_label_is_recorded(tmp_path: Path) -> None:
    checkpoint = build_tiny_classifier(tmp_path / "checkpoint", num_labels=4, multi_label=True)
    assert run_export("--model", checkpoint, "--out", tmp_path / "repo", "--variants", "fp32") == 0
    m = Manifest.load(tmp_path / "repo")
    assert (m.task, m.multi_label, len(m.labels)) == ("classifier", True, 4)


def test_chinese_classifier_tokenises_one_character_per_token(chinese: tuple[Path, Path]) -> None:
    from tokenizers import Tokenizer

    _, repo = chinese
    m = Manifest.load(repo)
    assert (m.task, m.labels) == ("classifier", ["负面", "中性", "正面"])
    assert m.variants["fp32"].parity.passed and m.variants["fp32"].parity.label_agreement == 1.0
    tokenizer = Tokenizer.from_file(str(repo / "tokenizer.json"))
    assert tokenizer.encode("推荐一些科幻电影").tokens == ["[CLS]", *"推荐一些科幻电影", "[SEP]"]


def test_one_label_is_a_cross_encoder_not_a_classifier(
    tiny_cross_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inspect_checkpoint(tiny_cross_checkpoint).default_task() == "cross-encoder"
    assert run_export("--model", tiny_cross_checkpoint, "--out", tmp_path / "o", "--task", "classifier") == 2
    assert "task classifier needs two or more labels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_labels_must_name_every_logit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = build_tiny_classifier(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["id2label"] = {"0": "a", "2": "c", "3": "d"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert run_export("--model", checkpoint, "--out", tmp_path / "o") == 2
    assert "id2label must map label ids 0..n-1" in capsys.readouterr().err


def test_a_served_classifier_classifies_as_the_reference(
    classifier: tuple[Path, Path], chinese: tuple[Path, Path]
) -> None:
    """Export -> serve -> Classify over gRPC: the reference's softmax, best labels first, for a Latin and a
    Chinese classifier served side by side."""
    from recserve.export.reference import reference_logits
    from recserve.server.engine import probabilities_of
    from recserve.v1 import inference_pb2 as pb
    from tests.support.serving import ServerThread, settings_for

    texts = ["I want a book about machine learning", "", "我想要一本关于机器学习的书", "jazz " * 200]
    (latin_ckpt, latin), (zh_ckpt, zh) = classifier, chinese
    settings = settings_for(latin, model=[f"zh={zh}"], metrics_port=None, max_text_bytes=1 << 20)
    thread = ServerThread(settings).start()
    try:
        stub = thread.stub()
        for name, checkpoint in (("repo", latin_ckpt), ("zh", zh_ckpt)):
            reply = stub.Classify(pb.ClassifyRequest(model=name, texts=texts, top_k=3), timeout=30)
            expected = probabilities_of(reference_logits(checkpoint, texts), multi_label=False)
            labels = Manifest.load(latin if name == "repo" else zh).labels
            for result, row in zip(reply.results, expected, strict=True):
                order = np.argsort(-row, kind="stable")
                assert [label.label for label in result.labels] == [labels[i] for i in order]
                got = [label.probability for label in result.labels]
                np.testing.assert_allclose(got, row[order], rtol=0, atol=1e-4)
    finally:
        thread.stop()
