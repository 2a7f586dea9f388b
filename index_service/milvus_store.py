"""The index on Milvus: the `Store` contract, with the FAISS store's semantics, over Milvus collections,
and the `Collections` contract (named collections and aliases) over Milvus's own collections and aliases.

`index_service --backend milvus --milvus-uri URI` serves this instead of the FAISS store. The service
then holds no state of its own: each call reads and writes Milvus, so any number of replicas can serve
one set of collections, as encoder replicas serve one model.

Names. `--milvus-collection` (default `imgsearch`) is the prefix P. Our `default` collection is the Milvus
collection named P itself, so a deployment made before named collections keeps its data as `default`.
Every other collection, and every alias, is the Milvus name `P__<escaped name>`, where the escape doubles
each '_' and writes each '-' as `_d` (Milvus names allow letters, digits and '_' only): `a_b` is `P__a__b`,
`a-b` is `P__a_db`, and a Milvus name decodes back to at most one of our names, so none collide.
Collections and aliases share Milvus's one namespace as they share ours: Milvus itself refuses an alias
named as a collection, and a collection named as an alias.

Aliases are Milvus aliases (create_alias, alter_alias, drop_alias, list_aliases, describe_alias; Milvus
Lite 3.2 and the Milvus 2.3.5 server both have them), so SetAlias is one Milvus call that every replica
sees at once. Nothing about names is cached here: each lookup of a collection other than `default` asks
Milvus (has_collection, then describe_collection, which resolves an alias to its collection), and the
store it returns works on the collection the alias named at that moment, so a search that started before
an alias moved finishes on the old collection, one after it on the new, never on a mix. The lookup's two
calls (about 0.85 ms on Milvus Lite, 1.4 ms on a server) are the two the store would make anyway to read
the collection's layout, which its first call then takes from the lookup: a data call costs the Milvus
calls it did with one collection (`default`'s lookup asks nothing).

Each collection (`--milvus-collection`'s, or one CreateCollection made):

    id        VARCHAR primary key, max_length MAX_ID_BYTES (the store's id limit)
    vector    FLOAT_VECTOR with the collection's dim; a FLAT index with the L2 metric (exact k-NN)
    meta      JSON: the metadata as an object ({} when empty), what filters read; at most 65,535 bytes
              as compact JSON (a Milvus server takes 65,536)

A collection made before filters has, instead of `meta`, `metadata`: a VARCHAR of the metadata as
compact JSON ("" when empty), which Milvus cannot filter on. It is kept as it is, and read and written as
before: everything works on it but a filtered Search or SearchById, which is FAILED_PRECONDITION saying
how to copy it into a new collection (`imgsearch migrate --collection OLD --to ADDRESS --to-collection
NEW`, then use NEW or point an alias at it; Milvus 2.3.5 cannot add a field to a collection). Duplicates,
which reads every item out anyway, filters such a collection's items here, with filters.matches. An
empty one given vectors of a new dim is made again, with `meta` (so is every collection CreateCollection
made before filters, at its first vectors). A replica of before reads a collection with `meta` as "not an
imgsearch index": replace every replica before creating collections.

Filters (milvus_filters.py) are Milvus filter expressions over `meta`, evaluated by Milvus in the search
itself: a search of a FLAT index with a filter is a brute force over the rows that match, so each query
gets exactly its k nearest matching items at any selectivity (nothing is cut from a fixed top-k);
tests/service/test_milvus_filters.py holds both engines to a brute force at 100 to 0.1 %. max_distance
then cuts each query's k nearest at that distance (inclusive), as in the FAISS store: a query may get
fewer than k, or none. Duplicates reads the matching items' ids and vectors out page by page (the scan's
pages, at one timestamp on a server) and compares them here (duplicates.py), as the FAISS store does.

The dim is the vector field's dim; the model version and model name are the collection properties
`imgsearch.model_version` and `imgsearch.model_name` (absent in a collection made before model names:
""), so all three live in Milvus: a restarted service or another replica sees them. CreateCollection has
no dim yet, and Milvus needs one, so it makes the collection with a 1-dim vector field and the property
`imgsearch.dim` "0" (no dim yet; such a collection is never indexed or loaded and holds nothing); the
first upsert makes it again with its vectors' dim. As in the FAISS store, a collection is filled by one
model: the one it was made for, or else the first its vectors name (store.check_model refuses another,
empty collection or not, when both are named). The first upsert fixes the dim and model version, and a
later one may change them only while the collection is empty (a new dim drops and makes the empty
collection again, its aliases dropped first and made again after it: Milvus 2.3.5 drops a collection
with aliases but leaves them broken). Every collection is created with consistency level Strong and
every read asks for it, so a write one replica acknowledged is seen by the next read on any replica.

Distances: Milvus's L2 metric gives the squared Euclidean distance in float32, as FAISS's IndexFlatL2 does
(Milvus Lite too: it squares its norm to match); the store returns its square root taken in float32, as
the FAISS store does, so both backends give the same numbers to float rounding, and a distance sent back
as a max_distance (a float on the wire) keeps its item.

Input is checked with store.py's helpers before Milvus is asked, so both backends refuse the same bad
requests with the same messages. A Milvus that cannot be reached when the store opens stops the service
at start (a restart policy tries again). Once serving, a Milvus call that fails, or is still retrying
after `timeout_s` (`--milvus-timeout-s`), is StorageUnavailable (gRPC UNAVAILABLE, which clients retry)
naming the URI, whether pymilvus raises it as a MilvusException or passes the gRPC error on as it is (it
does for DEADLINE_EXCEEDED: a Milvus server killed mid-call, or one started again and not yet answering);
pymilvus reconnects by itself once Milvus is back.

What differs from the FAISS store, by the nature of a shared database:
- The dim, model and model-version checks, Delete's (deleted, missing) count, and the name checks of
  CreateCollection, DropCollection and SetAlias read Milvus first, then write: two replicas racing (to
  fill an empty collection with different models, to create one name, to drop a collection while
  another points an alias at it) can both pass the check. A collection with no items given vectors of a
  new dim (its first, or after it was emptied) is dropped and made again, its aliases with it: meanwhile
  a call through it or them is NOT_FOUND or UNAVAILABLE.
- `bytes_used` counts the vectors only (count x dim x 4); Milvus does not cheaply report the size of
  ids and metadata.
- Metadata whose JSON is over 65,535 bytes (Milvus's VARCHAR limit; a server's JSON field takes 65,536)
  is refused with INVALID_ARGUMENT; the FAISS store takes up to its per-key limits (64 keys of 4,096
  bytes).
- A filtered Search or SearchById on a collection made before filters is FAILED_PRECONDITION (above).
  Milvus Lite, a Python engine, evaluates a filter row by row: about 5 microseconds a row per value
  compared (milvus_filters.py); a Milvus server evaluates it in C++, the FAISS store over numpy columns.
- Vectors over 32,768 dimensions (Milvus's default limit) are refused with INVALID_ARGUMENT.
- A batch goes to Milvus as one upsert request, but Milvus has no transactions: a request that fails
  part way may leave part of the batch stored (UNAVAILABLE; sent again, it is stored once, as upserts
  are by id), where the FAISS store applies all of a batch or none of it.
- A collection one replica dropped may still be answered for by a call another replica had already
  looked up (it then fails with UNAVAILABLE or NOT_FOUND); a Milvus collection named under the prefix
  that is not an imgsearch collection is left out of ListCollections (and refused when named).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from imgsearch.wire import MetadataBatch
from index_service.duplicates import DEFAULT_MAX_PAIRS, Group, duplicate_groups
from index_service.filters import Filter, matches
from index_service.milvus_filters import filter_expression, filter_literal
from index_service.store import (
    DEFAULT_COLLECTION,
    MAX_ID_BYTES,
    REINDEX_HINT,
    AlreadyExists,
    Check,
    CollectionInfo,
    FailedPrecondition,
    InvalidArgument,
    Match,
    NotFound,
    Stats,
    StorageUnavailable,
    StoreCopy,
    check_id_batch,
    check_model,
    check_name,
    check_queries,
    check_upsert,
    collection_name,
    metadata_json,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "imgsearch"  # --milvus-collection: the default collection, and the others' prefix
SEPARATOR = "__"  # between the prefix and an escaped name
MAX_MILVUS_NAME = 255  # Milvus's default common.maxNameLength
MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ID_FIELD, VECTOR_FIELD = "id", "vector"
META_FIELD = "meta"  # the metadata as a JSON object: what filters read (collections made since filters)
METADATA_FIELD = "metadata"  # the metadata as JSON text, in a collection made before filters
MAX_METADATA_JSON_BYTES = 65_535  # Milvus's largest VARCHAR; a JSON field takes at most 65,536 bytes
MAX_DIM = 32_768  # Milvus's default proxy.maxDimension
MODEL_VERSION_PROPERTY = "imgsearch.model_version"
MODEL_NAME_PROPERTY = "imgsearch.model_name"
DIM_PROPERTY = "imgsearch.dim"  # "0": made by CreateCollection, no vectors yet (the field's dim is 1)
MILVUS_MAX_TOPK = 16_384  # Milvus refuses a search limit above this (and nq x limit is bounded too)
IDS_PER_QUERY = 1000  # ids in one `id in [...]` filter
SCAN_PAGE = 1000  # rows per query while copying the collection for a scan
CONSISTENCY = "Strong"
SEARCH_PARAMS = {"metric_type": "L2"}
CONNECT_ATTEMPTS, CONNECT_PAUSE_S = 3, 0.5
LOCAL_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False, "grpc.keepalive_time_ms": 300_000}

# Milvus Lite (a local `.db` URI) serves the file from threads in this process, one server per file,
# shared by every client on it. The last connection to a file to close stops that server and unlocks it.
_local_users: dict[str, int] = {}
_local_users_lock = threading.Lock()


class Layout(NamedTuple):
    dim: int  # 0: no vectors yet (a collection CreateCollection made)
    model_version: str
    collection_id: int  # Milvus's id of the collection: a new one when it is dropped and made again
    model_name: str = ""
    filterable: bool = True  # the metadata is in META_FIELD (JSON); False: METADATA_FIELD (text), made before


def metadata_field(layout: Layout) -> str:
    return META_FIELD if layout.filterable else METADATA_FIELD


def row_metadata(row: Mapping[str, Any], layout: Layout) -> dict[str, str]:
    """A row's metadata, from whichever field the collection keeps it in."""
    if layout.filterable:
        return dict(row[META_FIELD] or {})
    return _decode_metadata(row[METADATA_FIELD])


def is_local(uri: str) -> bool:
    """A `.db` path is Milvus Lite, served in this process; anything else is a Milvus server's address."""
    return uri.endswith(".db")


def redact(uri: str) -> str:
    """The URI without its credentials (user:password@ or token@, as pymilvus reads them), fit for logs
    and error messages."""
    if is_local(uri):
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def ids_filter(ids: Sequence[str]) -> str:
    return f"{ID_FIELD} in [{','.join(filter_literal(i) for i in ids)}]"


def rpc_message(error: grpc.RpcError) -> str:
    """A gRPC error pymilvus passed on, in one line: its status code and details."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code is not None else 'gRPC error'}: {details}"


def _decode_metadata(encoded: str) -> dict[str, str]:
    return json.loads(encoded) if encoded else {}


def escape_name(name: str) -> str:
    """One of our names (check_name's) as Milvus may spell it: '_' doubled, '-' as `_d`."""
    return name.replace("_", "__").replace("-", "_d")


def unescape_name(escaped: str) -> str | None:
    """escape_name undone; None when the text is no escaped name of ours."""
    out: list[str] = []
    position = 0
    while position < len(escaped):
        char = escaped[position]
        if char == "_":
            pair = escaped[position : position + 2]
            if pair == "__":
                out.append("_")
            elif pair == "_d":
                out.append("-")
            else:
                return None
            position += 2
        else:
            out.append(char)
            position += 1
    name = "".join(out)
    try:
        check_name(name)
    except InvalidArgument:
        return None
    return name


def check_prefix(prefix: str) -> str:
    """The Milvus collection prefix (--milvus-collection), or ValueError: a Milvus name with room after
    it for the separator and the longest escaped name."""
    room = MAX_MILVUS_NAME - len(SEPARATOR) - 2 * 64
    if not MILVUS_NAME.match(prefix) or len(prefix) > room:
        raise ValueError(
            f"the Milvus collection {prefix!r} is not valid: 1 to {room} letters, digits and '_', "
            "not beginning with a digit"
        )
    return prefix


class MilvusConnection:
    """One client to Milvus, made on first use and shared by every store on it; thread-safe. Closing it
    stops a Milvus Lite file's server once no other connection in this process uses the file."""

    def __init__(self, uri: str, *, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the Milvus timeout must be positive, got {timeout_s}")
        if is_local(uri) and not Path(uri).absolute().parent.is_dir():
            raise ValueError(f"the Milvus Lite file {uri}: its directory does not exist")
        self.uri = uri
        self.timeout_s = timeout_s
        self.where = f"Milvus at {redact(uri)}"
        self._client: MilvusClient | None = None
        self._client_lock = threading.Lock()
        # The key Milvus Lite's server manager files the server under.
        self._local_path = os.path.abspath(uri) if is_local(uri) else None
        self._closed = False
        # (Milvus name, collection id) of the collections seen indexed and loaded through this connection.
        self.loaded: set[tuple[str, int]] = set()
        if self._local_path is not None:
            with _local_users_lock:
                _local_users[self._local_path] = _local_users.get(self._local_path, 0) + 1
        try:
            self.connected()
        except StorageUnavailable:
            self.close()
            raise

    def connected(self) -> MilvusClient:
        with self._client_lock:
            if self._closed:
                raise StorageUnavailable(f"the index's connection to {self.where} is closed")
            if self._client is None:
                try:
                    self._client = self._connect()
                except (MilvusException, grpc.RpcError) as error:
                    hint = (
                        "; Milvus Lite opens a file from one process only: is another one using it?"
                        if self._local_path is not None
                        else ""
                    )
                    message = error.message if isinstance(error, MilvusException) else rpc_message(error)
                    raise StorageUnavailable(f"{self.where} is not reachable: {message}{hint}") from error
                log.info("connected to %s", self.where)
            return self._client

    def _connect(self) -> MilvusClient:
        """A new client, tried CONNECT_ATTEMPTS times: a connection Milvus just closed (a GOAWAY, which
        gRPC channels to one address share) fails the first try though Milvus is up."""
        # Milvus Lite's server sends GOAWAY "too many pings" to pymilvus's keepalive on an idle connection;
        # in this process there is no network to keep alive, so an idle local client does not ping.
        options = LOCAL_GRPC_OPTIONS if self._local_path is not None else {}
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return MilvusClient(self.uri, timeout=self.timeout_s, grpc_options=options)
            except (MilvusException, grpc.RpcError):
                if attempt == CONNECT_ATTEMPTS:
                    raise
                time.sleep(CONNECT_PAUSE_S)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def milvus(self, doing: str) -> Iterator[MilvusClient]:
        """The client, with what Milvus raises turned into StorageUnavailable naming the URI."""
        client = self.connected()
        try:
            yield client
        except MilvusException as error:
            raise StorageUnavailable(f"{self.where} failed {doing}: {error.message}") from error
        except grpc.RpcError as error:  # pymilvus does not wrap DEADLINE_EXCEEDED (nor a few others)
            raise StorageUnavailable(
                f"{self.where} failed {doing}: {rpc_message(error)} (timeout {self.timeout_s:g} s)"
            ) from error

    def forget(self, milvus_name: str) -> None:
        """The collection was dropped: it is loaded again when next seen (Milvus Lite's collection ids are
        all 0, so a collection made again under the name would look already loaded)."""
        self.loaded = {key for key in self.loaded if key[0] != milvus_name}

    def close(self) -> None:
        """Closes the connection; the last on a Milvus Lite file also stops its server."""
        with self._client_lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except MilvusException as error:
                log.warning("closing the connection to %s: %s", self.where, error.message)
        if self._local_path is not None:
            with _local_users_lock:
                left = _local_users.get(self._local_path, 1) - 1
                if left > 0:
                    _local_users[self._local_path] = left
                    return
                _local_users.pop(self._local_path, None)
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self._local_path)


class MilvusStore:
    """Exact-L2 k-NN over string ids with metadata, in one Milvus collection; thread-safe (Milvus is the
    state; this object holds only the connection).

    Made alone (`MilvusStore(uri, collection)`), it is the single collection of before named
    collections: it opens and closes its own connection, and creates the collection at the first upsert.
    MilvusCollections makes one per call on its shared connection, for one collection by its Milvus name
    (an alias already resolved); one other than `default` that has gone is NOT_FOUND, not made again."""

    def __init__(
        self,
        uri: str,
        collection: str = DEFAULT_PREFIX,
        *,
        max_k: int = 1000,
        timeout_s: float = 10.0,
        connection: MilvusConnection | None = None,
        name: str = DEFAULT_COLLECTION,
        described: Mapping[str, Any] | None = None,
    ) -> None:
        if max_k + 1 > MILVUS_MAX_TOPK:  # search by id asks for k + 1
            raise ValueError(f"--max-k {max_k} is over Milvus's limit of {MILVUS_MAX_TOPK - 1}")
        if not collection:
            raise ValueError("the Milvus collection name is empty")
        self.collection = collection  # the Milvus name
        self.name = name  # ours
        self.max_k = max_k
        # The default collection is made at its first upsert; another is made by CreateCollection only.
        self._create_missing = name == DEFAULT_COLLECTION
        # What a lookup read of the collection: the layout of this store's first call.
        self._described = described
        self._owns_connection = connection is None
        self._connection = (
            connection if connection is not None else MilvusConnection(uri, timeout_s=timeout_s)
        )
        self.uri = self._connection.uri
        self.timeout_s = self._connection.timeout_s
        self.where = self._connection.where

    def _milvus(self, doing: str) -> contextlib.AbstractContextManager[MilvusClient]:
        return self._connection.milvus(doing)

    def close(self) -> None:
        """Closes the connection if this store opened it (a Milvus Lite file's server stops with the last)."""
        if self._owns_connection:
            self._connection.close()

    # ---- the collection -----------------------------------------------------------------

    def _layout(self, client: MilvusClient) -> Layout | None:
        """The collection's dim, model version and model name, or None when the default collection does
        not exist yet (NotFound for another). The first time this connection sees a collection with
        vectors it makes sure it is loaded (Milvus Lite loads none at start)."""
        described, self._described = self._described, None
        if described is None:
            # Asked first, as describing a missing collection makes pymilvus log an error.
            if not client.has_collection(self.collection, timeout=self.timeout_s):
                if self._create_missing:
                    return None
                raise NotFound(f"collection {self.name!r} does not exist")
            described = client.describe_collection(self.collection, timeout=self.timeout_s)
        layout = self._read_layout(described)
        key = (self.collection, layout.collection_id)
        if layout.dim and key not in self._connection.loaded:
            self._index_and_load(client)
            self._connection.loaded.add(key)
        return layout

    def _read_layout(self, described: Mapping[str, Any]) -> Layout:
        fields = {f["name"]: f for f in described.get("fields", [])}
        vector, ids, meta, text = (
            fields.get(n) for n in (VECTOR_FIELD, ID_FIELD, META_FIELD, METADATA_FIELD)
        )
        properties = described.get("properties") or {}
        filterable = meta is not None and meta.get("type") == DataType.JSON
        if (
            vector is None
            or vector.get("type") != DataType.FLOAT_VECTOR
            or ids is None
            or not ids.get("is_primary")
            or ids.get("type") != DataType.VARCHAR
            or not (filterable or (text is not None and text.get("type") == DataType.VARCHAR))
            or MODEL_VERSION_PROPERTY not in properties
        ):
            raise FailedPrecondition(
                f"the collection {self.collection!r} in {self.where} is not an imgsearch index; "
                "name another with --milvus-collection"
            )
        return Layout(
            0 if properties.get(DIM_PROPERTY) == "0" else int(vector["params"]["dim"]),
            str(properties[MODEL_VERSION_PROPERTY]),
            int(described.get("collection_id") or 0),
            str(properties.get(MODEL_NAME_PROPERTY, "")),
            filterable,
        )

    def _index_and_load(self, client: MilvusClient) -> None:
        """Gives the collection its FLAT index unless it has one (a replica may have stopped between
        creating the collection and its index), then loads it unless it is loaded."""
        if not client.list_indexes(self.collection, field_name=VECTOR_FIELD, timeout=self.timeout_s):
            index_params = client.prepare_index_params()
            index_params.add_index(field_name=VECTOR_FIELD, index_type="FLAT", metric_type="L2")
            # sync=False: create_collection(index_params=...) would wait for the index to be built,
            # polling every 0.5 s, and a FLAT index has nothing to build.
            client.create_index(self.collection, index_params, timeout=self.timeout_s, sync=False)
        state = client.get_load_state(self.collection, timeout=self.timeout_s).get("state")
        if state != LoadState.Loaded:
            log.info("loading the collection %r in %s", self.collection, self.where)
            client.load_collection(self.collection, timeout=self.timeout_s)

    def _create(self, client: MilvusClient, dim: int, model_version: str, model_name: str) -> None:
        """Creates the collection; dim 0: with no dim yet (a 1-dim field, neither indexed nor loaded)."""
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim or 1)
        schema.add_field(META_FIELD, DataType.JSON)
        properties = {
            MODEL_VERSION_PROPERTY: model_version,
            MODEL_NAME_PROPERTY: model_name,
            DIM_PROPERTY: str(dim),
        }
        client.create_collection(
            self.collection,
            schema=schema,
            consistency_level=CONSISTENCY,
            properties=properties,
            timeout=self.timeout_s,
        )
        if dim:
            self._index_and_load(client)
        log.info(
            "created the collection %r in %s (dim %d, model %r version %r)",
            self.collection,
            self.where,
            dim,
            model_name,
            model_version,
        )

    def _recreate(self, client: MilvusClient, dim: int, model_version: str, model_name: str) -> None:
        """Drops the (empty) collection and makes it again with another dim, its aliases dropped first
        and made again after it (Milvus 2.3.5 would leave them broken)."""
        aliases = list(client.list_aliases(self.collection, timeout=self.timeout_s).get("aliases") or [])
        for alias in aliases:
            client.drop_alias(alias, timeout=self.timeout_s)
        client.drop_collection(self.collection, timeout=self.timeout_s)
        self._connection.forget(self.collection)
        self._create(client, dim, model_version, model_name)
        for alias in aliases:
            client.create_alias(self.collection, alias, timeout=self.timeout_s)

    def _count(self, client: MilvusClient, layout: Layout | None = None) -> int:
        if layout is not None and not layout.dim:
            return 0  # no vectors yet, and not loaded: there is nothing to count
        rows = client.query(
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=CONSISTENCY,
            timeout=self.timeout_s,
        )
        return int(rows[0]["count(*)"])

    def _prepare_for(self, client: MilvusClient, dim: int, model_version: str, model_name: str) -> bool:
        """Makes the collection ready for vectors of this dim, model version and model name, or refuses
        them as the FAISS store does: a collection keeps the model name it was made for or first given
        (check_model: refused only when both are known, empty or not), and while it holds items its dim
        and model version. Returns whether it keeps metadata in META_FIELD (else METADATA_FIELD)."""
        layout = self._layout(client)
        if layout is None:
            try:
                self._create(client, dim, model_version, model_name)
                return True
            except MilvusException:
                layout = self._layout(client)  # another replica created it first: check against theirs
                if layout is None:
                    raise
        check_model(self.name, layout.model_name, model_name)
        name = layout.model_name or model_name  # an unknown one is recorded by the first that is said
        if (layout.dim, layout.model_version, layout.model_name) == (dim, model_version, name):
            return layout.filterable
        held_dim, held_version = layout.dim, layout.model_version
        if self._count(client, layout):
            if dim != held_dim:
                raise InvalidArgument(
                    f"vectors have dim {dim}, the collection {self.name!r} holds dim {held_dim}"
                )
            if model_version != held_version:
                raise FailedPrecondition(
                    f"vectors are from model version {model_version!r}, the collection {self.name!r} "
                    f"holds {held_version!r}; {REINDEX_HINT}"
                )
        if dim != held_dim:  # empty: the dim is the schema's, so the collection is made again (as of now)
            self._recreate(client, dim, model_version, name)
            return True
        client.alter_collection_properties(
            self.collection,
            {MODEL_VERSION_PROPERTY: model_version, MODEL_NAME_PROPERTY: name},
            timeout=self.timeout_s,
        )
        return layout.filterable

    # ---- writes -------------------------------------------------------------------------

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: MetadataBatch = (),
        model_version: str = "",
        model_name: str = "",
    ) -> int:
        """Inserts or replaces a batch; returns the count stored after it."""
        checked_ids, array, checked_metadata = check_upsert(ids, vectors, metadata)
        if array.shape[1] > MAX_DIM:
            raise InvalidArgument(
                f"vectors have dim {array.shape[1]}; the Milvus backend takes at most {MAX_DIM}"
            )
        encoded = [metadata_json(m) for m in checked_metadata]
        for position, text in enumerate(encoded):
            size = len(text.encode("utf-8"))
            if size > MAX_METADATA_JSON_BYTES:
                raise InvalidArgument(
                    f"metadata {position} is {size} bytes as JSON; the Milvus backend keeps at most "
                    f"{MAX_METADATA_JSON_BYTES}"
                )
        with self._milvus("to upsert") as client:
            values: Sequence[object] = encoded
            field = METADATA_FIELD
            if self._prepare_for(client, array.shape[1], model_version, model_name):
                field, values = META_FIELD, checked_metadata
            rows = [
                {ID_FIELD: item_id, VECTOR_FIELD: vector, field: value}
                for item_id, vector, value in zip(checked_ids, array, values, strict=True)
            ]
            client.upsert(self.collection, rows, timeout=self.timeout_s)
            return self._count(client)

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Removes ids; returns (deleted, missing)."""
        checked_ids = check_id_batch(list(dict.fromkeys(ids)))
        with self._milvus("to delete") as client:
            layout = self._layout(client)
            if layout is None or not layout.dim:
                return 0, len(checked_ids)
            present = list(self._fetch(client, checked_ids, []))
            for start in range(0, len(present), IDS_PER_QUERY):
                client.delete(
                    self.collection,
                    filter=ids_filter(present[start : start + IDS_PER_QUERY]),
                    timeout=self.timeout_s,
                )
            return len(present), len(checked_ids) - len(present)

    # ---- reads --------------------------------------------------------------------------

    def _fetch(
        self, client: MilvusClient, ids: Sequence[str], fields: list[str]
    ) -> dict[str, dict[str, Any]]:
        """The stored rows of these (distinct) ids, by id, with these fields (and the id)."""
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), IDS_PER_QUERY):
            rows = client.query(
                self.collection,
                filter=ids_filter(unique[start : start + IDS_PER_QUERY]),
                output_fields=[ID_FIELD, *fields],
                consistency_level=CONSISTENCY,
                timeout=self.timeout_s,
            )
            found.update((row[ID_FIELD], row) for row in rows)
        return found

    def get(self, ids: Sequence[str]) -> tuple[list[tuple[str, dict[str, str]]], np.ndarray, list[str]]:
        """Returns (found items in request order, their vectors, missing ids)."""
        checked_ids = check_id_batch(ids, unique=False)
        with self._milvus("to get items") as client:
            layout = self._layout(client)
            if layout is None or not layout.dim:
                return [], np.zeros((0, 0), np.float32), list(checked_ids)
            rows = self._fetch(client, checked_ids, [metadata_field(layout), VECTOR_FIELD])
        found = [i for i in checked_ids if i in rows]
        vectors = np.array([rows[i][VECTOR_FIELD] for i in found], np.float32).reshape(len(found), layout.dim)
        return (
            [(i, row_metadata(rows[i], layout)) for i in found],
            vectors,
            [i for i in checked_ids if i not in rows],
        )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        model_version: str = "",
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Returns the k nearest stored items of each query that match the filter, nearest first, none
        farther than max_distance."""
        self._check_k(k)
        array = check_queries(queries, "", "", 0)
        with self._milvus("to search") as client:
            layout = self._layout(client)
            if layout is None or not layout.dim:
                if layout is not None:
                    check_queries(array, model_version, layout.model_version, 0)
                return [[] for _ in range(array.shape[0])]
            array = check_queries(array, model_version, layout.model_version, layout.dim)
            expr = self._expression(layout, conditions)
            return self._search(client, layout, array, k, None, check, expr, max_distance)

    def search_by_id(
        self,
        ids: Sequence[str],
        k: int,
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Returns the k nearest items to each stored id that match the filter, the item itself excluded
        (the filter chooses the results, not the items searched from)."""
        self._check_k(k)
        checked_ids = check_id_batch(ids, unique=False)
        with self._milvus("to search by id") as client:
            layout = self._layout(client)
            rows = self._fetch(client, checked_ids, [VECTOR_FIELD]) if layout and layout.dim else {}
            missing = [i for i in checked_ids if i not in rows]
            if missing or layout is None:
                raise NotFound(f"id {missing[0]!r} is not in the index")
            expr = self._expression(layout, conditions)
            queries = np.array([rows[i][VECTOR_FIELD] for i in checked_ids], np.float32)
            shaped = queries.reshape(len(checked_ids), layout.dim)
            return self._search(client, layout, shaped, k, list(checked_ids), check, expr, max_distance)

    def _expression(self, layout: Layout, conditions: Filter) -> str:
        """The filter as a Milvus expression ("" for none); FailedPrecondition for a collection made
        before filters (its metadata is text, which Milvus cannot filter on)."""
        if not conditions:
            return ""
        if not layout.filterable:
            raise FailedPrecondition(
                f"the collection {self.name!r} cannot be filtered: it was made before filters, and keeps "
                "its metadata as text, which Milvus cannot filter on. Copy it into a new collection, which "
                f"can: `imgsearch migrate --collection {self.name} --to ADDRESS --to-collection NEW` "
                "(ADDRESS: this index service's), then search NEW, or point an alias at it (`imgsearch "
                "aliases set ALIAS NEW`)"
            )
        return filter_expression(conditions, META_FIELD, server=not is_local(self.uri))

    def _search(
        self,
        client: MilvusClient,
        layout: Layout,
        queries: np.ndarray,
        k: int,
        exclude: list[str] | None,
        check: Check | None = None,
        expr: str = "",
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Exact k-NN of each query among the items the expression selects (Milvus searches a FLAT index
        by brute force over the rows that match, so every query gets its k nearest matching items at any
        selectivity), cut at max_distance."""
        limit = k + (1 if exclude is not None else 0)
        per_call = max(1, MILVUS_MAX_TOPK // limit)  # Milvus bounds the hits of one call as well
        field = metadata_field(layout)
        results: list[list[Match]] = []
        for start in range(0, queries.shape[0], per_call):
            if start and check is not None:
                check()
            hits = client.search(
                self.collection,
                data=list(queries[start : start + per_call]),
                filter=expr,
                limit=limit,
                anns_field=VECTOR_FIELD,
                search_params=SEARCH_PARAMS,
                output_fields=[field],
                consistency_level=CONSISTENCY,
                timeout=self.timeout_s,
            )
            for offset, query_hits in enumerate(hits):
                skip = exclude[start + offset] if exclude is not None else None
                matches: list[Match] = []
                for hit in query_hits:
                    if hit["id"] == skip:
                        continue
                    # Milvus gives the squared L2 in float32, as FAISS does; its root in float32 too, so a
                    # distance sent back as a max_distance (a float on the wire) keeps the item.
                    distance = float(np.sqrt(np.float32(max(float(hit["distance"]), 0.0))))
                    if max_distance is not None and distance > max_distance:
                        break  # nearest first: the rest are farther still
                    matches.append(Match(hit["id"], distance, row_metadata(hit["entity"], layout)))
                results.append(matches[:k])
        return results

    def duplicates(
        self,
        max_distance: float,
        conditions: Filter = (),
        *,
        check: Check | None = None,
        max_pairs: int = DEFAULT_MAX_PAIRS,
    ) -> tuple[list[Group], int, int]:
        """(the groups of items within max_distance of each other, the pairs linked, the items compared):
        the matching items' ids and vectors are read out page by page (`check` between pages), then
        compared here (duplicates.py). A collection made before filters is filtered here, with
        filters.matches, as its metadata is read out with them."""
        ids: list[str] = []
        vectors: list[Any] = []
        with self._milvus("to read the collection for duplicates") as client:
            layout = self._layout(client)
            if layout is None or not layout.dim:
                return [], 0, 0
            here = bool(conditions) and not layout.filterable
            expr = "" if here else self._expression(layout, conditions)
            fields = [VECTOR_FIELD, METADATA_FIELD] if here else [VECTOR_FIELD]
            for page, rows in enumerate(self._pages(client, layout, fields, expr)):
                if page and check is not None:
                    check()
                for row in rows:
                    if here and not matches(conditions, row_metadata(row, layout)):
                        continue
                    ids.append(row[ID_FIELD])
                    vectors.append(row[VECTOR_FIELD])
        array = np.array(vectors, np.float32).reshape(len(vectors), layout.dim)
        del vectors
        groups, pairs = duplicate_groups(ids, array, max_distance, check=check, max_pairs=max_pairs)
        return groups, pairs, len(ids)

    def _pages(
        self, client: MilvusClient, layout: Layout, fields: list[str], expr: str = ""
    ) -> Iterator[list[dict[str, Any]]]:
        """The rows the expression selects (every row for ""), with these fields and the id, page by page
        in id order.

        On a Milvus server every page is read at the timestamp of the first, as pymilvus's own
        query_iterator does, so the pages are the collection at one moment. Milvus Lite gives no such
        timestamp: there each page is read at Strong consistency as it comes, so a write made on another
        replica meanwhile may or may not be in them (each item still appears at most once, and every item
        present throughout appears)."""
        # As pymilvus's query_iterator asks: pages in id order, all read at the first one's timestamp.
        options: dict[str, Any] = {
            "iterator": "True",
            "reduce_stop_for_best": "True",
            "collection_id": layout.collection_id,
        }
        first = client.query(
            self.collection,
            filter=f'{ID_FIELD} != ""',
            output_fields=[],
            limit=1,
            timeout=self.timeout_s,
            **options,
        )
        session_ts = int((getattr(first, "extra", None) or {}).get("iterator_session_ts", 0) or 0)
        if session_ts > 0:
            options["guarantee_timestamp"] = session_ts
        else:
            options["consistency_level"] = CONSISTENCY
        last: str | None = None
        while True:
            after = f'{ID_FIELD} != ""' if last is None else f"{ID_FIELD} > {filter_literal(last)}"
            rows = client.query(
                self.collection,
                filter=f"({expr}) and ({after})" if expr else after,
                output_fields=[ID_FIELD, *fields],
                limit=SCAN_PAGE,
                timeout=self.timeout_s,
                **options,
            )
            if not rows:  # a page may hold more or fewer than SCAN_PAGE rows; the end is an empty one
                return
            yield rows
            last = rows[-1][ID_FIELD]

    def stats(self) -> Stats:
        with self._milvus("to count") as client:
            layout = self._layout(client)
            if layout is None:
                return Stats(0, 0, "", 0)
            count = self._count(client, layout)
        return Stats(count, layout.dim, layout.model_version, count * layout.dim * 4, layout.model_name)

    def item_sizes(self) -> tuple[int, float] | None:
        """None: Milvus would have to read the collection to say; a reply found too large after the work
        is still refused, by the request interceptor."""
        return None

    def copy(self, *, with_vectors: bool = True) -> StoreCopy:
        """Every item, read page by page in id order (for a scan), all of it before this returns.

        On a Milvus server every page is read at the timestamp of the first, so the copy is the collection
        at one moment; on Milvus Lite each page as it comes (see `_pages`). Writes after this returns
        (after the scan's first page is sent) are not in the scan, as with the FAISS store."""
        ids: list[str] = []
        metadata: list[bytes | None] = []
        vectors: list[Any] = []
        with self._milvus("to read the collection for a scan") as client:
            layout = self._layout(client)
            if layout is None or not layout.dim:
                version, name = (layout.model_version, layout.model_name) if layout else ("", "")
                return StoreCopy(0, version, [], [], np.zeros((0, 0), np.float32), 0, name)
            fields = [metadata_field(layout)] + ([VECTOR_FIELD] if with_vectors else [])
            for rows in self._pages(client, layout, fields):
                for row in rows:
                    ids.append(row[ID_FIELD])
                    filterable = layout.filterable
                    text = metadata_json(row[META_FIELD] or {}) if filterable else row[METADATA_FIELD]
                    metadata.append(text.encode() if text else None)
                    if with_vectors:
                        vectors.append(row[VECTOR_FIELD])
        array = np.array(vectors, np.float32).reshape(len(vectors), layout.dim)
        return StoreCopy(layout.dim, layout.model_version, ids, metadata, array, 0, layout.model_name)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise InvalidArgument(f"k must be 1 to {self.max_k}, got {k}")


class MilvusCollections:
    """Our named collections and aliases over Milvus's (see the module's doc): the `Collections`
    contract. Thread-safe, and holds no state but the connection, so replicas sharing one Milvus agree."""

    def __init__(
        self,
        uri: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        max_k: int = 1000,
        timeout_s: float = 10.0,
    ) -> None:
        if max_k + 1 > MILVUS_MAX_TOPK:  # search by id asks for k + 1
            raise ValueError(f"--max-k {max_k} is over Milvus's limit of {MILVUS_MAX_TOPK - 1}")
        self.prefix = check_prefix(prefix)
        self.max_k = max_k
        self._connection = MilvusConnection(uri, timeout_s=timeout_s)
        self.uri = uri
        self.timeout_s = timeout_s
        self.where = self._connection.where

    def close(self) -> None:
        """Closes the connection (a Milvus Lite file's server stops with the last in this process)."""
        self._connection.close()

    def remove_everything(self) -> None:
        """Drops every alias and collection of ours, `default`'s Milvus collection too (for tests and
        tools: nothing serves this)."""
        with self._connection.milvus("to remove every collection") as client:
            for milvus_alias in client.list_aliases(timeout=self.timeout_s).get("aliases") or []:
                if self.our_name(milvus_alias) is not None:
                    client.drop_alias(milvus_alias, timeout=self.timeout_s)
            for milvus_name in client.list_collections(timeout=self.timeout_s):
                if self.our_name(milvus_name) is not None:
                    client.drop_collection(milvus_name, timeout=self.timeout_s)
                    self._connection.forget(milvus_name)

    # ---- names ----------------------------------------------------------------------------

    def milvus_name(self, name: str) -> str:
        """The Milvus name of one of our collections or aliases."""
        if name == DEFAULT_COLLECTION:
            return self.prefix
        return self.prefix + SEPARATOR + escape_name(name)

    def our_name(self, milvus_name: str) -> str | None:
        """The name of ours a Milvus collection or alias has; None when it is not one of ours."""
        if milvus_name == self.prefix:
            return DEFAULT_COLLECTION
        head = self.prefix + SEPARATOR
        if not milvus_name.startswith(head):
            return None
        name = unescape_name(milvus_name[len(head) :])
        return name if name != DEFAULT_COLLECTION else None

    def _store(self, milvus_name: str, name: str, described: Mapping[str, Any] | None = None) -> MilvusStore:
        return MilvusStore(
            self.uri,
            milvus_name,
            max_k=self.max_k,
            connection=self._connection,
            name=name,
            described=described,
        )

    def _describe(self, client: MilvusClient, milvus_name: str) -> dict[str, Any] | None:
        """The collection a Milvus name is, or an alias names (its `collection_name` is the collection's
        own); None when there is neither."""
        # Asked first, as describing a missing collection makes pymilvus log an error.
        if not client.has_collection(milvus_name, timeout=self.timeout_s):
            return None
        described: dict[str, Any] = client.describe_collection(milvus_name, timeout=self.timeout_s)
        return described

    def _aliases_of(self, client: MilvusClient, milvus_name: str) -> list[str]:
        """Every alias pointing at the collection, ours by our name, any other by its Milvus name."""
        names = client.list_aliases(milvus_name, timeout=self.timeout_s).get("aliases") or []
        return sorted(self.our_name(a) or a for a in names)

    # ---- the data calls' collection -------------------------------------------------------

    def lookup(self, name: str) -> tuple[str, MilvusStore]:
        """(the collection's name, its store) for a collection or an alias, asked of Milvus each time."""
        wanted = collection_name(name)
        if wanted == DEFAULT_COLLECTION:
            return wanted, self._store(self.prefix, wanted)
        with self._connection.milvus("to look up a collection") as client:
            described = self._describe(client, self.milvus_name(wanted))
        found = self.our_name(str(described["collection_name"])) if described is not None else None
        if described is None or found is None:
            raise NotFound(f"no collection or alias is named {wanted!r} (imgsearch collections list)")
        return found, self._store(str(described["collection_name"]), found, described)

    # ---- collections ----------------------------------------------------------------------

    def create(self, name: str, model_name: str = "") -> CollectionInfo:
        """A new, empty collection; AlreadyExists when a collection or an alias has the name."""
        check_name(name)
        if name == DEFAULT_COLLECTION:
            raise AlreadyExists(f"a collection named {name!r} exists already")
        milvus_name = self.milvus_name(name)
        with self._connection.milvus("to create a collection") as client:
            described = self._describe(client, milvus_name)
            if described is not None:
                pointed = str(described["collection_name"])
                if pointed == milvus_name:
                    raise AlreadyExists(f"a collection named {name!r} exists already")
                raise AlreadyExists(
                    f"{name!r} is an alias (of {self.our_name(pointed) or pointed!r}); a collection "
                    "cannot share its name"
                )
            self._store(milvus_name, name)._create(client, 0, "", model_name)
        return CollectionInfo(name, 0, 0, model_name, "", 0)

    def drop(self, name: str) -> int:
        """Removes a collection and its items, returning how many."""
        check_name(name)
        if name == DEFAULT_COLLECTION:
            raise FailedPrecondition(
                f"the {DEFAULT_COLLECTION!r} collection cannot be dropped; delete its items instead"
            )
        milvus_name = self.milvus_name(name)
        with self._connection.milvus("to drop a collection") as client:
            described = self._describe(client, milvus_name)
            if described is None:
                raise NotFound(f"no collection is named {name!r}")
            pointed = str(described["collection_name"])
            if pointed != milvus_name:
                raise NotFound(
                    f"{name!r} is an alias (of {self.our_name(pointed) or pointed!r}), not a collection: "
                    "remove it with DropAlias (imgsearch aliases drop)"
                )
            pointing = self._aliases_of(client, milvus_name)
            if pointing:
                raise FailedPrecondition(
                    f"collection {name!r} cannot be dropped: the alias {pointing[0]!r} points at it"
                    + (f" (and {len(pointing) - 1} more)" if len(pointing) > 1 else "")
                    + "; move or drop the alias first (imgsearch aliases set / drop)"
                )
            store = self._store(milvus_name, name, described)
            count = store._count(client, store._layout(client))
            client.drop_collection(milvus_name, timeout=self.timeout_s)
            self._connection.forget(milvus_name)
        log.info("dropped the collection %r (%d items) in %s", milvus_name, count, self.where)
        return count

    def collections(self) -> list[CollectionInfo]:
        """Every collection of ours, sorted by name, with the aliases pointing at each."""
        with self._connection.milvus("to list the collections") as client:
            ours = {DEFAULT_COLLECTION: self.prefix}
            for milvus_name in client.list_collections(timeout=self.timeout_s):
                name = self.our_name(milvus_name)
                if name is not None:
                    ours[name] = milvus_name
            aliases: dict[str, list[str]] = {}
            for alias, target in self._alias_map(client).items():
                aliases.setdefault(target, []).append(alias)
            infos = []
            for name, milvus_name in sorted(ours.items()):
                store = self._store(milvus_name, name)
                try:
                    layout = store._layout(client)
                except NotFound:  # dropped meanwhile
                    continue
                except FailedPrecondition as error:  # not one of ours, though named so
                    log.warning("%s", error)
                    continue
                if layout is None:  # the default collection, before its first vectors
                    infos.append(CollectionInfo(name, 0, 0, "", "", 0, tuple(aliases.get(name, []))))
                    continue
                count = store._count(client, layout)
                infos.append(
                    CollectionInfo(
                        name,
                        count,
                        layout.dim,
                        layout.model_name,
                        layout.model_version,
                        count * layout.dim * 4,
                        tuple(aliases.get(name, [])),
                    )
                )
        return infos

    def total(self) -> Stats:
        """Every collection together (count and bytes summed; dim and model are the default's)."""
        infos = self.collections()
        default = next(
            (i for i in infos if i.name == DEFAULT_COLLECTION),
            CollectionInfo(DEFAULT_COLLECTION, 0, 0, "", "", 0),
        )
        return Stats(
            sum(i.count for i in infos),
            default.dim,
            default.model_version,
            sum(i.bytes_used for i in infos),
            default.model_name,
        )

    # ---- aliases --------------------------------------------------------------------------

    def _alias_map(self, client: MilvusClient) -> dict[str, str]:
        """Our aliases -> our collections, sorted by alias."""
        found: dict[str, str] = {}
        for milvus_alias in client.list_aliases(timeout=self.timeout_s).get("aliases") or []:
            alias = self.our_name(milvus_alias)
            if alias is None:
                continue
            # Asked of has_collection first: an alias dropped since the list would make pymilvus log.
            if not client.has_collection(milvus_alias, timeout=self.timeout_s):
                continue
            target = client.describe_alias(milvus_alias, timeout=self.timeout_s).get("collection_name", "")
            name = self.our_name(str(target))
            if name is not None:
                found[alias] = name
        return dict(sorted(found.items()))

    def aliases(self) -> dict[str, str]:
        """alias -> collection, sorted by alias."""
        with self._connection.milvus("to list the aliases") as client:
            return self._alias_map(client)

    def set_alias(self, alias: str, collection: str) -> str:
        """Points the alias at the collection, in one Milvus call (create_alias or alter_alias); returns
        the collection it pointed at before ("" when new)."""
        check_name(alias, "alias")
        target = check_name(collection)
        if alias == DEFAULT_COLLECTION:
            raise AlreadyExists(f"a collection is named {alias!r}; an alias cannot share its name")
        milvus_alias, milvus_target = self.milvus_name(alias), self.milvus_name(target)
        with self._connection.milvus("to set an alias") as client:
            current = self._describe(client, milvus_alias)
            previous = ""
            if current is not None:
                pointed = str(current["collection_name"])
                if pointed == milvus_alias:
                    raise AlreadyExists(f"a collection is named {alias!r}; an alias cannot share its name")
                previous = self.our_name(pointed) or pointed
            if target == DEFAULT_COLLECTION:
                if not client.has_collection(milvus_target, timeout=self.timeout_s):
                    # The default collection always exists; Milvus needs it made to name it.
                    self._store(milvus_target, target)._create(client, 0, "", "")
            else:
                described = self._describe(client, milvus_target)
                if described is None:
                    raise NotFound(f"no collection is named {target!r}")
                pointed = str(described["collection_name"])
                if pointed != milvus_target:
                    raise NotFound(
                        f"{target!r} is an alias (of {self.our_name(pointed) or pointed!r}), not a "
                        "collection: point an alias at a collection"
                    )
            if previous == target:
                return previous
            if current is not None:
                client.alter_alias(milvus_target, milvus_alias, timeout=self.timeout_s)
            else:
                try:
                    client.create_alias(milvus_target, milvus_alias, timeout=self.timeout_s)
                except MilvusException:
                    # Made meanwhile by another replica, or one Milvus 2.3.5 left broken when its
                    # collection was dropped (it lists no such alias, and create_alias refuses it).
                    client.alter_alias(milvus_target, milvus_alias, timeout=self.timeout_s)
        log.info("alias %r -> %r (was %r) in %s", alias, target, previous, self.where)
        return previous

    def drop_alias(self, alias: str) -> str:
        """Removes the alias; returns the collection it pointed at."""
        check_name(alias, "alias")
        milvus_alias = self.milvus_name(alias)
        with self._connection.milvus("to drop an alias") as client:
            current = self._describe(client, milvus_alias)
            if current is None or current["collection_name"] == milvus_alias:
                what = ": it is a collection" if current is not None else ""
                raise NotFound(f"no alias is named {alias!r}{what}")
            client.drop_alias(milvus_alias, timeout=self.timeout_s)
        pointed = str(current["collection_name"])
        log.info("dropped the alias %r (-> %r) in %s", alias, pointed, self.where)
        return self.our_name(pointed) or pointed
