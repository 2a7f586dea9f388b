"""The index on Milvus: the `Store` contract, with the FAISS store's semantics, over a Milvus collection.

`index_service --backend milvus --milvus-uri URI` serves this instead of the FAISS store. The service
then holds no state of its own: each call reads and writes Milvus, so any number of replicas can serve
one collection, as encoder replicas serve one model.

The collection (`--milvus-collection`, default `imgsearch`):

    id        VARCHAR primary key, max_length MAX_ID_BYTES (the store's id limit)
    vector    FLOAT_VECTOR with the index's dim; a FLAT index with the L2 metric (exact k-NN)
    metadata  VARCHAR holding the metadata as compact JSON ("" when empty), at most 65,535 bytes

The index's dim is the vector field's dim and its model version is the collection property
`imgsearch.model_version`, so both live in Milvus: a restarted service or another replica sees them.
Like the FAISS store, the first upsert fixes them, and a later upsert may change them only while the
index is empty (a new dim drops and creates the empty collection again). The collection is created with
consistency level Strong and every read asks for it, so a write one replica acknowledged is seen by the
next read on any replica.

Distances: Milvus's L2 metric gives the squared Euclidean distance, as FAISS's IndexFlatL2 does (Milvus
Lite too: it squares its norm to match); the store returns its square root, so both backends give the
same numbers to float rounding.

Input is checked with store.py's helpers before Milvus is asked, so both backends refuse the same bad
requests with the same messages. A Milvus that cannot be reached when the store opens stops the service
at start (a restart policy tries again). Once serving, a Milvus call that fails, or is still retrying
after `timeout_s` (`--milvus-timeout-s`), is StorageUnavailable (gRPC UNAVAILABLE, which clients retry)
naming the URI, whether pymilvus raises it as a MilvusException or passes the gRPC error on as it is (it
does for DEADLINE_EXCEEDED: a Milvus server killed mid-call, or one started again and not yet answering);
pymilvus reconnects by itself once Milvus is back.

What differs from the FAISS store, by the nature of a shared database:
- The dim and model-version checks and Delete's (deleted, missing) count read Milvus first, then write:
  two replicas racing to fill an empty index with different models can both pass the check.
- `bytes_used` counts the vectors only (count x dim x 4); Milvus does not cheaply report the size of
  ids and metadata.
- Metadata whose JSON is over 65,535 bytes (Milvus's VARCHAR limit) is refused with INVALID_ARGUMENT;
  the FAISS store takes up to its per-key limits (64 keys of 4,096 bytes).
- Vectors over 32,768 dimensions (Milvus's default limit) are refused with INVALID_ARGUMENT.
- A batch goes to Milvus as one upsert request, but Milvus has no transactions: a request that fails
  part way may leave part of the batch stored (UNAVAILABLE; sent again, it is stored once, as upserts
  are by id), where the FAISS store applies all of a batch or none of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from imgsearch.wire import MetadataBatch
from index_service.store import (
    MAX_ID_BYTES,
    REINDEX_HINT,
    Check,
    FailedPrecondition,
    InvalidArgument,
    Match,
    NotFound,
    Stats,
    StorageUnavailable,
    StoreCopy,
    check_id_batch,
    check_queries,
    check_upsert,
    metadata_json,
)

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "imgsearch"
ID_FIELD, VECTOR_FIELD, METADATA_FIELD = "id", "vector", "metadata"
MAX_METADATA_JSON_BYTES = 65_535  # Milvus's largest VARCHAR
MAX_DIM = 32_768  # Milvus's default proxy.maxDimension
MODEL_VERSION_PROPERTY = "imgsearch.model_version"
MILVUS_MAX_TOPK = 16_384  # Milvus refuses a search limit above this (and nq x limit is bounded too)
IDS_PER_QUERY = 1000  # ids in one `id in [...]` filter
SCAN_PAGE = 1000  # rows per query while copying the collection for a scan
CONSISTENCY = "Strong"
SEARCH_PARAMS = {"metric_type": "L2"}
CONNECT_ATTEMPTS, CONNECT_PAUSE_S = 3, 0.5
LOCAL_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False, "grpc.keepalive_time_ms": 300_000}

# Milvus Lite (a local `.db` URI) serves the file from threads in this process, one server per file,
# shared by every client on it. The last store on a file to close stops that server and unlocks the file.
_local_users: dict[str, int] = {}
_local_users_lock = threading.Lock()


class Layout(NamedTuple):
    dim: int
    model_version: str
    collection_id: int  # Milvus's id of the collection: a new one when it is dropped and made again


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


def filter_literal(value: str) -> str:
    """A string as a double-quoted Milvus filter literal (pymilvus's own `get(ids=...)` and
    `query_iterator` do not escape, so an id holding a quote would break them)."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def ids_filter(ids: Sequence[str]) -> str:
    return f"{ID_FIELD} in [{','.join(filter_literal(i) for i in ids)}]"


def rpc_message(error: grpc.RpcError) -> str:
    """A gRPC error pymilvus passed on, in one line: its status code and details."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code is not None else 'gRPC error'}: {details}"


def _decode_metadata(encoded: str) -> dict[str, str]:
    return json.loads(encoded) if encoded else {}


class MilvusStore:
    """Exact-L2 k-NN over string ids with metadata, in a Milvus collection; thread-safe (Milvus is the
    state; this object holds only the connection)."""

    def __init__(
        self,
        uri: str,
        collection: str = DEFAULT_COLLECTION,
        *,
        max_k: int = 1000,
        timeout_s: float = 10.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the Milvus timeout must be positive, got {timeout_s}")
        if max_k + 1 > MILVUS_MAX_TOPK:  # search by id asks for k + 1
            raise ValueError(f"--max-k {max_k} is over Milvus's limit of {MILVUS_MAX_TOPK - 1}")
        if not collection:
            raise ValueError("the Milvus collection name is empty")
        if is_local(uri) and not Path(uri).absolute().parent.is_dir():
            raise ValueError(f"the Milvus Lite file {uri}: its directory does not exist")
        self.uri = uri
        self.collection = collection
        self.max_k = max_k
        self.timeout_s = timeout_s
        self.where = f"Milvus at {redact(uri)}"
        self._client: MilvusClient | None = None
        self._client_lock = threading.Lock()
        # The key Milvus Lite's server manager files the server under.
        self._local_path = os.path.abspath(uri) if is_local(uri) else None
        self._closed = False
        self._loaded: set[int] = set()  # collection ids this store has seen loaded
        if self._local_path is not None:
            with _local_users_lock:
                _local_users[self._local_path] = _local_users.get(self._local_path, 0) + 1
        try:
            self._connected()
        except StorageUnavailable:
            self.close()
            raise

    # ---- the connection -----------------------------------------------------------------

    def _connected(self) -> MilvusClient:
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
                log.info("connected to %s, collection %r", self.where, self.collection)
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
    def _milvus(self, doing: str) -> Iterator[MilvusClient]:
        """The client, with what Milvus raises turned into StorageUnavailable naming the URI."""
        client = self._connected()
        try:
            yield client
        except MilvusException as error:
            raise StorageUnavailable(f"{self.where} failed {doing}: {error.message}") from error
        except grpc.RpcError as error:  # pymilvus does not wrap DEADLINE_EXCEEDED (nor a few others)
            raise StorageUnavailable(
                f"{self.where} failed {doing}: {rpc_message(error)} (timeout {self.timeout_s:g} s)"
            ) from error

    def close(self) -> None:
        """Closes the connection; the last store on a Milvus Lite file also stops its server."""
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

    # ---- the collection -----------------------------------------------------------------

    def _layout(self, client: MilvusClient) -> Layout | None:
        """The collection's dim and model version, or None when it does not exist yet. The first time
        this store sees a collection it makes sure it is loaded (Milvus Lite loads none at start)."""
        # Asked first, as describing a missing collection makes pymilvus log an error.
        if not client.has_collection(self.collection, timeout=self.timeout_s):
            return None
        described = client.describe_collection(self.collection, timeout=self.timeout_s)
        fields = {f["name"]: f for f in described.get("fields", [])}
        vector, ids, metadata = (fields.get(n) for n in (VECTOR_FIELD, ID_FIELD, METADATA_FIELD))
        properties = described.get("properties") or {}
        if (
            vector is None
            or vector.get("type") != DataType.FLOAT_VECTOR
            or ids is None
            or not ids.get("is_primary")
            or ids.get("type") != DataType.VARCHAR
            or metadata is None
            or MODEL_VERSION_PROPERTY not in properties
        ):
            raise FailedPrecondition(
                f"the collection {self.collection!r} in {self.where} is not an imgsearch index; "
                "name another with --milvus-collection"
            )
        layout = Layout(
            int(vector["params"]["dim"]),
            str(properties[MODEL_VERSION_PROPERTY]),
            int(described.get("collection_id") or 0),
        )
        if layout.collection_id not in self._loaded:
            self._index_and_load(client)
            self._loaded.add(layout.collection_id)
        return layout

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

    def _create(self, client: MilvusClient, dim: int, model_version: str) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field(METADATA_FIELD, DataType.VARCHAR, max_length=MAX_METADATA_JSON_BYTES)
        client.create_collection(
            self.collection,
            schema=schema,
            consistency_level=CONSISTENCY,
            properties={MODEL_VERSION_PROPERTY: model_version},
            timeout=self.timeout_s,
        )
        self._index_and_load(client)
        log.info(
            "created the collection %r in %s (dim %d, model %r)",
            self.collection,
            self.where,
            dim,
            model_version,
        )

    def _count(self, client: MilvusClient) -> int:
        rows = client.query(
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=CONSISTENCY,
            timeout=self.timeout_s,
        )
        return int(rows[0]["count(*)"])

    def _prepare_for(self, client: MilvusClient, dim: int, model_version: str) -> None:
        """Makes the collection ready for vectors of this dim and model version, or refuses them as the
        FAISS store does: an index that holds items keeps its dim and model version."""
        layout = self._layout(client)
        if layout is None:
            try:
                self._create(client, dim, model_version)
                return
            except MilvusException:
                layout = self._layout(client)  # another replica created it first: check against theirs
                if layout is None:
                    raise
        if (layout.dim, layout.model_version) == (dim, model_version):
            return
        held_dim, held_version = layout.dim, layout.model_version
        if self._count(client):
            if dim != held_dim:
                raise InvalidArgument(f"vectors have dim {dim}, the index holds dim {held_dim}")
            raise FailedPrecondition(
                f"vectors are from model version {model_version!r}, the index holds "
                f"{held_version!r}; {REINDEX_HINT}"
            )
        if dim != held_dim:  # empty: the dim is the schema's, so the collection is made again
            client.drop_collection(self.collection, timeout=self.timeout_s)
            self._create(client, dim, model_version)
        else:
            client.alter_collection_properties(
                self.collection, {MODEL_VERSION_PROPERTY: model_version}, timeout=self.timeout_s
            )

    # ---- writes -------------------------------------------------------------------------

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, metadata: MetadataBatch = (), model_version: str = ""
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
        rows = [
            {ID_FIELD: item_id, VECTOR_FIELD: vector, METADATA_FIELD: text}
            for item_id, vector, text in zip(checked_ids, array, encoded, strict=True)
        ]
        with self._milvus("to upsert") as client:
            self._prepare_for(client, array.shape[1], model_version)
            client.upsert(self.collection, rows, timeout=self.timeout_s)
            return self._count(client)

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Removes ids; returns (deleted, missing)."""
        checked_ids = check_id_batch(list(dict.fromkeys(ids)))
        with self._milvus("to delete") as client:
            if self._layout(client) is None:
                return 0, len(checked_ids)
            present = list(self._fetch(client, checked_ids, with_vectors=False))
            for start in range(0, len(present), IDS_PER_QUERY):
                client.delete(
                    self.collection,
                    filter=ids_filter(present[start : start + IDS_PER_QUERY]),
                    timeout=self.timeout_s,
                )
            return len(present), len(checked_ids) - len(present)

    # ---- reads --------------------------------------------------------------------------

    def _fetch(
        self, client: MilvusClient, ids: Sequence[str], *, with_vectors: bool
    ) -> dict[str, dict[str, Any]]:
        """The stored rows of these (distinct) ids, by id."""
        fields = [ID_FIELD, METADATA_FIELD] + ([VECTOR_FIELD] if with_vectors else [])
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), IDS_PER_QUERY):
            rows = client.query(
                self.collection,
                filter=ids_filter(unique[start : start + IDS_PER_QUERY]),
                output_fields=fields,
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
            if layout is None:
                return [], np.zeros((0, 0), np.float32), list(checked_ids)
            rows = self._fetch(client, checked_ids, with_vectors=True)
        found = [i for i in checked_ids if i in rows]
        vectors = np.array([rows[i][VECTOR_FIELD] for i in found], np.float32).reshape(len(found), layout.dim)
        return (
            [(i, _decode_metadata(rows[i][METADATA_FIELD])) for i in found],
            vectors,
            [i for i in checked_ids if i not in rows],
        )

    def search(
        self, queries: np.ndarray, k: int, model_version: str = "", *, check: Check | None = None
    ) -> list[list[Match]]:
        """Returns the k nearest stored items of each query, nearest first."""
        self._check_k(k)
        array = check_queries(queries, "", "", 0)
        with self._milvus("to search") as client:
            layout = self._layout(client)
            if layout is None:
                return [[] for _ in range(array.shape[0])]
            array = check_queries(array, model_version, layout.model_version, layout.dim)
            return self._search(client, array, k, exclude=None, check=check)

    def search_by_id(self, ids: Sequence[str], k: int, *, check: Check | None = None) -> list[list[Match]]:
        """Returns the k nearest items to each stored id, the item itself excluded."""
        self._check_k(k)
        checked_ids = check_id_batch(ids, unique=False)
        with self._milvus("to search by id") as client:
            layout = self._layout(client)
            rows = self._fetch(client, checked_ids, with_vectors=True) if layout is not None else {}
            missing = [i for i in checked_ids if i not in rows]
            if missing or layout is None:
                raise NotFound(f"id {missing[0]!r} is not in the index")
            queries = np.array([rows[i][VECTOR_FIELD] for i in checked_ids], np.float32)
            shaped = queries.reshape(len(checked_ids), layout.dim)
            return self._search(client, shaped, k, list(checked_ids), check=check)

    def _search(
        self,
        client: MilvusClient,
        queries: np.ndarray,
        k: int,
        exclude: list[str] | None,
        check: Check | None = None,
    ) -> list[list[Match]]:
        limit = k + (1 if exclude is not None else 0)
        per_call = max(1, MILVUS_MAX_TOPK // limit)  # Milvus bounds the hits of one call as well
        results: list[list[Match]] = []
        for start in range(0, queries.shape[0], per_call):
            if start and check is not None:
                check()
            hits = client.search(
                self.collection,
                data=list(queries[start : start + per_call]),
                limit=limit,
                anns_field=VECTOR_FIELD,
                search_params=SEARCH_PARAMS,
                output_fields=[METADATA_FIELD],
                consistency_level=CONSISTENCY,
                timeout=self.timeout_s,
            )
            for offset, query_hits in enumerate(hits):
                skip = exclude[start + offset] if exclude is not None else None
                matches = [
                    Match(
                        hit["id"],
                        float(np.sqrt(max(float(hit["distance"]), 0.0))),  # squared L2, as FAISS gives
                        _decode_metadata(hit["entity"][METADATA_FIELD]),
                    )
                    for hit in query_hits
                    if hit["id"] != skip
                ]
                results.append(matches[:k])
        return results

    def stats(self) -> Stats:
        with self._milvus("to count") as client:
            layout = self._layout(client)
            if layout is None:
                return Stats(0, 0, "", 0)
            count = self._count(client)
        return Stats(count, layout.dim, layout.model_version, count * layout.dim * 4)

    def item_sizes(self) -> tuple[int, float] | None:
        """None: Milvus would have to read the collection to say; a reply found too large after the work
        is still refused, by the request interceptor."""
        return None

    def copy(self, *, with_vectors: bool = True) -> StoreCopy:
        """Every item, read page by page in id order (for a scan), all of it before this returns.

        On a Milvus server every page is read at the timestamp of the first, as pymilvus's own
        query_iterator does, so the copy is the collection at one moment. Milvus Lite gives no such
        timestamp: there each page is read at Strong consistency as it comes, so a write made on another
        replica while the copy is being read may or may not be in it (each item still appears at most
        once, and every item present throughout appears). Writes after this returns (after the scan's
        first page is sent) are not in the scan, as with the FAISS store."""
        fields = [ID_FIELD, METADATA_FIELD] + ([VECTOR_FIELD] if with_vectors else [])
        ids: list[str] = []
        metadata: list[bytes | None] = []
        vectors: list[Any] = []
        with self._milvus("to read the collection for a scan") as client:
            layout = self._layout(client)
            if layout is None:
                return StoreCopy(0, "", [], [], np.zeros((0, 0), np.float32), 0)
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
                expr = f'{ID_FIELD} != ""' if last is None else f"{ID_FIELD} > {filter_literal(last)}"
                rows = client.query(
                    self.collection,
                    filter=expr,
                    output_fields=fields,
                    limit=SCAN_PAGE,
                    timeout=self.timeout_s,
                    **options,
                )
                for row in rows:
                    ids.append(row[ID_FIELD])
                    text = row[METADATA_FIELD]
                    metadata.append(text.encode() if text else None)
                    if with_vectors:
                        vectors.append(row[VECTOR_FIELD])
                if not rows:  # a page may hold more or fewer than SCAN_PAGE rows; the end is an empty one
                    break
                last = rows[-1][ID_FIELD]
        array = np.array(vectors, np.float32).reshape(len(vectors), layout.dim)
        return StoreCopy(layout.dim, layout.model_version, ids, metadata, array, 0)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise InvalidArgument(f"k must be 1 to {self.max_k}, got {k}")
