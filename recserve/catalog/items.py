"""The catalog's source: a JSON Lines file of items, read and validated whole before any model runs.

One JSON object per line: `id` (a non-empty string, unique), `text` (what the model embeds, not blank) and
any other fields as attributes, each a string or a number throughout the file (null or absent: the item has
none). Blank lines are skipped. Every refusal is an ItemsError naming the file and line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recserve.catalog.errors import ItemsError

AttributeType = Literal["string", "number"]
Value = str | float
RESERVED = ("id", "text")


@dataclass
class AttributeColumn:
    """One attribute over all items: its type (fixed by its first non-null value) and a value per item."""

    name: str
    type: AttributeType
    first_line: int  # where its type was set, for the error when a later line disagrees
    values: list[Value | None] = field(default_factory=list)


@dataclass
class Items:
    """A validated catalog source, sorted by id (the catalog's row order, see store.py)."""

    ids: list[str]
    texts: list[str]
    attributes: dict[str, AttributeColumn]

    def __len__(self) -> int:
        return len(self.ids)


def _refuse_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity, which are not JSON and compare unequal to everything.
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_items(path: Path) -> Items:
    """Reads and validates `path` whole; ItemsError (one line, with `path:line:`) at the first problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ItemsError(f"cannot read the items file {path}: {exc.strerror or exc}") from None
    ids: list[str] = []
    texts: list[str] = []
    attributes: dict[str, AttributeColumn] = {}
    seen: dict[str, int] = {}  # id -> line

    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ItemsError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise ItemsError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(item, dict):
            raise ItemsError(f"{where}: expected a JSON object, got {_kind(item)}")
        for name in RESERVED:
            if name not in item:
                raise ItemsError(f"{where}: the field {name!r} is missing")
        item_id, text = item["id"], item["text"]
        if not isinstance(item_id, str):
            raise ItemsError(f"{where}: id must be a string, got {_kind(item_id)} ({item_id!r}): quote it")
        if not item_id:
            raise ItemsError(f"{where}: id is empty")
        if item_id in seen:
            raise ItemsError(f"{where}: duplicate id {item_id!r} (first on line {seen[item_id]})")
        if not isinstance(text, str):
            raise ItemsError(f"{where}: text must be a string, got {_kind(text)}")
        if not text.strip():
            raise ItemsError(f"{where}: text is empty (id {item_id!r})")
        row = len(ids)
        seen[item_id] = number
        ids.append(item_id)
        texts.append(text)
        for name, value in item.items():
            if name in RESERVED:
                continue
            _add_value(attributes, name, value, row, number, where)
        for column in attributes.values():
            if len(column.values) == row:  # absent from this item
                column.values.append(None)

    if not ids:
        raise ItemsError(f"{path}: holds no items")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    for column in attributes.values():
        column.values = [column.values[i] for i in order]
    return Items([ids[i] for i in order], [texts[i] for i in order], attributes)


def _add_value(
    attributes: dict[str, AttributeColumn], name: str, value: object, row: int, line: int, where: str
) -> None:
    if value is None:
        return  # absent; padded by the caller
    kind: AttributeType
    if isinstance(value, str):
        kind = "string"
    elif isinstance(value, int | float) and not isinstance(value, bool):
        kind = "number"
        value = float(value)
        if not math.isfinite(value):  # an integer beyond float range
            raise ItemsError(f"{where}: attribute {name!r} is {value}, not a finite number")
    else:
        raise ItemsError(
            f"{where}: attribute {name!r} is {_kind(value)}; attributes are strings or numbers (null: none)"
        )
    column = attributes.get(name)
    if column is None:
        column = attributes[name] = AttributeColumn(name, kind, line, [None] * row)
    elif column.type != kind:
        raise ItemsError(
            f"{where}: attribute {name!r} is a {kind} here but a {column.type} on line {column.first_line}"
        )
    column.values.append(value)
