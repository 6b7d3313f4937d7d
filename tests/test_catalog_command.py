"""`recserve index` with a real (tiny) exported model: bad input refused before the model loads, a full
build through the server's runtime read back and searched, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.catalog.search import Filter
from recserve.catalog.store import Catalog
from recserve.cli import main
from recserve.manifest import Manifest
from recserve.tensors import l2_normalize
from tests.support.repository import run_repository


def write_items(path: Path, count: int) -> Path:
    colours = ["red", "green", "blue"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            record = {
                "id": f"p{i}",
                "text": f"a {colours[i % 3]} product number {i}",
                "colour": colours[i % 3],
            }
            f.write(json.dumps({**record, "price": i % 100}) + "\n")
    return path


def index(*args: Any) -> int:
    return main(["index", *(str(a) for a in args)])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], "items.jsonl:2: duplicate id 'a'"),
        (['{"id": "a", "text": ""}'], "items.jsonl:1: text is empty"),
        (['{"id": "a", "text": "x"', ""], "items.jsonl:1: not valid JSON"),
    ],
)
def test_bad_items_are_refused_before_the_model_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], message: str
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(lines))
    # The model repository does not exist: the items are checked first.
    assert index("--model-repo", tmp_path / "no-model", "--items", items, "--out", tmp_path / "cat") == 2
    error = capsys.readouterr().err
    assert error.startswith("recserve index: error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "cat").exists()


def test_a_missing_model_or_cross_encoder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_cross_repo: Path
) -> None:
    items = write_items(tmp_path / "items.jsonl", 3)
    assert index("--model-repo", tmp_path / "none", "--items", items, "--out", tmp_path / "cat") == 2
    assert "does not exist" in capsys.readouterr().err
    assert index("--model-repo", tiny_cross_repo, "--items", items, "--out", tmp_path / "cat") == 2
    assert "holds a cross-encoder; a catalog needs an embedding model" in capsys.readouterr().err


def test_index_builds_what_the_server_would_embed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_repo: Path
) -> None:
    items = write_items(tmp_path / "items.jsonl", 300)
    out = tmp_path / "cat"
    assert index("--model-repo", tiny_repo, "--items", items, "--out", out, "--ann", "--threads", "1") == 0
    error = capsys.readouterr().err
    assert "embedding 300/300 items (100%)" in error and f"wrote 300 x 32 float16 to {out}" in error

    catalog = Catalog.open(out)
    manifest = Manifest.load(tiny_repo)
    catalog.check_model(manifest.source.weights_sha256)
    assert catalog.model_name == manifest.model_name and catalog.dimension == 32
    texts = catalog.texts_for(range(len(catalog)))
    expected = l2_normalize(run_repository(tiny_repo, texts))
    np.testing.assert_allclose(catalog.vectors_for(catalog.ids), expected, atol=2e-3)
    # Each item's own vector finds it, exactly and approximately, within its colour.
    colour = catalog.attributes["colour"]
    rows = [0, 7, 123]
    for exact in (True, False):
        hits = catalog.search(
            expected[rows],
            3,
            filters=[[Filter("colour", (colour.value(r),))] for r in rows],
            exact=exact,  # type: ignore[union-attr]
        )
        assert [h.ids[0] for h in hits] == [catalog.ids[r] for r in rows]

    assert index("--model-repo", tiny_repo, "--items", items, "--out", out) == 2
    assert "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert (
        index("--model-repo", tiny_repo, "--items", items, "--out", out, "--force", "--dtype", "float32") == 0
    )
    assert Catalog.open(out).manifest.dtype == "float32" and Catalog.open(out).ann is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "items.jsonl"]


def test_ctrl_c_leaves_nothing(tmp_path: Path, tiny_repo: Path) -> None:
    items = write_items(tmp_path / "items.jsonl", 60_000)
    out = tmp_path / "cat"
    command = [sys.executable, "-m", "recserve.cli", "index", "--model-repo", str(tiny_repo)]
    command += ["--items", str(items), "--out", str(out), "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + 120
    while "embedding" not in seen and time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stderr], [], [], 1.0)
        if ready:
            seen += process.stderr.readline()
    assert "embedding" in seen, seen  # it is embedding: the staging directory exists now
    assert any(p.name.startswith(".cat.partial-") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130, seen + rest
    assert f"interrupted; nothing was written to {out}" in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl"]
