"""Session-wide fixtures: tiny checkpoints built offline, their exported repositories, and the real default
model (all-MiniLM-L6-v2) exported once per test session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# NOTE: the tests never download; the Makefile sets these too, this covers a bare `pytest`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """`recserve serve` run in-process configures the root logger onto pytest's capture stream, which is
    closed once that test ends; later tests would log into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_bert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 32-wide BertModel in sentence-transformers layout (mean pooling, normalised)."""
    from tests.support.checkpoints import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_bert_checkpoint: Path) -> Path:
    """tiny_bert_checkpoint exported (task embedding, fp32, fp16 and int8)."""
    from tests.support.export import run_export

    out = tmp_path_factory.mktemp("tiny-repo") / "repo"
    assert run_export("--model", tiny_bert_checkpoint, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def tiny_cross_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 32-wide BertForSequenceClassification (one logit) in transformers layout."""
    from tests.support.checkpoints import build_tiny_cross

    return build_tiny_cross(tmp_path_factory.mktemp("tiny-cross") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_cross_repo(tmp_path_factory: pytest.TempPathFactory, tiny_cross_checkpoint: Path) -> Path:
    """tiny_cross_checkpoint exported as a cross-encoder (fp32, fp16 and int8)."""
    from tests.support.export import run_export

    out = tmp_path_factory.mktemp("tiny-cross-repo") / "repo"
    assert run_export("--model", tiny_cross_checkpoint, "--out", out, "--task", "cross-encoder") == 0
    return out


@pytest.fixture(scope="session")
def minilm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exported once per session, as `make serve` does (about a minute on 2 cores)."""
    from tests.support.export import run_export

    out = tmp_path_factory.mktemp("minilm") / "repo"
    # 0: every variant (fp32, fp16, int8) passed its gate and was written.
    assert run_export("--out", out) == 0
    return out
