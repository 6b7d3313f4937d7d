"""`recserve index`: a JSON Lines file of items becomes a catalog of their vectors, embedded by a model
repository through the server's own runtime and batcher.

NOTE: `configure` runs for every `recserve` invocation, so this module imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Embed a catalog of items with a model repository (the server's runtime and batcher, in-process) and write
it as a directory the server memory-maps: L2-normalised vectors, ids, texts, attributes, and manifest.json
naming the model by its weights' sha256 (a server refuses a catalog built by another model).
ITEMS is JSON Lines: {"id": "sku-1", "text": "red running shoe", "category": "shoes", "price": 59.9}.
Every line is checked before the model runs. Writing is atomic: nothing at --out until it is complete.
Exit codes: 0 done; 1 the build failed; 2 bad input; 130 interrupted (nothing written)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model-repo", type=Path, required=True, metavar="DIR", help="model repository (recserve export)"
    )
    parser.add_argument("--items", type=Path, required=True, metavar="ITEMS", help="JSON Lines file of items")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="CATALOG", help="catalog directory to create"
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="stored vectors: float16 halves memory and disk, float32 searches without converting "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ann",
        action="store_true",
        help="also build an HNSW index for approximate search (needs: pip install 'recserve[ann]')",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only if it is a catalog)"
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="ONNX Runtime threads (default: one per core)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="as for serve")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto", help="as for serve"
    )


def _fail(message: str, code: int) -> int:
    print(f"recserve index: error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recserve.catalog.errors import CatalogError, ItemsError
    from recserve.export.errors import ExportError
    from recserve.export.repository import check_target
    from recserve.manifest import Manifest, ManifestError

    # Everything that can be checked without the model is, first: the target, every line, the repository.
    try:
        check_target(args.out, args.force)
        from recserve.catalog.items import read_items

        items = read_items(args.items)
        manifest = Manifest.load(args.model_repo)
        if manifest.task != "embedding":
            raise CatalogError(
                f"{args.model_repo} holds a {manifest.task}; a catalog needs an embedding model"
            )
        if args.ann:
            from recserve.catalog.ann import require_usearch

            require_usearch()
        if args.threads is not None and args.threads < 1:
            raise CatalogError(f"--threads must be at least 1, got {args.threads}")
    except (ExportError, ItemsError, ManifestError, CatalogError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)

    try:
        from recserve.catalog.build import Progress, build_catalog, index_settings
        from recserve.server.runtime import RuntimeSelectionError, load_model
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        return _fail("onnxruntime is not installed: pip install 'recserve[cpu]'", EXIT_BAD_INPUT)
    from recserve.server.errors import ServeError

    try:
        settings = index_settings(args.model_repo, args.threads, args.device, args.precision)
        model = load_model(settings)
    except ValidationError as exc:
        return _fail(str(exc.errors()[0]["msg"]), EXIT_BAD_INPUT)
    except (ManifestError, RuntimeSelectionError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(
        f"recserve index: {len(items):,} items, model {manifest.model_name} "
        f"({model.backend.precision} on {model.backend.provider})",
        file=sys.stderr,
    )
    try:
        written = build_catalog(
            model,
            settings,
            items,
            args.out,
            args.dtype,
            ann=args.ann,
            force=args.force,
            progress=Progress(len(items), "embedding"),
        )
    except KeyboardInterrupt:  # the staging directory is already gone; say so instead of a traceback
        return _fail(f"interrupted; nothing was written to {args.out}", EXIT_INTERRUPTED)
    except (ExportError, CatalogError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ServeError as exc:
        return _fail(f"embedding failed: {exc}", EXIT_FAILED)
    note = f"; {written.truncated_texts:,} texts were cut at {manifest.max_length} tokens" * bool(
        written.truncated_texts
    )
    ann = f", ANN index in {written.ann.build_seconds:.1f} s" if written.ann else ""
    print(
        f"recserve index: wrote {written.count:,} x {written.model.dimension} {written.dtype} to {args.out} "
        f"in {written.build_seconds:.1f} s{ann}{note}",
        file=sys.stderr,
    )
    return 0
