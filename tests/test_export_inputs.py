"""Bad checkpoints the issue names: no fast tokenizer, a max length that is absent or absurd, sharded
weights, an unknown architecture. Each gets one line naming the problem, exit code 2, and no repository
(not even half of one) where --out points."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recserve.export.checkpoint import inspect_checkpoint
from tests.support.export import run_export


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _fails(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """Runs the export; asserts exit 2, one line on stderr, no traceback, nothing left; returns the line."""
    out = tmp_path / "parent" / "repo"
    assert run_export("--model", model, "--out", out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "a staging directory was left"
    return err


def test_no_fast_tokenizer(
    tiny_cross_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy(tiny_cross_checkpoint, tmp_path / "ckpt")
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        (model / name).unlink()
    # A tokenizer class transformers has no fast version of, and which needs no vocabulary file.
    (model / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CanineTokenizer", "model_max_length": 128})
    )
    err = _fails(model, tmp_path, capsys)
    assert "has no fast (Rust) tokenizer, which the server needs: CanineTokenizer has no fast version" in err


def test_max_length_absent(
    tiny_cross_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy(tiny_cross_checkpoint, tmp_path / "ckpt")
    # transformers writes int(1e30) when a tokenizer has no limit: that is no max length either.
    _edit_json(model / "tokenizer_config.json", model_max_length=int(1e30))
    err = _fails(model, tmp_path, capsys)
    assert "sets no max length" in err and "pass --max-length N (2 to 512" in err
    _edit_json(model / "tokenizer_config.json", model_max_length=None)
    assert "sets no max length" in _fails(model, tmp_path, capsys)
    # Told on the command line, the export has what it needs.
    assert inspect_checkpoint(model).default_max_length is None
    assert (
        run_export("--model", model, "--out", tmp_path / "ok", "--variants", "fp32", "--max-length", "64")
        == 0
    )


@pytest.mark.parametrize("value", [100_000, 0, 513, "long", 12.5])
def test_max_length_absurd(
    value: object, tiny_bert_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy(tiny_bert_checkpoint, tmp_path / "ckpt")
    _edit_json(model / "sentence_bert_config.json", max_seq_length=value)
    err = _fails(model, tmp_path, capsys)
    assert f"max_seq_length {value!r} in" in err and "pass --max-length" in err
    assert "absurd: the position table holds 512 tokens" in err or "not a whole number of tokens" in err


def test_sharded_weights(
    tiny_cross_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    model = _copy(tiny_cross_checkpoint, tmp_path / "ckpt")
    (model / "model.safetensors").unlink()
    loaded = AutoModelForSequenceClassification.from_pretrained(tiny_cross_checkpoint)
    loaded.save_pretrained(model, max_shard_size="200KB")
    shards = sorted(p.name for p in model.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model / "model.safetensors.index.json").is_file()
    err = _fails(model, tmp_path, capsys)
    assert f"are sharded (model.safetensors.index.json, {len(shards)} shards)" in err
    assert "save it again as one file" in err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["BertForTelepathy"]}, "architecture 'BertForTelepathy' in"),
        ({"architectures": ["RobertaModel"]}, "architecture 'RobertaModel' in"),
        ({"auto_map": {"AutoModel": "modeling.MyBert"}}, "maps its classes to custom code (auto_map)"),
        ({"model_type": "t5", "architectures": ["T5EncoderModel"]}, "is not a supported encoder"),
        ({"num_attention_heads": "twelve"}, "num_attention_heads must be a positive integer"),
        ({"max_position_embeddings": None}, "has no max_position_embeddings"),
    ],
)
def test_unknown_architecture_or_broken_config(
    changes: dict[str, object],
    message: str,
    tiny_cross_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = _copy(tiny_cross_checkpoint, tmp_path / "ckpt")
    _edit_json(model / "config.json", **changes)
    assert message in _fails(model, tmp_path, capsys)
