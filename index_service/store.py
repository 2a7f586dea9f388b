"""The store contract: the `Store` protocol every backend implements, its errors, value types and checks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from imgsearch.wire import MetadataBatch

MAX_ID_BYTES = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_BYTES = 256
MAX_METADATA_VALUE_BYTES = 4096
DEFAULT_COLLECTION = "default"  # what a data call with no collection uses; always exists
NAME_PATTERN = "[a-z0-9][a-z0-9_-]{0,63}"  # collections and aliases alike
_NAME = re.compile(NAME_PATTERN + r"\Z")
# Said with every model-version refusal: the way to change models is a new collection, filled by reindex.
REINDEX_HINT = (
    "to change models, create a collection for the new model and fill it from this one with "
    "`imgsearch reindex --collection OLD --to-collection NEW` (re-embeds every stored item from its "
    "`source` path), then point an alias at it: README, Collections and model changes"
)


class StoreError(Exception):
    """A request the store refuses; the message says what was wrong. Nothing was changed."""


class InvalidArgument(StoreError):
    """The request itself is malformed (bad id, dim, NaN, k...)."""


class NotFound(StoreError):
    """An id the request needs is not stored."""


class AlreadyExists(StoreError):
    """A collection or alias name that is taken."""


class FailedPrecondition(StoreError):
    """The request is well formed but does not fit the index (another model version)."""


class StorageFull(StoreError):
    """The write could not be made durable because the disk is full; nothing was changed."""


class StorageUnavailable(StoreError):
    """The write could not be made durable (read-only or failing disk); nothing was changed."""


@dataclass(frozen=True)
class Condition:
    """One condition of a metadata filter (filters.py says what each operator means)."""

    key: str
    op: str  # one of filters.OPERATORS
    values: tuple[str, ...] = ()


Filter = tuple[Condition, ...]  # ANDed; empty: everything matches


@dataclass(frozen=True)
class Upsert:
    ids: tuple[str, ...]
    vectors: np.ndarray  # float32 [len(ids), dim], owned by the operation
    metadata: tuple[dict[str, str], ...]
    model_version: str
    model_name: str = ""
    collection: str = DEFAULT_COLLECTION


@dataclass(frozen=True)
class Delete:
    ids: tuple[str, ...]
    collection: str = DEFAULT_COLLECTION


@dataclass(frozen=True)
class CreateCollection:
    name: str
    model_name: str = ""


@dataclass(frozen=True)
class DropCollection:
    name: str


@dataclass(frozen=True)
class SetAlias:
    alias: str
    collection: str


@dataclass(frozen=True)
class DropAlias:
    alias: str


ItemOperation = Upsert | Delete  # what one collection's store logs
CatalogOperation = CreateCollection | DropCollection | SetAlias | DropAlias
Operation = ItemOperation | CatalogOperation


@dataclass(frozen=True)
class Match:
    id: str
    distance: float  # Euclidean, not squared
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Stats:
    count: int
    dim: int
    model_version: str
    bytes_used: int
    model_name: str = ""


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    count: int
    dim: int
    model_name: str
    model_version: str
    bytes_used: int
    aliases: tuple[str, ...] = ()


@dataclass
class StoreState:
    """Everything the store holds, in plain arrays: what a snapshot writes and reads."""

    dim: int = 0
    model_version: str = ""
    ids: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    lsn: int = 0  # the last logged operation this state includes
    model_name: str = ""


@dataclass
class CatalogState:
    """Every collection and alias of a FAISS index, each collection as a StoreState: what a snapshot
    writes and reads. `lsn` is the last logged operation it includes (each collection's too)."""

    collections: dict[str, StoreState] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    lsn: int = 0


@dataclass(frozen=True)
class StoreCopy:
    """What the store held at one moment, made under the read lock and read without it.

    Ids and metadata stay encoded until asked for (`ids` is a list, or the FAISS store's PackedIds copy:
    a few memcpys under the lock, where decoding 1M ids took 0.15-0.2 s), so a scan decodes one page at
    a time. `vectors` is [len(ids), dim] when the copy was made with vectors, else [0, dim]."""

    dim: int
    model_version: str
    ids: Sequence[str]
    encoded_metadata: list[bytes | None]
    vectors: np.ndarray
    lsn: int
    model_name: str = ""

    def metadata(self, start: int = 0, stop: int | None = None) -> list[dict[str, str]]:
        """The metadata of rows start to stop, decoded."""
        return [decode_metadata(encoded) for encoded in self.encoded_metadata[start:stop]]

    def as_state(self) -> StoreState:
        """The copy as a snapshot writes it (made with vectors)."""
        return StoreState(
            self.dim,
            self.model_version,
            list(self.ids),
            self.metadata(),
            self.vectors,
            self.lsn,
            self.model_name,
        )


# Called between chunks of a long search; raises to stop it (the caller has gone, say).
Check = Callable[[], None]


class Store(Protocol):
    """What the servicer needs of a backend: VectorStore (faiss_store.py) and MilvusStore
    (milvus_store.py) both give it, with the same validation, errors and distances."""

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: MetadataBatch = (),
        model_version: str = "",
        model_name: str = "",
    ) -> int: ...
    def delete(self, ids: Sequence[str]) -> tuple[int, int]: ...
    def get(self, ids: Sequence[str]) -> tuple[list[tuple[str, dict[str, str]]], np.ndarray, list[str]]: ...
    def search(
        self,
        queries: np.ndarray,
        k: int,
        model_version: str = "",
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]: ...
    def search_by_id(
        self,
        ids: Sequence[str],
        k: int,
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]: ...
    def duplicates(
        self,
        max_distance: float,
        conditions: Filter = (),
        *,
        check: Check | None = None,
        max_pairs: int = ...,
    ) -> tuple[list[tuple[list[str], float]], int, int]: ...
    def stats(self) -> Stats: ...
    def item_sizes(self) -> tuple[int, float] | None: ...
    def copy(self, *, with_vectors: bool = True) -> StoreCopy: ...


class Collections(Protocol):
    """Named collections of one backend, each a `Store`, and aliases naming them: what the servicer
    serves. Catalog (catalog.py, FAISS) and MilvusCollections (milvus_store.py) both give it.

    Every name argument is checked with `check_name`; "" means DEFAULT_COLLECTION wherever a collection
    is looked up. An alias is accepted wherever a collection is looked up."""

    def lookup(self, name: str) -> tuple[str, Store]:
        """(the collection's name, its store) for a collection or an alias; NotFound naming it."""
        ...

    def create(self, name: str, model_name: str = "") -> CollectionInfo:
        """A new, empty collection; AlreadyExists when a collection or an alias has the name."""
        ...

    def drop(self, name: str) -> int:
        """Removes a collection and its items, returning how many; NotFound; FailedPrecondition when an
        alias points at it (naming the alias) or for DEFAULT_COLLECTION."""
        ...

    def set_alias(self, alias: str, collection: str) -> str:
        """Points the alias at the collection atomically; returns the collection it pointed at before
        ("" when new). AlreadyExists when a collection has the alias's name; NotFound for the collection
        (an alias is not accepted as the target)."""
        ...

    def drop_alias(self, alias: str) -> str:
        """Removes the alias; returns the collection it pointed at; NotFound when there is none."""
        ...

    def collections(self) -> list[CollectionInfo]:
        """Every collection, sorted by name, with the aliases pointing at each."""
        ...

    def aliases(self) -> dict[str, str]:
        """alias -> collection, sorted by alias."""
        ...

    def total(self) -> Stats:
        """Every collection together (count and bytes summed): what the metrics report."""
        ...


def check_name(name: str, what: str = "collection") -> str:
    """The name itself, or InvalidArgument saying what a name must be."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{what} name {name!r} is not valid: names are 1 to 64 characters of lowercase letters, digits, "
            f"'_' and '-', beginning with a letter or digit ({NAME_PATTERN})"
        )
    return name


def collection_name(name: str) -> str:
    """A data call's collection: "" is DEFAULT_COLLECTION; anything else must be a valid name."""
    return check_name(name) if name else DEFAULT_COLLECTION


def check_ids(ids: Sequence[str], *, unique: bool = True) -> tuple[str, ...]:
    """Returns the ids as a tuple; raises InvalidArgument naming the first bad one."""
    seen: set[str] = set()
    for position, item_id in enumerate(ids):
        size = len(item_id.encode("utf-8"))
        if not 1 <= size <= MAX_ID_BYTES:
            raise InvalidArgument(
                f"id {position} is {size} bytes of UTF-8; ids must be 1 to {MAX_ID_BYTES} bytes"
            )
        if unique:
            if item_id in seen:
                raise InvalidArgument(f"id {position} ({item_id!r}) appears twice in the batch")
            seen.add(item_id)
    return tuple(ids)


def check_metadata(metadata: Sequence[Mapping[str, str]], count: int) -> tuple[dict[str, str], ...]:
    """Returns one dict per item (empty when none were sent); raises InvalidArgument."""
    if not metadata:
        return tuple({} for _ in range(count))
    if len(metadata) != count:
        raise InvalidArgument(
            f"got {len(metadata)} metadata entries for {count} ids; send none or one per id"
        )
    checked = []
    for position, entries in enumerate(metadata):
        if len(entries) > MAX_METADATA_ENTRIES:
            raise InvalidArgument(
                f"metadata {position} has {len(entries)} keys; at most {MAX_METADATA_ENTRIES} are allowed"
            )
        for key, value in entries.items():
            if not 1 <= len(key.encode("utf-8")) <= MAX_METADATA_KEY_BYTES:
                raise InvalidArgument(
                    f"metadata {position}: keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"
                )
            if len(value.encode("utf-8")) > MAX_METADATA_VALUE_BYTES:
                raise InvalidArgument(
                    f"metadata {position}: the value of {key!r} is over {MAX_METADATA_VALUE_BYTES} bytes"
                )
        checked.append(dict(entries))
    return tuple(checked)


def check_vectors(vectors: np.ndarray, what: str = "vector") -> np.ndarray:
    """Returns a C-contiguous float32 copy; raises InvalidArgument on NaN or Inf."""
    array = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if array.ndim != 2:
        raise InvalidArgument(f"{what}s must be a 2-D batch, got shape {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument(f"{what} {bad} has a NaN or infinite value")
    return array


def check_model(collection: str, held: str, given: str) -> None:
    """Refuses vectors of another model than the one the collection is filled by (both named)."""
    if held and given and held != given:
        raise FailedPrecondition(
            f"vectors are from model {given!r}, the collection {collection!r} is filled by model {held!r}; "
            "index into a collection of that model (imgsearch collections create NAME --model MODEL)"
        )


def check_not_empty(count: int, what: str) -> None:
    if count == 0:
        raise InvalidArgument(f"the batch is empty: send at least one of the {what}")


def check_id_batch(ids: Sequence[str], *, unique: bool = True) -> tuple[str, ...]:
    """check_ids, and at least one."""
    checked = check_ids(ids, unique=unique)
    check_not_empty(len(checked), "ids")
    return checked


def check_upsert(
    ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, str]]
) -> tuple[tuple[str, ...], np.ndarray, tuple[dict[str, str], ...]]:
    """Every backend's checks on an upsert batch, made before anything changes: (ids, vectors, metadata)."""
    checked_ids = check_id_batch(ids)
    array = check_vectors(vectors)
    if array.shape[0] != len(checked_ids):
        raise InvalidArgument(f"got {array.shape[0]} vectors for {len(checked_ids)} ids")
    if array.shape[1] == 0:
        raise InvalidArgument("vectors have dim 0")
    return checked_ids, array, check_metadata(metadata, len(checked_ids))


def check_queries(queries: np.ndarray, model_version: str, held_version: str, held_dim: int) -> np.ndarray:
    """The queries as float32 rows, refused when they are none, of another model or of another dim."""
    array = check_vectors(queries, "query")
    check_not_empty(array.shape[0], "queries")
    if model_version and held_version and model_version != held_version:
        raise FailedPrecondition(
            f"queries are from model version {model_version!r}, the index holds {held_version!r}; "
            f"{REINDEX_HINT}"
        )
    if held_dim and array.shape[1] != held_dim:
        raise InvalidArgument(f"queries have dim {array.shape[1]}, the index holds dim {held_dim}")
    return array


def metadata_json(entries: Mapping[str, str]) -> str:
    """Metadata as compact JSON, "" when empty: how every backend keeps it."""
    if not entries:
        return ""
    return json.dumps(dict(entries), ensure_ascii=False, separators=(",", ":"))


def encode_metadata(entries: Mapping[str, str]) -> bytes | None:
    """Returns metadata as compact JSON bytes (a fraction of a dict's memory), None when empty."""
    return metadata_json(entries).encode() if entries else None


def decode_metadata(encoded: bytes | None) -> dict[str, str]:
    return json.loads(encoded) if encoded is not None else {}
