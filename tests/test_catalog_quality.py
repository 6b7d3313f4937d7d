"""The quality check's metrics and data sets, and the catalog benchmark, at sizes a test can afford."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from recserve.benchmarks.catalog_bench import markdown as bench_markdown
from recserve.benchmarks.catalog_bench import run_catalog_bench
from recserve.catalog.build import build_catalog, embed_texts, index_settings
from recserve.catalog.items import read_items
from recserve.catalog.quality import (
    EvalQuery,
    K,
    markdown,
    movielens,
    recall_ndcg,
    run_set,
    synthetic,
)
from recserve.catalog.store import Catalog
from recserve.tensors import FloatArray
from tests.support.fake_model import fake_model


def test_recall_and_ndcg() -> None:
    relevant = frozenset({"a", "b"})
    assert recall_ndcg(["a", "b", "x"], relevant) == (1.0, 1.0)
    recall, ndcg = recall_ndcg(["x", "a", "y"], relevant)
    assert recall == 0.5
    assert ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert recall_ndcg(["x"] * 20 + ["a"], relevant) == (0.0, 0.0)  # beyond k


def write_movielens(directory: Path) -> Path:
    """A five-film, three-user ml-100k in RecBole's atomic-file layout."""
    directory.mkdir()
    (directory / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction\n"
        "3\tFour Rooms\t1995\tThriller\n4\tGet Shorty\t1995\tComedy\n5\tCopycat\t\tCrime\n"
    )
    rows = [
        (1, 1, 5, 10), (1, 2, 4, 20), (1, 3, 2, 30), (1, 4, 5, 40),  # liked 1, 2 then 4: 4 is held out
        (2, 1, 5, 10), (2, 5, 1, 20),  # one liked film: no query
        (3, 2, 4, 10), (3, 1, 4, 11),
    ]  # fmt: skip
    (directory / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    )
    return directory


def test_movielens_holds_out_each_users_last_liked_film(tmp_path: Path) -> None:
    evalset = movielens(write_movielens(tmp_path / "ml"))
    assert [r["text"] for r in evalset.records[:2]] == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "GoldenEye (1995). Genres: Action.",
    ]
    assert evalset.records[4] == {"id": "5", "text": "Copycat. Genres: Crime.", "genre": "Crime"}
    first, second = evalset.queries
    assert first == EvalQuery(frozenset({"4"}), history=("1", "2"), exclude=frozenset({"1", "2", "3"}))
    assert second == EvalQuery(frozenset({"1"}), history=("2",), exclude=frozenset({"2"}))
    # Popularity counts the liked interactions that are not held out (1 and 2 twice each), ties by id.
    assert evalset.baselines["popularity"] == [["4", "5"], ["1", "3", "4", "5"]]


def test_the_synthetic_set_has_known_answers() -> None:
    evalset = synthetic()
    assert len(evalset.records) == 2000 and len(evalset.queries) == 600
    assert len({r["id"] for r in evalset.records}) == 2000
    assert all(len(q.relevant) == 10 and q.text for q in evalset.queries)


def test_run_set_builds_searches_and_reports(tmp_path: Path) -> None:
    model = fake_model(dim=16)
    settings = index_settings(tmp_path)

    def build(items_file: Path, out: Path) -> Catalog:
        build_catalog(model, settings, read_items(items_file), out, ann=True)
        return Catalog.open(out)

    def embed(texts: Sequence[str]) -> FloatArray:
        return embed_texts(model, settings, texts)

    evalset = movielens(write_movielens(tmp_path / "ml"))
    report = run_set(evalset, build, embed, tmp_path)
    assert report["items"] == 5 and report["queries"] == 2
    assert set(report) >= {"exact", "approximate", "popularity", "random"}
    assert report["popularity"][f"recall@{K}"] == 1.0
    table = markdown({"movielens-100k": report})
    assert "| movielens-100k (5 items, 2 queries) | popularity | 1.000 |" in table
    # Text queries go through the same engine as the build: the fake model's own vector of a text.
    np.testing.assert_allclose(embed(["hello world"]), model.expected(["hello world"]), atol=1e-6)


def test_catalog_bench_at_a_small_size(tmp_path: Path) -> None:
    result = run_catalog_bench(sizes=(10_000,), rounds=3, workdir=tmp_path, dimension=64)
    figures = result["sizes"]["10000"]
    for mode in ("exact", "approximate"):
        for callers in ("1", "16"):
            row = figures[mode][callers]
            assert 0 < row["p50_ms"] <= row["p99_ms"] and row["calls"] == 3
    assert figures["recall@10"] >= 0.9
    bare = figures["versus_bare"]["16"]
    assert set(bare) == {
        "bare_float32",
        "search_float32",
        "search_float16",
        "conversion_only",
        "bare_float16_as_stored",
    }
    assert bare["bare_float32"]["x_bare"] == 1.0
    table = bench_markdown(result)
    assert "| 10,000 | exact | 16 |" in table and "| 16 | search_float16 |" in table
    assert list(tmp_path.iterdir()) == []  # its catalogs are removed
