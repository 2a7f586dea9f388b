"""The Index gRPC servicer: protobuf in, plain calls on a Store, protobuf out; the server's conversions."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from imgsearch import wire
from imgsearch.v1 import index_pb2, index_pb2_grpc
from imgsearch_server.errors import RequestError, call_gone, grpc_errors
from imgsearch_server.memory import release_free_memory
from index_service.duplicates import DEFAULT_MAX_PAIRS, TooManyPairs
from index_service.faiss_store import SearchColumns
from index_service.filters import (
    ANY_OF,
    EQUALS,
    EXISTS,
    NONE_OF,
    NOT_EQUALS,
    PREFIX,
    Condition,
    Filter,
    check_filter,
    check_max_distance,
    matches,
)
from index_service.store import (
    AlreadyExists,
    Check,
    CollectionInfo,
    Collections,
    FailedPrecondition,
    InvalidArgument,
    Match,
    NotFound,
    Stats,
    StorageFull,
    StorageUnavailable,
    Store,
    StoreCopy,
    encode_metadata,
)

DEFAULT_SCAN_PAGE = 1000  # items per Scan page when the request leaves page_size at 0
ITEM_OVERHEAD_BYTES = 16  # a page's framing per item, beyond the item's own encoded size
# A match's encoded size beyond its id and metadata: the distance, field tags and lengths, and the
# metadata map's framing (each entry's key and value are counted in the store's text bytes).
MATCH_OVERHEAD_BYTES = 24
# In a columnar reply (SearchResponse.counts and on) a match costs its id and its metadata's JSON (both
# counted in the store's text bytes) and 12 bytes: its id's end, its distance and its metadata's end; a
# query costs 4 (its count). The fields' framing is a few bytes a reply.
COLUMNAR_MATCH_OVERHEAD_BYTES = 12
COLUMNAR_QUERY_OVERHEAD_BYTES = 4
RELEASE_AFTER_RESULTS = 50_000  # a search this large hands its heap back to the system afterwards

ERRORS: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    TooManyPairs: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FEW_ENDS = 64  # _ends of at most this many parts packs them with struct
GROUPS_PER_PAGE = 1000  # duplicate groups per Duplicates reply (fewer in one that would pass half a message)

_OPERATORS = {
    index_pb2.Condition.EQUALS: EQUALS,
    index_pb2.Condition.NOT_EQUALS: NOT_EQUALS,
    index_pb2.Condition.ANY_OF: ANY_OF,
    index_pb2.Condition.NONE_OF: NONE_OF,
    index_pb2.Condition.PREFIX: PREFIX,
    index_pb2.Condition.EXISTS: EXISTS,
}


# ---- the store's values as protobuf: every conversion of the server side ----------------------


def _filter(message: index_pb2.Filter) -> Filter:
    """The request's filter, checked (InvalidArgument naming a bad condition)."""
    return check_filter(
        [Condition(c.key, _OPERATORS.get(c.op, ""), tuple(c.values)) for c in message.conditions]
    )


def _max_distance(request: index_pb2.SearchRequest | index_pb2.SearchByIdRequest) -> float | None:
    return check_max_distance(request.max_distance if request.HasField("max_distance") else None)


def _matching(copied: StoreCopy, conditions: Filter) -> StoreCopy:
    """The copy cut down to the items that match the filter (decoding each item's metadata once)."""
    keep = [row for row, metadata in enumerate(copied.metadata()) if matches(conditions, metadata)]
    return StoreCopy(
        copied.dim,
        copied.model_version,
        [copied.ids[row] for row in keep],
        [copied.encoded_metadata[row] for row in keep],
        copied.vectors[keep] if len(copied.vectors) else copied.vectors,
        copied.lsn,
        copied.model_name,
    )


def _neighbors(results: list[list[Match]]) -> index_pb2.SearchResponse:
    return index_pb2.SearchResponse(
        results=[
            index_pb2.Neighbors(
                matches=[index_pb2.Match(id=m.id, distance=m.distance, metadata=m.metadata) for m in row]
            )
            for row in results
        ]
    )


def _columns_of(results: list[list[Match]]) -> SearchColumns:
    """Match lists (what a backend without `search_columns` gives: Milvus) as the columns of a reply."""
    flat = [match for row in results for match in row]
    return SearchColumns(
        np.fromiter(map(len, results), np.int64, len(results)),
        [match.id for match in flat],
        np.array([match.distance for match in flat], np.float32),
        [encode_metadata(match.metadata) for match in flat],
    )


def _ends(lengths: np.ndarray) -> bytes:
    """uint32 little-endian end offsets of consecutive parts of these lengths (SearchResponse.id_ends)."""
    if lengths.size <= FEW_ENDS:  # a one-query reply: struct beats numpy's calls (1 us against 3)
        return struct.pack(f"<{lengths.size}I", *itertools.accumulate(lengths.tolist()))
    return np.cumsum(lengths, dtype=np.int64).astype("<u4").tobytes()


# Measured (2 cores, shared; 128-d, ids like img-0000001, no metadata; batches of 1,000 queries, k = 10,
# queries/s of the median call, interleaved; the index service as a child process, in-process
# faiss.IndexFlatL2.search at its better thread count as the reference):
#
#   rows   in-process   before: Match messages   after: IndexClient.search   .search_arrays   old client
#   10k        44,232        8,392 (0.19)            25,474 (0.58)             31,814 (0.72)    9,800 (0.22)
#   100k        4,914          801 (0.16)             4,709 (0.96)              5,103 (1.04)    3,586 (0.73)
#   1M            449           70 (0.16)               511 (1.14)                526 (1.17)      490 (1.09)
#
# (another run at 10k: 37,441 in process, 0.25 before, 0.65 and 0.86 after.) "Before" is the old client on
# the old server; "old client" an old client's request (Match messages) to this server. At 100k and 1M the
# gain is mostly the store's BLAS chunks (faiss_store.BLAS_CHUNK_DISTANCES); at 10k, where FAISS takes ~23 ms
# a batch, it is the columnar reply: what is left is ~5 ms of gRPC and the server's Python, and in
# `IndexClient.search` ~5 ms more for its 10,000 Match objects (search_arrays makes none).
def _columnar(columns: SearchColumns, max_bytes: int) -> index_pb2.SearchResponse:
    """The columnar SearchResponse (index.proto says each field): every match's id and metadata (the
    store's own JSON bytes, sent as they are) concatenated with their end offsets, distances as float32.
    Over max_bytes of ids and metadata it is refused (RESOURCE_EXHAUSTED) before any is joined."""
    ids, metadata = columns.ids, columns.metadata
    joined = "".join(ids)
    if joined.isascii():  # one byte a character (CPython knows without looking): no id encoded on its own
        id_bytes = joined.encode("ascii")
        id_lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    else:
        encoded = [item_id.encode() for item_id in ids]
        id_bytes = b"".join(encoded)
        id_lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    del joined
    parts: list[bytes] = []
    if metadata.count(None) < len(metadata):  # none at all when no match has any
        parts = [entry or b"" for entry in metadata]
    metadata_lengths = np.fromiter(map(len, parts), np.int64, len(parts))
    size = len(id_bytes) + int(metadata_lengths.sum())
    if size > max_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the reply holds {size} bytes of ids and metadata, over the limit of {max_bytes} bytes per "
            "message (--max-message-bytes); ask for fewer results or items per call",
        )
    return index_pb2.SearchResponse(
        counts=columns.counts.astype("<u4").tobytes(),
        ids=id_bytes,
        id_ends=_ends(id_lengths),
        distances=columns.distances.astype("<f4").tobytes(),
        metadata=b"".join(parts),
        metadata_ends=_ends(metadata_lengths),
    )


def _got(
    items: list[tuple[str, dict[str, str]]], vectors: np.ndarray, missing: list[str], with_vectors: bool
) -> index_pb2.GetResponse:
    reply = index_pb2.GetResponse(
        items=[index_pb2.Item(id=i, metadata=m) for i, m in items], missing_ids=missing
    )
    if with_vectors:
        reply.vectors.CopyFrom(wire.pack(vectors))
    return reply


def _stats(name: str, stats: Stats) -> index_pb2.StatsResponse:
    return index_pb2.StatsResponse(
        count=stats.count,
        dim=stats.dim,
        model_version=stats.model_version,
        bytes_used=stats.bytes_used,
        collection=name,
        model_name=stats.model_name,
    )


def _collection(info: CollectionInfo) -> index_pb2.Collection:
    return index_pb2.Collection(
        name=info.name,
        count=info.count,
        dim=info.dim,
        model_name=info.model_name,
        model_version=info.model_version,
        bytes_used=info.bytes_used,
        aliases=list(info.aliases),
    )


def _page(
    copied: StoreCopy, start: int, page_size: int, with_vectors: bool, max_page_bytes: int
) -> index_pb2.ScanResponse:
    """Up to page_size items from row `start`, fewer where more would pass max_page_bytes (never none)."""
    page = index_pb2.ScanResponse(total=len(copied.ids), model_version=copied.model_version)
    add = page.items.add
    row_bytes = copied.dim * 4 if with_vectors else 0
    size = 0
    stop = min(start + page_size, len(copied.ids))
    for row, (item_id, metadata) in enumerate(
        zip(copied.ids[start:stop], copied.metadata(start, stop), strict=True), start
    ):
        item = add(id=item_id, metadata=metadata)
        size += item.ByteSize() + row_bytes + ITEM_OVERHEAD_BYTES
        if size > max_page_bytes and row > start:
            del page.items[-1]
            stop = row
            break
    if with_vectors:
        page.vectors.CopyFrom(wire.pack(copied.vectors[start:stop]))
    return page


# ---- the servicer -----------------------------------------------------------------------------


class IndexServicer(index_pb2_grpc.IndexServicer):
    def __init__(
        self,
        collections: Collections,
        max_batch: int,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_results: int = 100_000,
        max_collections: int = 1000,
        max_duplicate_pairs: int = DEFAULT_MAX_PAIRS,
    ) -> None:
        self.max_duplicate_pairs = max_duplicate_pairs
        self.collections = collections
        self.max_collections = max_collections
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        self.max_results = max_results
        # A Scan page is cut short past this, so that pages of large metadata still fit in a message.
        self.max_page_bytes = max_message_bytes // 2

    @staticmethod
    def _skip_if_gone(context: grpc.ServicerContext) -> None:
        """A search that waited in the queue past its deadline is not worth running."""
        code = call_gone(context)
        if code is not None:
            raise RequestError(code, f"abandoned before searching: {code.name.lower().replace('_', ' ')}")

    def _check_batch(self, count: int, what: str) -> None:
        if count > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} {what} in one call; the limit is {self.max_batch} (--max-batch)",
            )

    @grpc_errors(ERRORS)
    def Upsert(
        self, request: index_pb2.UpsertRequest, context: grpc.ServicerContext
    ) -> index_pb2.UpsertResponse:
        self._check_batch(len(request.ids), "ids")
        _, store = self.collections.lookup(request.collection)
        vectors = wire.unpack(request.vectors, expected_count=len(request.ids))
        metadata = [m.entries for m in request.metadata]
        count = store.upsert(list(request.ids), vectors, metadata, request.model_version, request.model_name)
        return index_pb2.UpsertResponse(upserted=len(request.ids), count=count)

    @grpc_errors(ERRORS)
    def Delete(
        self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> index_pb2.DeleteResponse:
        self._check_batch(len(request.ids), "ids")
        _, store = self.collections.lookup(request.collection)
        deleted, missing = store.delete(list(request.ids))
        return index_pb2.DeleteResponse(deleted=deleted, missing=missing, count=store.stats().count)

    @grpc_errors(ERRORS)
    def Get(self, request: index_pb2.GetRequest, context: grpc.ServicerContext) -> index_pb2.GetResponse:
        self._check_batch(len(request.ids), "ids")
        _, store = self.collections.lookup(request.collection)
        items, vectors, missing = store.get(list(request.ids))
        return _got(items, vectors, missing, request.with_vectors)

    def _check_results(self, store: Store, queries: int, k: int, columnar: bool = False) -> None:
        """Refuses, before any work, a search whose answer is over the results budget or could not fit
        in a reply (in the form asked for: `columnar` or the Match messages). The reply's size is
        estimated from the average stored item (its id and metadata), where the store can say cheaply; a
        reply that turns out larger all the same is refused after the work, with RESOURCE_EXHAUSTED (by
        `_columnar` before it joins the ids, by the request interceptor for the Match messages)."""
        results = queries * k
        if results > self.max_results:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{queries} queries x k {k} = {results} results, over the limit of {self.max_results} "
                "results per call (--max-results); send fewer queries per call or a smaller k",
            )
        sizes = store.item_sizes()
        if sizes is None or not sizes[0]:
            return
        count, text_bytes = sizes
        if columnar:
            estimate = int(queries * min(k, count) * (text_bytes + COLUMNAR_MATCH_OVERHEAD_BYTES))
            estimate += queries * COLUMNAR_QUERY_OVERHEAD_BYTES
        else:
            estimate = int(queries * min(k, count) * (text_bytes + MATCH_OVERHEAD_BYTES))
        if estimate > self.max_message_bytes:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the reply to {queries} queries x k {k} would be about {estimate} bytes (the stored items "
                f"average {text_bytes:.0f} bytes of id and metadata), over the limit of "
                f"{self.max_message_bytes} bytes per message (--max-message-bytes); send fewer queries "
                "per call or a smaller k",
            )

    def _search(
        self,
        context: grpc.ServicerContext,
        store: Store,
        queries: int,
        k: int,
        columnar: bool,
        search: Callable[[Check], list[list[Match]] | SearchColumns],
    ) -> index_pb2.SearchResponse:
        """Runs a search checked against the budgets, stopped between chunks once its caller has gone,
        and hands a large one's heap back to the system afterwards. The reply is columnar when the
        request asked for it (from the store's columns where it gives them, else from its Matches), else
        the Match messages of `results`."""
        self._check_results(store, queries, k, columnar)
        self._skip_if_gone(context)

        def check() -> None:
            code = call_gone(context)
            if code is not None:
                raise RequestError(code, f"abandoned while searching: {code.name.lower().replace('_', ' ')}")

        try:
            found = search(check)
            if not columnar:
                assert isinstance(found, list)
                return _neighbors(found)
            columns = found if isinstance(found, SearchColumns) else _columns_of(found)
            del found
            return _columnar(columns, self.max_message_bytes)
        finally:
            if queries * k >= RELEASE_AFTER_RESULTS:
                release_free_memory()

    @grpc_errors(ERRORS)
    def Search(
        self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchResponse:
        queries = wire.unpack(request.queries)
        self._check_batch(queries.shape[0], "queries")
        _, store = self.collections.lookup(request.collection)
        conditions, max_distance = _filter(request.filter), _max_distance(request)
        # The store's arrays for a columnar reply, where it gives them (FAISS); else its Matches.
        search = getattr(store, "search_columns", None) if request.columnar else None
        return self._search(
            context,
            store,
            queries.shape[0],
            request.k,
            request.columnar,
            lambda check: (search or store.search)(
                queries,
                request.k,
                request.model_version,
                check=check,
                conditions=conditions,
                max_distance=max_distance,
            ),
        )

    @grpc_errors(ERRORS)
    def SearchById(
        self, request: index_pb2.SearchByIdRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchResponse:
        self._check_batch(len(request.ids), "ids")
        ids = list(request.ids)
        _, store = self.collections.lookup(request.collection)
        conditions, max_distance = _filter(request.filter), _max_distance(request)
        search = getattr(store, "search_by_id_columns", None) if request.columnar else None
        return self._search(
            context,
            store,
            len(ids),
            request.k,
            request.columnar,
            lambda check: (search or store.search_by_id)(
                ids, request.k, check=check, conditions=conditions, max_distance=max_distance
            ),
        )

    @grpc_errors(ERRORS)
    def Stats(
        self, request: index_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> index_pb2.StatsResponse:
        name, store = self.collections.lookup(request.collection)
        return _stats(name, store.stats())

    @grpc_errors(ERRORS)
    def Scan(
        self, request: index_pb2.ScanRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.ScanResponse]:
        page_size = request.page_size or min(DEFAULT_SCAN_PAGE, self.max_batch)
        if page_size > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size {page_size} is over the limit of {self.max_batch} items per page (--max-batch); "
                "send 0 for the default",
            )
        _, store = self.collections.lookup(request.collection)
        conditions = _filter(request.filter)
        copied = store.copy(with_vectors=request.with_vectors)  # the lock is released from here on
        if conditions:
            copied = _matching(copied, conditions)
        start = 0
        while start < len(copied.ids):
            page = _page(copied, start, page_size, request.with_vectors, self.max_page_bytes)
            start += len(page.items)
            yield page

    # ---- collections and aliases -----------------------------------------------------------------

    @grpc_errors(ERRORS)
    def CreateCollection(
        self, request: index_pb2.CreateCollectionRequest, context: grpc.ServicerContext
    ) -> index_pb2.CreateCollectionResponse:
        held = len(self.collections.collections())
        if held >= self.max_collections:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the index holds {held} collections, its limit (--max-collections {self.max_collections}); "
                "drop one first",
            )
        info = self.collections.create(request.name, request.model_name)
        return index_pb2.CreateCollectionResponse(collection=_collection(info))

    @grpc_errors(ERRORS)
    def ListCollections(
        self, request: index_pb2.ListCollectionsRequest, context: grpc.ServicerContext
    ) -> index_pb2.ListCollectionsResponse:
        return index_pb2.ListCollectionsResponse(
            collections=[_collection(info) for info in self.collections.collections()]
        )

    @grpc_errors(ERRORS)
    def DropCollection(
        self, request: index_pb2.DropCollectionRequest, context: grpc.ServicerContext
    ) -> index_pb2.DropCollectionResponse:
        return index_pb2.DropCollectionResponse(dropped=self.collections.drop(request.name))

    @grpc_errors(ERRORS)
    def SetAlias(
        self, request: index_pb2.SetAliasRequest, context: grpc.ServicerContext
    ) -> index_pb2.SetAliasResponse:
        aliases = self.collections.aliases()
        if request.alias not in aliases and len(aliases) >= self.max_collections:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the index holds {len(aliases)} aliases, its limit (--max-collections "
                f"{self.max_collections}); drop one first",
            )
        return index_pb2.SetAliasResponse(
            previous=self.collections.set_alias(request.alias, request.collection)
        )

    @grpc_errors(ERRORS)
    def DropAlias(
        self, request: index_pb2.DropAliasRequest, context: grpc.ServicerContext
    ) -> index_pb2.DropAliasResponse:
        return index_pb2.DropAliasResponse(collection=self.collections.drop_alias(request.alias))

    @grpc_errors(ERRORS)
    def ListAliases(
        self, request: index_pb2.ListAliasesRequest, context: grpc.ServicerContext
    ) -> index_pb2.ListAliasesResponse:
        return index_pb2.ListAliasesResponse(
            aliases=[index_pb2.Alias(alias=a, collection=c) for a, c in self.collections.aliases().items()]
        )

    # ---- near-duplicates ---------------------------------------------------------------------------

    @grpc_errors(ERRORS)
    def Duplicates(
        self, request: index_pb2.DuplicatesRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.DuplicatesResponse]:
        max_distance = check_max_distance(request.max_distance)
        assert max_distance is not None
        conditions = _filter(request.filter)
        _, store = self.collections.lookup(request.collection)
        self._skip_if_gone(context)

        def check() -> None:
            code = call_gone(context)
            if code is not None:
                raise RequestError(code, f"abandoned while comparing: {code.name.lower().replace('_', ' ')}")

        groups, pairs, items = store.duplicates(
            max_distance, conditions, check=check, max_pairs=self.max_duplicate_pairs
        )
        page = index_pb2.DuplicatesResponse(items=items, pairs=pairs)
        size = 0
        for ids, widest in groups:
            group = page.groups.add(ids=ids, max_distance=widest)
            size += group.ByteSize() + ITEM_OVERHEAD_BYTES
            if len(page.groups) >= GROUPS_PER_PAGE or size > self.max_page_bytes:
                yield page
                page, size = index_pb2.DuplicatesResponse(items=items, pairs=pairs), 0
        if page.groups or not groups:
            yield page
