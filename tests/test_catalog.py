"""Catalogs without a real model: items validation, the build through Engine/Batcher on the fake model,
the directory format and its refusals, and search (exact against a brute-force reference, filters,
exclusions, ties, errors, threads, approximate)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.catalog import search as search_module
from recserve.catalog.build import Progress, build_catalog, index_settings
from recserve.catalog.errors import CatalogFormatError, InvalidQuery, ItemsError, ModelMismatch, UnknownIds
from recserve.catalog.items import AttributeColumn, Items, read_items
from recserve.catalog.search import MAX_K, Filter, recall_at_k
from recserve.catalog.store import Catalog, CatalogWriter, Dtype, ModelInfo
from recserve.export.errors import ExportError
from recserve.server.errors import ServeError
from recserve.tensors import FloatArray, l2_normalize
from tests.support.fake_model import fake_model

SHA = "ab" * 32


def write_jsonl(path: Path, records: Sequence[dict[str, Any] | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def records(count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(count):
        record: dict[str, Any] = {"id": f"sku-{i:04d}", "text": f"item {i} " + "word " * (i % 9)}
        if i % 5:  # every fifth item has no category
            record["category"] = ["shoes", "hats", "bags"][i % 3]
        record["price"] = float(i % 50)
        out.append(record)
    return out


def write_catalog(
    directory: Path,
    vectors: FloatArray,
    ids: Sequence[str] | None = None,
    attributes: dict[str, list[Any]] | None = None,
    dtype: Dtype = "float32",
    ann: bool = False,
) -> Catalog:
    """A catalog of given vectors (normalised here), without a model; rows are put in id order."""
    count, dimension = vectors.shape
    ids = list(ids or [f"i{i:05d}" for i in range(count)])
    order = sorted(range(count), key=ids.__getitem__)
    columns = {}
    for name, values in (attributes or {}).items():
        kind = "number" if any(isinstance(v, float) for v in values) else "string"
        columns[name] = AttributeColumn(name, kind, 1, [values[i] for i in order])  # type: ignore[arg-type]
    items = Items([ids[i] for i in order], [f"text of {ids[i]}" for i in order], columns)
    directory.mkdir(parents=True)
    writer = CatalogWriter(directory, count, dimension, dtype)
    writer.put(slice(0, count), l2_normalize(vectors[order].astype(np.float32)))
    writer.finish(
        items, ModelInfo(name="m", weights_sha256=SHA, dimension=dimension), ann={} if ann else None
    )
    del writer
    return Catalog.open(directory)


def reference(
    catalog: Catalog, query: FloatArray, k: int, exclude: Sequence[str] = (), allowed: Any = None
) -> tuple[list[str], FloatArray]:
    """Brute force: every score, blocked rows dropped, sorted by (-score, id)."""
    unit = query / np.linalg.norm(query)
    scores = np.asarray(catalog.vectors, dtype=np.float32) @ unit.astype(np.float32)
    rows = [
        r for r in range(len(catalog)) if catalog.ids[r] not in exclude and (allowed is None or allowed(r))
    ]
    rows.sort(key=lambda r: (-scores[r], catalog.ids[r]))
    top = rows[:k]
    return [catalog.ids[r] for r in top], scores[top]


# --- items --------------------------------------------------------------------------------------------
def test_items_are_read_sorted_by_id_with_typed_attributes(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "items.jsonl",
        [
            {"id": "b", "text": "second", "category": "hats", "price": 3},
            "",
            {"id": "a", "text": "first", "price": 2.5, "colour": None},
            "   ",
            {"id": "c", "text": "third", "category": "shoes"},
        ],
    )
    items = read_items(path)
    assert items.ids == ["a", "b", "c"]
    assert items.texts == ["first", "second", "third"]
    assert {name: c.type for name, c in items.attributes.items()} == {"category": "string", "price": "number"}
    assert items.attributes["category"].values == [None, "hats", "shoes"]
    assert items.attributes["price"].values == [2.5, 3.0, None]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], ":2: duplicate id 'a' (first on line 1)"),
        (['{"id": "a", "text": "x"}', '{"id": "b", "text": "  "}'], ":2: text is empty (id 'b')"),
        (['{"id": "a", "text": "x"}', "", '{"id": "b", "text": '], ":3: not valid JSON"),
        (['{"text": "x"}'], ":1: the field 'id' is missing"),
        (['{"id": "a"}'], ":1: the field 'text' is missing"),
        (['{"id": 7, "text": "x"}'], ":1: id must be a string, got int (7): quote it"),
        (['{"id": "", "text": "x"}'], ":1: id is empty"),
        (['["a"]'], ":1: expected a JSON object, got a list"),
        (
            ['{"id": "a", "text": "x", "price": 3}', '{"id": "b", "text": "y", "price": "3"}'],
            ":2: attribute 'price' is a string here but a number on line 1",
        ),
        (['{"id": "a", "text": "x", "new": true}'], ":1: attribute 'new' is a boolean"),
        (['{"id": "a", "text": "x", "price": NaN}'], ":1: not valid JSON: NaN is not a JSON number"),
        ([""], "holds no items"),
    ],
)
def test_a_bad_items_file_is_one_line_naming_its_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write_jsonl(tmp_path / "items.jsonl", lines)
    with pytest.raises(ItemsError) as caught:
        read_items(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_items_that_are_not_utf8_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff"}\n')
    with pytest.raises(ItemsError, match=r"items.jsonl:2: not UTF-8"):
        read_items(path)


# --- build ---------------------------------------------------------------------------------------------
def test_build_embeds_through_the_batcher_and_writes_every_part(tmp_path: Path) -> None:
    model = fake_model(dim=8)
    items = read_items(write_jsonl(tmp_path / "items.jsonl", records(300)))
    lines: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            return

        def isatty(self) -> bool:
            return False

    progress = Progress(len(items), "embedding", stream=Lines(), interval_s=0.0)  # type: ignore[arg-type]
    manifest = build_catalog(model, index_settings(tmp_path), items, tmp_path / "cat", progress=progress)
    catalog = Catalog.open(tmp_path / "cat")

    assert manifest.count == len(catalog) == 300
    assert (catalog.weights_sha256, catalog.model_name, catalog.dimension) == ("0" * 64, "fake-embedding", 8)
    assert catalog.manifest.dtype == "float16" and catalog.vectors.dtype == np.float16
    assert catalog.ids == sorted(r["id"] for r in records(300))
    np.testing.assert_allclose(catalog.vectors_for(catalog.ids), model.expected(items.texts), atol=2e-3)
    assert catalog.texts_for([0, 299]) == [items.texts[0], items.texts[299]]
    # Chunks in flight at once fill the batches: the model saw full batches, not one chunk's worth each.
    assert max(model.backend.batches) == 32 and len(model.backend.batches) <= 300 // 32 + 4
    schema = {a.name: (a.type, a.missing) for a in catalog.manifest.attributes}
    assert schema == {"category": ("string", 60), "price": ("number", 0)}
    category = catalog.attributes["category"]
    assert category.type == "string" and category.vocabulary == ("bags", "hats", "shoes")
    assert category.value(0) is None and category.value(1) == "hats"
    assert lines[-1].startswith("embedding 300/300 items (100%)") and "items/s" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "items.jsonl"]


def test_a_float32_build_stores_the_model_vectors(tmp_path: Path) -> None:
    model = fake_model(dim=8)
    items = read_items(write_jsonl(tmp_path / "items.jsonl", records(40)))
    build_catalog(model, index_settings(tmp_path), items, tmp_path / "cat", dtype="float32")
    catalog = Catalog.open(tmp_path / "cat")
    np.testing.assert_allclose(catalog.vectors_for(catalog.ids), model.expected(items.texts), atol=1e-6)


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    model = fake_model(dim=8)
    model.backend.fail = lambda batch: len(model.backend.batches) >= 2
    items = read_items(write_jsonl(tmp_path / "items.jsonl", records(300)))
    with pytest.raises(ServeError, match="inference failed"):
        build_catalog(model, index_settings(tmp_path), items, tmp_path / "cat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl"]


def test_an_existing_target_is_refused_unless_forced(tmp_path: Path) -> None:
    model = fake_model(dim=8)
    items = read_items(write_jsonl(tmp_path / "items.jsonl", records(10)))
    settings = index_settings(tmp_path)
    build_catalog(model, settings, items, tmp_path / "cat")
    with pytest.raises(ExportError, match="already exists"):
        build_catalog(model, settings, items, tmp_path / "cat")
    build_catalog(model, settings, items, tmp_path / "cat", dtype="float32", force=True)
    assert Catalog.open(tmp_path / "cat").manifest.dtype == "float32"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        build_catalog(model, settings, items, tmp_path / "other", force=True)


# --- the directory -------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path: Path) -> Catalog:
    vectors = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    return write_catalog(tmp_path / "cat", vectors, dtype="float16")


def test_a_truncated_file_is_named(small: Catalog) -> None:
    path = small.path / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CatalogFormatError) as caught:
        Catalog.open(small.path)
    assert f"catalog file {path} has" in str(caught.value) and "truncated" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_corrupt_bytes_are_found_by_the_checksum(small: Catalog) -> None:
    path = small.path / "texts.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CatalogFormatError, match=r"texts.bin does not match the manifest's sha256"):
        Catalog.open(small.path)
    Catalog.open(small.path, verify=False)  # sizes and shapes still fit


def test_a_rewritten_array_of_the_wrong_shape_is_named(small: Catalog) -> None:
    manifest = json.loads((small.path / "manifest.json").read_text())
    np.save(small.path / "vectors.npy", np.zeros((49, 16), dtype=np.float16))
    manifest["files"]["vectors.npy"]["bytes"] = (small.path / "vectors.npy").stat().st_size
    (small.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CatalogFormatError, match=r"vectors.npy holds float16 \[49, 16\], expected float16 \[50, 16\]"
    ):
        Catalog.open(small.path, verify=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "manifest.json").unlink(), "is not a catalog: manifest.json is missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json cannot be read"),
        (lambda p: (p / "manifest.json").write_text('{"kind": "model"}'), "is not a catalog manifest"),
        (lambda p: (p / "ids.bin").unlink(), "ids.bin cannot be read"),
    ],
)
def test_a_broken_directory_is_one_line(small: Catalog, damage: Any, message: str) -> None:
    damage(small.path)
    with pytest.raises(CatalogFormatError, match=message):
        Catalog.open(small.path)


def test_a_catalog_refuses_another_model(small: Catalog) -> None:
    small.check_model(SHA)
    with pytest.raises(ModelMismatch) as caught:
        small.check_model("cd" * 32)
    assert SHA in str(caught.value) and "cd" * 32 in str(caught.value)


def test_ids_are_looked_up_and_unknown_ones_listed(small: Catalog) -> None:
    assert small.index_of(["i00007", "i00002"]).tolist() == [7, 2]
    np.testing.assert_array_equal(small.vectors_for(["i00003"])[0], small.vectors[3].astype(np.float32))
    with pytest.raises(UnknownIds) as caught:
        small.index_of(["i00001", "nope", "gone"])
    assert isinstance(caught.value, LookupError) and caught.value.code == "NOT_FOUND"
    assert caught.value.ids == ["nope", "gone"] and "'nope', 'gone'" in str(caught.value)


# --- search --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_exact_search_matches_brute_force_over_many_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: Dtype
) -> None:
    monkeypatch.setattr(search_module, "CHUNK_ROWS", 37)
    rng = np.random.default_rng(1)
    catalog = write_catalog(tmp_path / "cat", rng.standard_normal((500, 24)).astype(np.float32), dtype=dtype)
    queries = rng.standard_normal((9, 24)).astype(np.float32) * 3.0  # any scale: scores are cosines
    ks = [1, 5, 10, 40, 37, 36, 38, 500, MAX_K]
    together = catalog.search(queries, ks)
    for query, k, hits in zip(queries, ks, together, strict=True):
        ids, scores = reference(catalog, query, k)
        assert hits.ids == ids
        np.testing.assert_allclose(hits.scores, scores, atol=1e-5)
        assert hits.indices.tolist() == catalog.index_of(ids).tolist()
        alone = catalog.search(query[None, :], k)[0]
        assert alone.ids == hits.ids


def test_equal_scores_go_by_id_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "CHUNK_ROWS", 4)
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    duplicate = rng.standard_normal(8).astype(np.float32)
    ids = [f"x{i:02d}" for i in range(30)]
    for row in (3, 9, 14, 15, 27):  # the same text under five ids, in different blocks
        vectors[row] = duplicate
    catalog = write_catalog(tmp_path / "cat", vectors, ids)
    for k in (1, 2, 3, 5):
        assert catalog.search(duplicate[None, :], k)[0].ids == ["x03", "x09", "x14", "x15", "x27"][:k]


def test_filters_and_exclusions_apply_before_the_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "CHUNK_ROWS", 16)
    rng = np.random.default_rng(3)
    count = 200
    category = [None if i % 7 == 0 else ["shoes", "hats", "bags"][i % 3] for i in range(count)]
    price = [float("nan") if i % 11 == 0 else float(i % 40) for i in range(count)]
    catalog = write_catalog(
        tmp_path / "cat",
        rng.standard_normal((count, 12)).astype(np.float32),
        attributes={"category": category, "price": price},
    )
    query = rng.standard_normal(12).astype(np.float32)
    best = catalog.search(query[None, :], 30)[0].ids
    price_of = dict(zip(catalog.ids, catalog.attributes["price"].values.tolist(), strict=True))  # type: ignore[union-attr]
    column = catalog.attributes["category"]
    cases = [
        ([Filter("category", ("hats",))], lambda r: column.value(r) == "hats"),  # type: ignore[union-attr]
        ([Filter("category", ["hats", "bags"])], lambda r: column.value(r) in ("hats", "bags")),  # type: ignore[union-attr]
        ([Filter("price", min=10, max=20)], lambda r: 10 <= price_of[catalog.ids[r]] <= 20),
        ([Filter("price", max=5.0)], lambda r: price_of[catalog.ids[r]] <= 5),
        (
            [Filter("category", ("shoes",)), Filter("price", min=30)],
            lambda r: column.value(r) == "shoes" and price_of[catalog.ids[r]] >= 30,  # type: ignore[union-attr]
        ),
        ([Filter("category", ("socks",))], lambda r: False),
    ]
    exclude = best[:10]  # the ten best may not come back: ten others must
    queries = np.stack([query] * len(cases))
    found = catalog.search(
        queries, 10, exclude=[exclude] * len(cases), filters=[filters for filters, _ in cases]
    )
    for (_, allowed), hits in zip(cases, found, strict=True):
        ids, scores = reference(catalog, query, 10, exclude, allowed)
        assert hits.ids == ids
        np.testing.assert_allclose(hits.scores, scores, atol=1e-6)
    assert len(found[0].ids) == 10 and not set(found[0].ids) & set(exclude)
    assert found[-1].ids == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c, q: c.search(q, 0), InvalidQuery, "k is 0; it must be between 1 and 1000"),
        (lambda c, q: c.search(q, MAX_K + 1), InvalidQuery, "k is 1001"),
        (lambda c, q: c.search(q, [1, 2]), InvalidQuery, "2 values of k for 1 queries"),
        (lambda c, q: c.search(q[:, :3], 1), InvalidQuery, r"must be a \[count >= 1, 16\] array"),
        (lambda c, q: c.search(q * 0, 1), InvalidQuery, "all zeros"),
        (lambda c, q: c.search(q * np.nan, 1), InvalidQuery, "NaN"),
        (
            lambda c, q: c.search(q, 1, exclude=[["i00001", "zz"]]),
            UnknownIds,
            "1 id\\(s\\) not in the catalog: 'zz'",
        ),
        (lambda c, q: c.search(q, 1, exclude=[[], []]), InvalidQuery, "exclude has 2 entries for 1 queries"),
        (
            lambda c, q: c.search(q, 1, filters=[[Filter("colour", ("red",))]]),
            InvalidQuery,
            "no attribute 'colour'",
        ),
        (lambda c, q: c.search(q, 1, filters=[[Filter("genre", min=1)]]), InvalidQuery, "string attribute"),
        (
            lambda c, q: c.search(q, 1, filters=[[Filter("year", ("1999",))]]),
            InvalidQuery,
            "number attribute",
        ),
        (lambda c, q: c.search(q, 1, filters=[[Filter("year")]]), InvalidQuery, "number attribute"),
        (
            lambda c, q: c.search(q, 1, filters=[[Filter("year", min=3, max=2)]]),
            InvalidQuery,
            "min 3 is above max 2",
        ),
        (lambda c, q: c.search(q, 1, filters=[[Filter("year", min=float("inf"))]]), InvalidQuery, "finite"),
        (lambda c, q: c.search(q, 1, exact=False), InvalidQuery, "has no approximate index"),
    ],
)
def test_a_bad_search_is_refused_clearly(
    tmp_path: Path, call: Any, error: type[Exception], message: str
) -> None:
    rng = np.random.default_rng(4)
    catalog = write_catalog(
        tmp_path / "cat",
        rng.standard_normal((20, 16)).astype(np.float32),
        attributes={"genre": ["a"] * 20, "year": [1990.0 + i for i in range(20)]},
    )
    with pytest.raises(error, match=message):
        call(catalog, rng.standard_normal((1, 16)).astype(np.float32))
    assert issubclass(InvalidQuery, ServeError) and InvalidQuery.code == "INVALID_ARGUMENT"


def test_search_from_many_threads_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    catalog = write_catalog(
        tmp_path / "cat", rng.standard_normal((3000, 16)).astype(np.float32), dtype="float16"
    )
    queries = rng.standard_normal((32, 16)).astype(np.float32)
    expected = [h.ids for h in catalog.search(queries, 10)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: catalog.search(queries[i : i + 1], 10)[0].ids, range(32)))
    assert got == expected


def clustered(rng: np.random.Generator, count: int, dimension: int) -> FloatArray:
    centres = rng.standard_normal((20, dimension)).astype(np.float32)
    return (centres[rng.integers(0, 20, count)] + 0.3 * rng.standard_normal((count, dimension))).astype(
        np.float32
    )


def test_approximate_search_recalls_and_filters(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    count = 2000
    vectors = clustered(rng, count, 32)
    tags = [f"t{i % 50}" for i in range(count)]
    catalog = write_catalog(tmp_path / "cat", vectors, attributes={"tag": tags}, dtype="float16", ann=True)
    queries = clustered(rng, 40, 32)
    assert recall_at_k(catalog, queries, 10) >= 0.95
    # Scores of approximate hits are the exact ones of the same rows.
    approximate, exact = catalog.search(queries[:1], 10, exact=False)[0], catalog.search(queries[:1], 10)[0]
    same = [i for i in approximate.ids if i in exact.ids]
    np.testing.assert_allclose(
        approximate.scores[[approximate.ids.index(i) for i in same]],
        exact.scores[[exact.ids.index(i) for i in same]],
        atol=1e-6,
    )
    # Post-filtered; a filter kept by 2% of the rows goes to exact search (and so equals it).
    exclude = [exact.ids[:3]] * 2
    filters = [[Filter("tag", ("t3", "t4", "t5", "t6", "t7", "t8"))], [Filter("tag", ("t7",))]]
    queries_twice = np.stack([queries[0]] * 2)
    approximate_hits = catalog.search(queries_twice, 10, exclude=exclude, filters=filters, exact=False)
    exact_hits = catalog.search(queries_twice, 10, exclude=exclude, filters=filters)
    column = catalog.attributes["tag"]
    for hits, condition in zip(approximate_hits, filters, strict=True):
        assert len(hits.ids) == 10 and not set(hits.ids) & set(exclude[0])
        assert {column.value(r) for r in hits.indices.tolist()} <= set(condition[0].values)  # type: ignore[union-attr]
    assert approximate_hits[1].ids == exact_hits[1].ids
