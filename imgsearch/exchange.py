"""`imgsearch export OUT.npz` and `imgsearch import IN.npz`: a collection's items as one NumPy file.

The file holds, under these keys:
  ids            str [N]             the items' ids
  vectors        float32 [N, dim]    their vectors, row n for ids[n]
  metadata       str [N]             each item's metadata as one JSON object ({"label": "3", ...})
  model_version  str, 0-d            the model version of the vectors
  model_name     str, 0-d            the encoder model that made them ("" when not known)
  collection     str, 0-d            the collection they were exported from
  dim            int64, 0-d          the vectors' dim (also when N is 0)
  format         str, 0-d            FORMAT
and is read with `np.load(path)` (no pickles). Export scans the collection with vectors, page by page (a
point-in-time view), into arrays allocated once the first page gives the count; import upserts the items in
batches under their ids, with the file's model version and model name, so a collection exported and
imported into an empty one searches exactly as before.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from imgsearch.client import IndexClient, ServiceError
from imgsearch.filters import Condition
from imgsearch.ingest import DEFAULT_PATIENCE_S, patiently
from imgsearch.words import plural

FORMAT = "imgsearch-export-1"
REQUIRED_KEYS = ("ids", "vectors", "metadata", "model_version")
DEFAULT_PAGE_SIZE = 1000  # items per scan page of an export
DEFAULT_IMPORT_BATCH = 1000  # items per upsert of an import: well under the index's default --max-batch


class ExchangeRefused(Exception):
    """The file cannot be read as an export, or the target collection cannot take it; nothing was written
    (or, for a target refusing part-way, what the message says)."""


@dataclass
class Exported:
    path: Path
    collection: str
    count: int
    dim: int
    model_name: str
    model_version: str
    seconds: float

    def summary(self) -> str:
        return (
            f"exported {plural(self.count, 'item')} (model {self.model_name or '-'}, version "
            f"{self.model_version or '-'}, dim {self.dim}) from the collection {self.collection!r} to "
            f"{self.path} in {self.seconds:.1f} s"
        )


@dataclass
class Imported:
    path: Path
    collection: str
    imported: int
    count: int  # items in the collection afterwards
    dim: int
    model_name: str
    model_version: str
    seconds: float
    created: bool = False  # the collection was made for the file's model

    def summary(self) -> str:
        return (
            f"imported {plural(self.imported, 'item')} (model {self.model_name or '-'}, version "
            f"{self.model_version or '-'}, dim {self.dim}) from {self.path} into the collection "
            f"{self.collection!r}, which now holds {self.count}, in {self.seconds:.1f} s"
        )


def export_collection(
    index: IndexClient,
    path: str | Path,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    filter: Sequence[Condition] = (),
    on_start: Callable[[int], None] | None = None,
    on_page: Callable[[int], None] | None = None,
) -> Exported:
    """Writes the collection's items (those matching `filter`) to `path` as an .npz (see the module).

    The file is written beside the target under a temporary name and renamed when complete, so a failed
    export leaves no half file at `path`."""
    began = time.monotonic()
    path = Path(path)
    if not path.parent.is_dir():
        raise ExchangeRefused(f"cannot write {path}: there is no folder {path.parent}")
    stats = index.stats()
    ids: list[str] = []
    metadata: list[str] = []
    vectors: np.ndarray | None = None  # allocated once the first page gives the count
    version, filled = stats.model_version, 0
    pages = index.scan(page_size, with_vectors=True, filter=filter)
    try:
        for page in pages:
            assert page.vectors is not None
            if vectors is None:
                version = page.model_version
                vectors = np.empty((page.total, page.vectors.shape[1]), np.float32)
                if on_start is not None:
                    on_start(page.total)
            rows = len(page.ids)
            if filled + rows > len(vectors):  # the scan is a point-in-time view: this cannot happen
                raise ExchangeRefused(f"the scan sent more than the {page.total} items it announced")
            vectors[filled : filled + rows] = page.vectors
            ids += page.ids
            metadata += [json.dumps(m, ensure_ascii=False, sort_keys=True) for m in page.metadata]
            filled += rows
            if on_page is not None:
                on_page(rows)
    finally:
        getattr(pages, "close", lambda: None)()  # cancels the scan when left early
    if vectors is None:  # an empty collection (or none matched): no pages
        vectors = np.zeros((0, stats.dim), np.float32)
    if filled != len(vectors):
        raise ExchangeRefused(f"the scan sent {filled} of the {len(vectors)} items it announced")
    dim = int(vectors.shape[1])
    arrays = {
        "ids": np.array(ids, dtype=str),
        "vectors": vectors,
        "metadata": np.array(metadata, dtype=str),
        "model_version": np.array(version, dtype=str),
        "model_name": np.array(stats.model_name, dtype=str),
        "collection": np.array(stats.collection, dtype=str),
        "dim": np.array(dim, dtype=np.int64),
        "format": np.array(FORMAT, dtype=str),
    }
    partial_path = path.with_name(f".{path.name}.partial")
    try:
        with open(partial_path, "wb") as out:
            np.savez(out, **arrays)  # type: ignore[arg-type]
        os.replace(partial_path, path)
    finally:
        partial_path.unlink(missing_ok=True)
    return Exported(path, stats.collection, filled, dim, stats.model_name, version, time.monotonic() - began)


@dataclass
class ExportFile:
    """An export read back: its arrays, checked."""

    ids: np.ndarray
    vectors: np.ndarray
    metadata: np.ndarray  # JSON strings, parsed batch by batch as they are imported
    model_version: str
    model_name: str
    dim: int


def read_export(path: str | Path) -> ExportFile:
    """The file's arrays; ExchangeRefused saying what is missing or malformed."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ExchangeRefused(f"{path} cannot be read as an .npz file: {error}") from None
    with data:
        if not hasattr(data, "files"):
            raise ExchangeRefused(f"{path} is a single array, not an .npz export")
        missing = [key for key in REQUIRED_KEYS if key not in data.files]
        if missing:
            raise ExchangeRefused(
                f"{path} is not an imgsearch export: it lacks {', '.join(missing)} (it holds "
                f"{', '.join(data.files) or 'nothing'}; `imgsearch export` writes {', '.join(REQUIRED_KEYS)})"
            )
        try:
            ids, vectors, metadata = data["ids"], data["vectors"], data["metadata"]
            version = data["model_version"]
            name = data["model_name"] if "model_name" in data.files else np.array("")
        except ValueError as error:  # an object array, which needs pickles
            raise ExchangeRefused(f"{path}: {error}") from None
    if ids.ndim != 1 or (ids.size and ids.dtype.kind != "U"):
        raise ExchangeRefused(f"{path}: `ids` must be a 1-d array of strings, got {ids.dtype} {ids.shape}")
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ExchangeRefused(
            f"{path}: `vectors` must be float32 [N, dim], got {vectors.dtype} {list(vectors.shape)}"
        )
    if len(vectors) != len(ids) or metadata.shape != ids.shape:
        raise ExchangeRefused(
            f"{path}: {len(ids)} ids, {len(vectors)} vectors and {len(metadata)} metadata: they must match"
        )
    for key, value in (("model_version", version), ("model_name", name)):
        if value.ndim != 0 or value.dtype.kind != "U":
            raise ExchangeRefused(
                f"{path}: `{key}` must be a 0-d string array, got {value.dtype} {list(value.shape)}"
            )
    return ExportFile(ids, vectors, metadata, str(version), str(name), int(vectors.shape[1]))


def _metadata(texts: np.ndarray, first: int, path: str | Path) -> list[dict[str, str]]:
    found = []
    for n, text in enumerate(texts.tolist()):
        try:
            entries = json.loads(text)
        except ValueError as error:
            raise ExchangeRefused(f"{path}: the metadata of item {first + n} is not JSON: {error}") from None
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise ExchangeRefused(
                f"{path}: the metadata of item {first + n} is not a JSON object of strings: {text[:80]}"
            )
        found.append(entries)
    return found


def check_import_target(index: IndexClient, export: ExportFile, note: Callable[[str], None]) -> bool:
    """Makes the target collection, for the file's model, when it does not exist (an alias is taken as it
    is); returns whether it was made. ExchangeRefused when it holds vectors of another model version or
    dim, or is filled by another model."""
    try:
        there = index.stats()
    except ServiceError as error:
        if error.code != grpc.StatusCode.NOT_FOUND:
            raise
        index.create_collection(index.collection, export.model_name)
        note(f"created the collection {index.collection!r} (model {export.model_name or 'default'!r})")
        return True
    where = f"the collection {there.collection!r}"
    if there.count and (there.model_version != export.model_version or there.dim != export.dim):
        raise ExchangeRefused(
            f"{where} holds {plural(there.count, 'vector')} of model version {there.model_version or '-'!r}, "
            f"dim {there.dim}; the file's are model version {export.model_version or '-'!r}, dim "
            f"{export.dim}: import into a new collection (--collection NEW makes it)"
        )
    if there.model_name and export.model_name and there.model_name != export.model_name:
        raise ExchangeRefused(
            f"{where} is filled by the model {there.model_name!r}; the file's vectors are the model "
            f"{export.model_name!r}'s: import into a new collection (--collection NEW makes it)"
        )
    if there.count:
        note(
            f"{where} already holds {plural(there.count, 'item')} of the same model version: items with "
            "the same id are replaced, the others kept"
        )
    return False


def import_collection(
    index: IndexClient,
    path: str | Path,
    *,
    batch_size: int = DEFAULT_IMPORT_BATCH,
    patience_s: float = DEFAULT_PATIENCE_S,
    note: Callable[[str], None] = lambda _: None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Imported:
    """Upserts the file's items into the collection `index` names, in batches of batch_size, with the
    file's model version and model name (each upsert retried while the index is unreachable)."""
    began = time.monotonic()
    export = read_export(path)
    created = check_import_target(index, export, note)
    total = len(export.ids)
    if on_start is not None:
        on_start(total)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        upsert = partial(
            index.upsert,
            export.ids[start:stop].tolist(),
            export.vectors[start:stop],
            _metadata(export.metadata[start:stop], start, path),
            export.model_version,
            model_name=export.model_name,
        )
        try:
            patiently(upsert, patience_s, note)
        except ServiceError as error:
            if error.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ExchangeRefused(
                    f"the index refused the file's vectors after {plural(start, 'item')} "
                    f"{'was' if start == 1 else 'were'} imported: {error.details}"
                ) from None
            raise
        if on_batch is not None:
            on_batch(stop - start)
    stats = index.stats()
    return Imported(
        Path(path),
        stats.collection,
        total,
        stats.count,
        export.dim,
        export.model_name,
        export.model_version,
        time.monotonic() - began,
        created,
    )
