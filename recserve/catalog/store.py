"""The catalog directory format, written by `recserve index` and opened (memory-mapped) by the server.

    manifest.json          what it is: the model (name, weights sha256, dimension), count, dtype, schema,
                           and the size and sha256 of every other file
    vectors.npy            [count, dimension] float16 or float32, L2-normalised, one row per item
    ids.bin, ids.offsets.npy       the ids, UTF-8 packed back to back; offsets int64 [count + 1]
    texts.bin, texts.offsets.npy   the texts, the same way (for rerankers)
    attr<i>.npy            attribute i when a number: float64, NaN where an item has none
    attr<i>.npy + attr<i>.vocab.json   attribute i when a string: int32 codes into the sorted vocabulary
                           (a JSON list), -1 where an item has none
    ann.usearch            optional HNSW index (usearch) over the vectors, keys = row numbers

NOTE: rows are sorted by id (code point order), so that the row number breaks ties between equal scores the
way an id would, and an id is found by bisection without a second table in memory. File names are fixed by
this module, never read from the manifest, so that opening a catalog follows no path out of it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recserve.catalog.errors import CatalogFormatError, ModelMismatch, UnknownIds
from recserve.catalog.items import AttributeColumn, AttributeType, Items
from recserve.catalog.search import Filter, Hits, search
from recserve.manifest import Sha256, describe_error, file_sha256
from recserve.tensors import FloatArray, IntArray

if TYPE_CHECKING:
    from recserve.catalog.ann import AnnIndex

FORMAT_VERSION = 1
KIND: Literal["recserve-catalog"] = "recserve-catalog"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
IDS = "ids"
TEXTS = "texts"
ANN_FILE = "ann.usearch"
Dtype = Literal["float16", "float32"]
DTYPES: tuple[Dtype, ...] = ("float16", "float32")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileInfo(_Strict):
    bytes: int = Field(ge=0)
    sha256: Sha256


class ModelInfo(_Strict):
    """The model that embedded the catalog: only that model's query vectors are comparable with its rows."""

    name: str = Field(min_length=1)
    weights_sha256: Sha256
    dimension: int = Field(ge=1)
    repository: str = ""  # where it was read from at build time, for people; never opened


class AttributeInfo(_Strict):
    name: str = Field(min_length=1)
    type: AttributeType
    missing: int = Field(ge=0)  # items without a value


class AnnInfo(_Strict):
    """How the HNSW index was built (usearch's parameters)."""

    metric: Literal["ip"] = "ip"
    dtype: Dtype
    connectivity: int = Field(ge=2)
    expansion_add: int = Field(ge=1)
    expansion_search: int = Field(ge=1)
    build_seconds: float = Field(ge=0)


class CatalogManifest(_Strict):
    format_version: int = FORMAT_VERSION
    kind: Literal["recserve-catalog"] = KIND
    model: ModelInfo
    count: int = Field(ge=1)
    dtype: Dtype
    built_at: str
    build_seconds: float = Field(ge=0)
    # Texts the tokenizer cut at the model's max_length: only their beginning was embedded.
    truncated_texts: int = Field(ge=0)
    attributes: list[AttributeInfo] = Field(default_factory=list)
    ann: AnnInfo | None = None
    files: dict[str, FileInfo]

    def expected_files(self) -> set[str]:
        return expected_files(self.attributes, self.ann is not None)


def attribute_files(position: int, kind: AttributeType) -> tuple[str, ...]:
    """The files of the attribute at `position` in the schema: its values (or codes), and a vocabulary."""
    return (f"attr{position}.npy",) + ((f"attr{position}.vocab.json",) if kind == "string" else ())


def expected_files(attributes: Sequence[AttributeInfo], ann: bool) -> set[str]:
    names = {VECTORS_FILE, *_packed_files(IDS), *_packed_files(TEXTS)}
    for position, attribute in enumerate(attributes):
        names.update(attribute_files(position, attribute.type))
    if ann:
        names.add(ANN_FILE)
    return names


# --- packed strings ------------------------------------------------------------------------------------
def _packed_files(stem: str) -> tuple[str, str]:
    return f"{stem}.bin", f"{stem}.offsets.npy"


def write_packed(directory: Path, stem: str, strings: Iterable[str]) -> None:
    """`strings` as one UTF-8 blob and the int64 offsets of their starts (and of the blob's end)."""
    blob_name, offsets_name = _packed_files(stem)
    offsets = [0]
    with (directory / blob_name).open("wb") as blob:
        for text in strings:
            # surrogatepass: a lone surrogate (valid in JSON, not in UTF-8) is kept rather than refused.
            data = text.encode("utf-8", "surrogatepass")
            blob.write(data)
            offsets.append(offsets[-1] + len(data))
    np.save(directory / offsets_name, np.asarray(offsets, dtype=np.int64))


class PackedStrings:
    """Strings stored by write_packed, read on demand from a memory map."""

    def __init__(self, directory: Path, stem: str, count: int) -> None:
        blob_name, offsets_name = _packed_files(stem)
        self._offsets = _load_array(directory, offsets_name, np.dtype(np.int64), (count + 1,))
        path = directory / blob_name
        size = path.stat().st_size
        offsets = self._offsets
        if offsets[0] != 0 or offsets[-1] != size or (count > 0 and np.any(np.diff(offsets) < 0)):
            raise CatalogFormatError(
                f"catalog file {path}: its offsets ({offsets_name}) do not fit its {size} bytes: "
                "the catalog is corrupt; rebuild it"
            )
        # A zero-length file cannot be memory-mapped.
        self._blob: npt.NDArray[np.uint8] = (
            np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
        )
        self._path = path

    def get(self, index: int) -> str:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._decode(self._blob[start:stop].tobytes())

    def all(self) -> list[str]:
        data = self._blob.tobytes()
        bounds = self._offsets.tolist()
        return [self._decode(data[a:b]) for a, b in itertools.pairwise(bounds)]

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise CatalogFormatError(f"catalog file {self._path} is not valid UTF-8: rebuild it") from None


# --- writing -------------------------------------------------------------------------------------------
class CatalogWriter:
    """Writes one catalog into an (empty, staging) directory: the vectors as they are computed, row by row,
    then `finish` writes everything else and the manifest last."""

    def __init__(self, directory: Path, count: int, dimension: int, dtype: Dtype) -> None:
        self.directory = directory
        self.dtype = dtype
        self.started = time.perf_counter()
        # Written in place through a memory map: a catalog larger than memory can still be built.
        self.vectors = np.lib.format.open_memmap(
            directory / VECTORS_FILE, mode="w+", dtype=np.dtype(dtype), shape=(count, dimension)
        )

    def put(self, rows: IntArray | slice, vectors: FloatArray) -> None:
        """Stores L2-normalised `vectors` at `rows` (cast to the catalog's dtype)."""
        self.vectors[rows] = vectors

    def finish(
        self,
        items: Items,
        model: ModelInfo,
        truncated_texts: int = 0,
        ann: dict[str, int] | None = None,
    ) -> CatalogManifest:
        """Writes ids, texts, attributes, the ANN index (when `ann` gives its parameters, possibly empty)
        and the manifest; returns the manifest."""
        directory = self.directory
        self.vectors.flush()
        write_packed(directory, IDS, items.ids)
        write_packed(directory, TEXTS, items.texts)
        columns = enumerate(items.attributes.values())
        schema = [_write_attribute(directory, i, column) for i, column in columns]
        ann_info = None
        if ann is not None:
            from recserve.catalog.ann import build_ann

            ann_info = build_ann(np.asarray(self.vectors), directory / ANN_FILE, self.dtype, **ann)
        names = expected_files(schema, ann_info is not None)
        files = {
            name: FileInfo(bytes=(directory / name).stat().st_size, sha256=file_sha256(directory / name))
            for name in sorted(names)
        }
        manifest = CatalogManifest(
            model=model,
            count=len(items),
            dtype=self.dtype,
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - self.started, 3),
            truncated_texts=truncated_texts,
            attributes=schema,
            ann=ann_info,
            files=files,
        )
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        return manifest


def _write_attribute(directory: Path, position: int, column: AttributeColumn) -> AttributeInfo:
    names = attribute_files(position, column.type)
    missing = sum(value is None for value in column.values)
    if column.type == "number":
        values = np.asarray([np.nan if v is None else v for v in column.values], dtype=np.float64)
        np.save(directory / names[0], values)
    else:
        vocabulary = sorted({v for v in column.values if isinstance(v, str)})
        code = {value: i for i, value in enumerate(vocabulary)}
        codes = np.asarray([-1 if v is None else code[str(v)] for v in column.values], dtype=np.int32)
        np.save(directory / names[0], codes)
        (directory / names[1]).write_text(json.dumps(vocabulary, ensure_ascii=False))
    return AttributeInfo(name=column.name, type=column.type, missing=missing)


# --- reading -------------------------------------------------------------------------------------------
def _load_array(directory: Path, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    path = directory / name
    try:
        array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CatalogFormatError(f"catalog file {path} cannot be read as an array: {exc}") from None
    if array.dtype != dtype or array.shape != shape:
        raise CatalogFormatError(
            f"catalog file {path} holds {array.dtype} {list(array.shape)}, expected {dtype} {list(shape)}: "
            "the catalog is corrupt; rebuild it"
        )
    return array


@dataclass(frozen=True)
class NumberColumn:
    name: str
    values: npt.NDArray[np.float64]  # NaN: none

    type: Literal["number"] = "number"


@dataclass(frozen=True)
class StringColumn:
    name: str
    codes: npt.NDArray[np.int32]  # -1: none
    vocabulary: tuple[str, ...]

    type: Literal["string"] = "string"

    def value(self, row: int) -> str | None:
        code = int(self.codes[row])
        return None if code < 0 else self.vocabulary[code]


Column = NumberColumn | StringColumn


def read_manifest(directory: Path) -> CatalogManifest:
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CatalogFormatError(f"catalog {directory} does not exist or is not a directory")
    if not path.is_file():
        raise CatalogFormatError(f"{directory} is not a catalog: {MANIFEST_FILE} is missing")
    try:
        text = path.read_text()
        probe = json.loads(text)
    except (OSError, ValueError) as exc:
        raise CatalogFormatError(f"{path} cannot be read: {exc}") from None
    if isinstance(probe, dict) and probe.get("kind") != KIND:
        raise CatalogFormatError(
            f"{path} is not a catalog manifest (kind {probe.get('kind')!r}, not {KIND!r})"
        )
    try:
        manifest = CatalogManifest.model_validate_json(text)
    except ValidationError as exc:
        raise CatalogFormatError(f"{path} is not a valid catalog manifest: {describe_error(exc)}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise CatalogFormatError(
            f"{path} has format_version {manifest.format_version}; this version reads {FORMAT_VERSION}"
        )
    names = [a.name for a in manifest.attributes]
    if len(set(names)) != len(names) or any(name in ("id", "text") for name in names):
        raise CatalogFormatError(f"{path}: attribute names must be unique and not id or text: {names}")
    expected = manifest.expected_files()
    if set(manifest.files) != expected:
        raise CatalogFormatError(
            f"{path} lists the files {sorted(manifest.files)}; a catalog of its schema has {sorted(expected)}"
        )
    return manifest


def verify_files(directory: Path, manifest: CatalogManifest, checksums: bool) -> None:
    """Each file against the manifest: its size always (cheap: a truncated copy), its sha256 if asked."""
    for name, info in sorted(manifest.files.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CatalogFormatError(f"catalog file {path} cannot be read: {exc.strerror or exc}") from None
        if size != info.bytes:
            raise CatalogFormatError(
                f"catalog file {path} has {size} bytes but the manifest says {info.bytes}: it is truncated "
                "or was replaced; rebuild the catalog"
            )
        if checksums and file_sha256(path) != info.sha256:
            raise CatalogFormatError(
                f"catalog file {path} does not match the manifest's sha256: it is corrupt or was replaced; "
                "rebuild the catalog"
            )


class Catalog:
    """An opened catalog: memory-mapped vectors, ids, texts and attributes, and search over them.

    Immutable once open, so any number of threads may search it at once.
    """

    def __init__(
        self,
        path: Path,
        manifest: CatalogManifest,
        vectors: np.ndarray,
        ids: list[str],
        texts: PackedStrings,
        attributes: dict[str, Column],
        ann: AnnIndex | None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.vectors = vectors
        self.ids = ids
        self._texts = texts
        self.attributes = attributes
        self.ann = ann

    @classmethod
    def open(cls, directory: Path, verify: bool = True) -> Catalog:
        """Opens `directory`; CatalogFormatError (one line, naming the file) if anything does not fit.

        Sizes and shapes are always checked; with `verify`, every file's sha256 too (reads it all once:
        about a second per GB here).
        """
        manifest = read_manifest(directory)
        verify_files(directory, manifest, checksums=verify)
        count, dimension = manifest.count, manifest.model.dimension
        vectors = _load_array(directory, VECTORS_FILE, np.dtype(manifest.dtype), (count, dimension))
        ids = PackedStrings(directory, IDS, count).all()
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise CatalogFormatError(
                f"catalog file {directory / _packed_files(IDS)[0]}: ids are not unique and sorted; rebuild it"
            )
        attributes: dict[str, Column] = {}
        for position, info in enumerate(manifest.attributes):
            files = attribute_files(position, info.type)
            if info.type == "number":
                values = _load_array(directory, files[0], np.dtype(np.float64), (count,))
                attributes[info.name] = NumberColumn(info.name, values)
            else:
                codes = _load_array(directory, files[0], np.dtype(np.int32), (count,))
                vocabulary = _read_vocabulary(directory / files[1])
                if count and (int(codes.max()) >= len(vocabulary) or int(codes.min()) < -1):
                    raise CatalogFormatError(
                        f"catalog file {directory / files[0]}: codes outside its vocabulary; rebuild it"
                    )
                attributes[info.name] = StringColumn(info.name, codes, vocabulary)
        ann = None
        if manifest.ann is not None:
            from recserve.catalog.ann import AnnIndex

            ann = AnnIndex.open(directory / ANN_FILE, manifest.ann, count, dimension)
        return cls(directory, manifest, vectors, ids, PackedStrings(directory, TEXTS, count), attributes, ann)

    # --- what it is ----------------------------------------------------------------------------------
    @property
    def weights_sha256(self) -> str:
        return self.manifest.model.weights_sha256

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    @property
    def dimension(self) -> int:
        return self.manifest.model.dimension

    def __len__(self) -> int:
        return self.manifest.count

    def check_model(self, weights_sha256: str) -> None:
        """Refuses a model other than the one that built the catalog (its vectors live in another space)."""
        if weights_sha256 != self.weights_sha256:
            raise ModelMismatch(
                f"catalog {self.path} was built by model {self.model_name} with weights sha256 "
                f"{self.weights_sha256}, not by the model with weights sha256 {weights_sha256}: rebuild it "
                "with `recserve index` and that model"
            )

    # --- lookups -------------------------------------------------------------------------------------
    def index_of(self, ids: Sequence[str]) -> IntArray:
        """Row numbers of `ids`, in order; UnknownIds lists every id the catalog does not hold."""
        rows = np.empty(len(ids), dtype=np.int64)
        unknown = []
        catalog_ids, count = self.ids, len(self.ids)
        for i, item_id in enumerate(ids):
            row = bisect.bisect_left(catalog_ids, item_id)
            if row < count and catalog_ids[row] == item_id:
                rows[i] = row
            else:
                unknown.append(item_id)
        if unknown:
            raise UnknownIds(unknown)
        return rows

    def vectors_for(self, ids: Sequence[str]) -> FloatArray:
        """[len(ids), dimension] float32 rows of `ids` (as stored: L2-normalised)."""
        return np.asarray(self.vectors[self.index_of(ids)], dtype=np.float32)

    def texts_for(self, indices: Iterable[int]) -> list[str]:
        """The texts of rows `indices` (from Hits.indices or index_of), as embedded."""
        return [self._texts.get(int(i)) for i in indices]

    # --- search --------------------------------------------------------------------------------------
    def search(
        self,
        queries: FloatArray,
        k: int | Sequence[int],
        exclude: Sequence[Collection[str]] | None = None,
        filters: Sequence[Sequence[Filter]] | None = None,
        exact: bool = True,
    ) -> list[Hits]:
        """Top-k rows for each query row: see recserve.catalog.search.search."""
        return search(self, queries, k, exclude=exclude, filters=filters, exact=exact)


def _read_vocabulary(path: Path) -> tuple[str, ...]:
    try:
        vocabulary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogFormatError(f"catalog file {path} cannot be read: {exc}") from None
    if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary):
        raise CatalogFormatError(f"catalog file {path} is not a JSON list of strings; rebuild the catalog")
    return tuple(vocabulary)
