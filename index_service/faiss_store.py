"""The FAISS backend: a `Store` keeping ids, metadata and vectors in memory, in an exact-L2 index.

Every change goes through `VectorStore._commit`, the one write path: it checks an operation
against the current state and applies it under the write lock. A write-ahead log hooks in
there (write the operation's record before applying it), and `upsert`/`delete` wait for the fsync
that covers it (`sync`) once the lock is released, before they return; recovery replays operations
through `_apply`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

from imgsearch.wire import MetadataBatch
from imgsearch_server.memory import release_free_memory, release_free_memory_soon
from imgsearch_server.pools import run_on_every_core
from index_service.columns import MAX_COLUMNS, Column
from index_service.duplicates import DEFAULT_MAX_PAIRS, Group, duplicate_groups
from index_service.filters import Filter
from index_service.idmap import PackedIds, RowMap
from index_service.parallel_knn import ParallelKnn, knn_l2sqr
from index_service.rwlock import ReadWriteLock
from index_service.store import (
    DEFAULT_COLLECTION,
    REINDEX_HINT,
    Check,
    Delete,
    FailedPrecondition,
    InvalidArgument,
    ItemOperation,
    Match,
    NotFound,
    Stats,
    StoreCopy,
    StoreState,
    Upsert,
    check_id_batch,
    check_model,
    check_queries,
    check_upsert,
    decode_metadata,
    encode_metadata,
)

BULK_LOOKUP_FROM = 512  # ids in an upsert from which RowMap.rows_array beats a lookup each (idmap.py)
BULK_ITEMS = 4096  # an upsert this large may have grown FAISS's storage: give the slack back
BATCH_THREADS_FROM = 8  # queries in one call from which FAISS gets every core instead of one
# A search runs in chunks of queries of about this many distances (a few tens of ms), checking between
# chunks whether anyone still wants the answer.
CHUNK_DISTANCES = 1 << 24
# FAISS 1.15 computes a call's L2 distances with BLAS (|x|^2 + |y|^2 - 2 x.y, one matrix product per block
# of queries and rows) when nq * d >= faiss.cvar.distance_compute_blas_threshold (default 128,000: 1,000
# queries at d = 128) and no IDSelector is given; below it, it scans the rows one query at a time, several
# times slower per query in a batch. Measured in process (k = 10, d = 128, 2 cores, BLAS vs the scan, per
# query, median of 7-9 interleaved runs): 10k rows, 2 threads: 16 queries 0.92x, 32: 1.15x, 64: 1.30x,
# 128: 1.36x, 256: 1.49x (1 thread: 1.36x, 1.63x, 1.87x, 1.92x, 2.04x); 100k rows: 8 queries 1.2x (2.1x on
# 1 thread), 16: 2.6x, 32: 3.4x, 64: 5.0x, 128: 5.9x, 256: 6.1x. So importing this module lowers it to
# BLAS_THRESHOLD (BLAS from 64 queries at d = 128, from 16 at d = 512), process-wide: FAISS reads the one
# global at each call, and a search of fewer than 8 queries stays on the scan either way.
BLAS_THRESHOLD = 8192
faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, BLAS_THRESHOLD)
# A search FAISS runs with BLAS goes in chunks of about BLAS_CHUNK_DISTANCES distances instead (~0.1 s), of
# at least BLAS_CHUNK_QUERIES queries: each chunk reads every row again and BLAS does worse on few queries.
# Each chunk's queries are split between the cores, each part searched by single-threaded FAISS in its own
# thread (`_blas_knn`): FAISS's own threads meet at a barrier twice per 1,024 rows, and on a busy machine
# each barrier waits for a descheduled thread. At 100k rows, 1,000 queries in chunks (median of 5, queries/s,
# quiet / two other processes spinning on the 2 cores): FAISS's 2 threads, the whole batch at once 4,523 /
# 517, chunks of 256 5,029 / 136, of 671 4,981 / 273; split in two, chunks of 256 5,020 / 2,632, of 512
# 5,375 / 2,789, of 1,000 5,781 / 2,885. At 1M (quiet, median of 3): FAISS's whole batch 454, split chunks
# of 256 563, of 512 602.
# Measured in process (VectorStore.search_columns, 1,000 queries, k = 10, d = 128, 2 threads, median of 4;
# FAISS's whole batch in one call 577 queries/s): at 1M rows in chunks of 134 queries 372 queries/s, of
# 268 487, of 536 496, in one 568 (the chunks of CHUNK_DISTANCES, 16 queries, on the scan: 59-86); at 100k
# rows (whole batch 4,543, median of 9) in chunks of 167 3,932, of 335 4,369, of 671 4,380, in one 4,462.
# So 256 queries a chunk at 1M rows (~0.5 s here), 671 at 100k (~0.15 s), one chunk of up to 6,710 at 10k.
# The rows' norms are computed once per search and given to every chunk (FAISS would compute them in each).
BLAS_CHUNK_DISTANCES = 1 << 26
BLAS_CHUNK_QUERIES = 256
_CORES = len(os.sched_getaffinity(0))
# A filtered search over at most this share of the rows copies those rows and searches the copy; over more,
# it searches the whole index through a bitmap of the rows (IDSelectorBitmap). Both are exact. Measured for
# one query at 100k x 128 on one core (median of 30; unfiltered 1.42 ms): at 1 % subset 0.05 ms, bitmap
# 0.21; 5 %: 0.15, 0.32; 10 %: 0.37, 0.41; 20 %: 1.14, 0.65; 50 %: 3.56, 1.95.
SUBSET_FRACTION = 0.1


_PARALLEL: ParallelKnn | None = None
_PARALLEL_LOCK = threading.Lock()


def parallel_knn() -> ParallelKnn:
    """The process's one ParallelKnn (its threads are shared by every store, so concurrent searches share
    the cores rather than each taking all of them), made at the first few-query search."""
    global _PARALLEL
    with _PARALLEL_LOCK:
        if _PARALLEL is None:
            _PARALLEL = ParallelKnn()
        return _PARALLEL


class VectorStore:
    """Exact-L2 k-NN over string ids with metadata; thread-safe (concurrent reads, exclusive writes).

    Memory per item is kept close to its vector: a plain `IndexFlatL2` whose row n belongs to
    `_ids[n]` (no FAISS id map; the ids packed in one buffer, index_service/idmap.py), an id -> row hash
    table in arrays, and metadata as compact JSON bytes (None when empty). A replaced item keeps its row;
    a deleted one's row is refilled from the last rows."""

    def __init__(
        self,
        state: StoreState | None = None,
        *,
        max_k: int = 1000,
        journal: Callable[[ItemOperation], int] | None = None,
        sync: Callable[[int], None] | None = None,
        model_name: str = "",
        name: str = DEFAULT_COLLECTION,
    ) -> None:
        self.max_k = max_k
        self.journal = journal  # writes an operation to the log before it is applied; returns its lsn
        self.sync = sync  # returns once the log is durable through an lsn: called before acknowledging
        self.lsn = 0
        self.name = name  # the collection's, for messages
        self.dropped = False  # set (under the write lock) when its collection is dropped: writes refused
        self._lock = ReadWriteLock()
        self._dim = 0
        self._model_version = ""
        self._model_name = model_name
        self._index: faiss.IndexFlatL2 | None = None
        self._ids = PackedIds()  # row -> id, packed in one buffer
        self._row_of = RowMap(self._ids)  # id -> row, a hash table in arrays
        self._metadata: list[bytes | None] = []  # row -> JSON of its metadata, None when empty
        self._text_bytes = 0
        self._columns: OrderedDict[str, Column] = OrderedDict()  # metadata keys filters named (columns.py)
        self._columns_lock = threading.Lock()  # columns are made under the read lock, by one reader at a time
        if state is not None:
            self._load(state)
            self.lsn = state.lsn

    # ---- writes -------------------------------------------------------------------------

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: MetadataBatch = (),
        model_version: str = "",
        model_name: str = "",
    ) -> int:
        """Inserts or replaces a batch, all or nothing; returns the count stored after it."""
        checked_ids, array, checked_metadata = check_upsert(ids, vectors, metadata)
        operation = Upsert(checked_ids, array, checked_metadata, model_version, model_name, self.name)
        with self._lock.write():
            lsn = self._commit(operation)
            count = len(self._ids)
        self._durable(lsn)
        if len(checked_ids) >= BULK_ITEMS:
            del operation, array  # the batch's own copies go first, then their pages too
            release_free_memory()
            release_free_memory_soon()  # and the request's buffers, freed once its handler has returned
        return count

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Removes ids; returns (deleted, missing)."""
        checked_ids = check_id_batch(list(dict.fromkeys(ids)))
        with self._lock.write():
            self._check_not_dropped()
            present = tuple(i for i in checked_ids if i in self._row_of)
            lsn = self._commit(Delete(present, self.name)) if present else None
        self._durable(lsn)
        return len(present), len(checked_ids) - len(present)

    def _durable(self, lsn: int | None) -> None:
        """Waits, with the write lock released (so other writers' records join the same fsync), until
        the log is durable through lsn: only then may the write be acknowledged."""
        if lsn is not None and self.sync is not None:
            self.sync(lsn)

    def drop(self, log: Callable[[], object]) -> int:
        """Marks the store dropped once `log` (the catalog's journal of the drop) returns, after the writes
        in flight; later writes get NotFound. Returns the items it held."""
        with self._lock.write():
            log()
            self.dropped = True
            return len(self._ids)

    def _check_not_dropped(self) -> None:
        if self.dropped:
            raise NotFound(f"collection {self.name!r} was dropped")

    def _commit(self, operation: ItemOperation) -> int | None:
        """The one write path: check the operation against the state, log it, then apply it; returns its
        lsn (None without a journal), for `_durable`.

        Runs under the write lock. The journal (the write-ahead log) raises StorageFull or
        StorageUnavailable when it cannot write the operation: then nothing is applied."""
        self._check_not_dropped()
        if isinstance(operation, Upsert) and operation.ids:
            check_model(self.name, self._model_name, operation.model_name)
            dim = operation.vectors.shape[1]
            if self._ids and dim != self._dim:
                raise InvalidArgument(
                    f"vectors have dim {dim}, the collection {self.name!r} holds dim {self._dim}"
                )
            if self._ids and operation.model_version != self._model_version:
                raise FailedPrecondition(
                    f"vectors are from model version {operation.model_version!r}, the collection "
                    f"{self.name!r} holds {self._model_version!r}; {REINDEX_HINT}"
                )
        lsn = None
        if self.journal is not None:
            lsn = self.lsn = self.journal(operation)
        self._apply(operation)
        return lsn

    def replay(self, operation: ItemOperation, lsn: int) -> None:
        """Applies an operation read back from the log at recovery (it was checked before it was logged)."""
        with self._lock.write():
            self._apply(operation)
            self.lsn = lsn

    def _apply(self, operation: ItemOperation) -> None:
        """Changes the state; the only code that does. Assumes the operation was checked."""
        if isinstance(operation, Delete):
            self._remove(operation.ids)
            return
        if not operation.ids:
            return
        if not self._model_name:
            self._model_name = operation.model_name  # the first vectors of a model name it
        if self._index is None or not self._ids:
            self._reset(operation.vectors.shape[1], operation.model_version)
        assert self._index is not None
        ids = operation.ids
        if not len(self._row_of):
            held = np.full(len(ids), -1, np.int64)
        elif len(ids) >= BULK_LOOKUP_FROM:
            held = self._row_of.rows_array(ids)
        else:
            held = np.array([self._row_of.get(i, -1) for i in ids], np.int64)
        rows = self._rows()
        for position in np.flatnonzero(held >= 0).tolist():  # replaced: each keeps its row
            row, entries = int(held[position]), operation.metadata[position]
            encoded = encode_metadata(entries)
            rows[row] = operation.vectors[position]
            self._text_bytes += len(encoded or b"") - len(self._metadata[row] or b"")
            self._metadata[row] = encoded
            for key, column in self._columns.items():
                column.set(row, entries.get(key))
        new_positions = np.flatnonzero(held < 0)
        if not new_positions.size:
            return
        every = new_positions.size == len(ids)
        picked = new_positions.tolist()
        new_ids = list(ids) if every else [ids[p] for p in picked]
        first, id_bytes = len(self._ids), self._ids.id_bytes
        if len(new_ids) >= BULK_LOOKUP_FROM:
            self._ids.extend(new_ids)
            self._row_of.extend(new_ids, first)
        else:  # a few: per item is cheaper than a bulk call's fixed ~40-100 us
            for row, item_id in enumerate(new_ids, first):
                self._ids.append(item_id)
                self._row_of[item_id] = row
        encoded_new = [encode_metadata(operation.metadata[p]) for p in picked]
        self._metadata.extend(encoded_new)
        self._text_bytes += self._ids.id_bytes - id_bytes + sum(len(e) for e in encoded_new if e is not None)
        for key, column in self._columns.items():
            column.append([operation.metadata[p].get(key) for p in picked])
        vectors = operation.vectors if every else operation.vectors[new_positions]
        self._index.add(np.ascontiguousarray(vectors))

    def _remove(self, ids: Sequence[str]) -> None:
        """Deletes rows by moving the last live rows into the gaps (idmap.fill_from_tail: the layout one
        move at a time would give), then cutting the tail off."""
        if not ids or self._index is None:
            return
        count = len(self._ids)
        gone = self._row_of.pop_many(ids)
        self._text_bytes -= sum(len(self._metadata[r] or b"") for r in gone.tolist())
        id_bytes = self._ids.id_bytes
        sources, targets = self._ids.remove_rows(gone)
        self._text_bytes -= id_bytes - self._ids.id_bytes
        self._row_of.remap(sources, targets)
        rows = self._rows()
        rows[targets] = rows[sources]
        metadata = self._metadata
        for source, target in zip(sources.tolist(), targets.tolist(), strict=True):
            metadata[target] = metadata[source]
            for column in self._columns.values():
                column.move(source, target)
        keep = count - gone.size
        del metadata[keep:]
        for column in self._columns.values():
            column.truncate(keep)
        self._index.remove_ids(faiss.IDSelectorRange(keep, count))

    def _rows(self) -> np.ndarray:
        """Returns a writable [count, dim] view of the vectors inside the FAISS index."""
        assert self._index is not None
        count = self._index.ntotal
        if count == 0:
            return np.zeros((0, self._dim), np.float32)
        pointer = self._index.get_xb()  # type: ignore[attr-defined]
        return faiss.rev_swig_ptr(pointer, count * self._dim).reshape(count, self._dim)

    def _reset(self, dim: int, model_version: str) -> None:
        self._dim = dim
        self._model_version = model_version
        self._index = faiss.IndexFlatL2(dim)

    def _load(self, state: StoreState) -> None:
        self._model_name = state.model_name or self._model_name
        if state.dim:
            self._reset(state.dim, state.model_version)
        if state.ids:
            self._apply(Upsert(tuple(state.ids), state.vectors, tuple(state.metadata), state.model_version))

    # ---- reads --------------------------------------------------------------------------

    def get(self, ids: Sequence[str]) -> tuple[list[tuple[str, dict[str, str]]], np.ndarray, list[str]]:
        """Returns (found items in request order, their vectors, missing ids)."""
        checked_ids = check_id_batch(ids, unique=False)
        with self._lock.read():
            found = [i for i in checked_ids if i in self._row_of]
            missing = [i for i in checked_ids if i not in self._row_of]
            rows = [self._row_of[i] for i in found]
            return (
                [(i, self._metadata_of(r)) for i, r in zip(found, rows, strict=True)],
                self._copy(rows),
                missing,
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
        farther than max_distance; `check` runs between chunks of queries and may raise to stop."""
        columns = self.search_columns(
            queries, k, model_version, check=check, conditions=conditions, max_distance=max_distance
        )
        return self._matches(columns)  # decoded after the lock: the columns hold all it needs

    def search_by_id(
        self,
        ids: Sequence[str],
        k: int,
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Returns the k nearest items to each stored id, the item itself excluded."""
        columns = self.search_by_id_columns(
            ids, k, check=check, conditions=conditions, max_distance=max_distance
        )
        return self._matches(columns)

    def duplicates(
        self,
        max_distance: float,
        conditions: Filter = (),
        *,
        check: Check | None = None,
        max_pairs: int = DEFAULT_MAX_PAIRS,
    ) -> tuple[list[Group], int, int]:
        """(the groups of items within max_distance of each other, the pairs linked, the items compared).
        The matching items' vectors are copied under the read lock and searched without it."""
        with self._lock.read():
            mask = self._mask(conditions)
            if self._index is None or not self._ids:
                return [], 0, 0
            if mask is None:
                ids, vectors = self._ids.tolist(), self._rows().copy()
            else:
                rows = np.flatnonzero(mask)
                ids, vectors = self._ids.take(rows), self._rows()[rows]
        groups, pairs = duplicate_groups(ids, vectors, max_distance, check=check, max_pairs=max_pairs)
        return groups, pairs, len(ids)

    def _column(self, key: str) -> Column:
        """The key's column, made now from the stored metadata if no filter named it lately (under the
        read lock: writers, which keep the columns up to date, are held off)."""
        with self._columns_lock:
            column = self._columns.get(key)
            if column is None:
                column = Column(
                    [decode_metadata(m).get(key) if m is not None else None for m in self._metadata]
                )
                self._columns[key] = column
                while len(self._columns) > MAX_COLUMNS:
                    self._columns.popitem(last=False)
            else:
                self._columns.move_to_end(key)
            return column

    def _mask(self, conditions: Filter) -> np.ndarray | None:
        """The rows that match every condition (None: no filter, every row)."""
        if not conditions:
            return None
        mask = np.ones(len(self._ids), bool)
        for condition in conditions:
            mask &= self._column(condition.key).mask(condition)
        return mask

    def stats(self) -> Stats:
        with self._lock.read():
            count = len(self._ids)
            return Stats(
                count,
                self._dim,
                self._model_version,
                count * self._dim * 4 + self._text_bytes,
                self._model_name,
            )

    def item_sizes(self) -> tuple[int, float] | None:
        """(items stored, their average bytes of id and metadata), for sizing a reply before the work."""
        with self._lock.read():
            count = len(self._ids)
            return count, (self._text_bytes / count if count else 0.0)

    def state(self, while_consistent: Callable[[], None] | None = None) -> StoreState:
        """Returns a consistent copy of everything stored (for a snapshot).

        `while_consistent` runs while writers are still held off, so what it does (rotating the
        log) happens exactly at the copy's lsn."""
        return self.copy(while_consistent=while_consistent).as_state()

    def copy(
        self, *, with_vectors: bool = True, while_consistent: Callable[[], None] | None = None
    ) -> StoreCopy:
        """Returns a point-in-time copy to read after the lock is released (a snapshot, a scan).

        Under the read lock only lists of references are copied (ids and the encoded metadata never
        change in place), and the vectors when asked for; decoding waits until after, so writers are
        held off for as short a time as possible."""
        with self._lock.read():
            copied = self.copy_held(with_vectors=with_vectors)
            if while_consistent is not None:
                while_consistent()
            return copied

    @contextmanager
    def writers_held(self) -> Iterator[None]:
        """Holds this store's writers off (its read lock): a snapshot of several stores at one lsn
        holds them all, then copies each with `copy_held`."""
        with self._lock.read():
            yield

    def copy_held(self, *, with_vectors: bool = True) -> StoreCopy:
        """`copy`, for a caller that holds the lock already (through `writers_held`, or copy itself)."""
        return StoreCopy(
            dim=self._dim,
            model_version=self._model_version,
            ids=self._ids.copy(),  # decoded by its reader, after the lock
            encoded_metadata=list(self._metadata),
            vectors=(
                self._rows().copy()
                if with_vectors and self._index is not None
                else np.zeros((0, self._dim), np.float32)
            ),
            lsn=self.lsn,
            model_name=self._model_name,
        )

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise InvalidArgument(f"k must be 1 to {self.max_k}, got {k}")

    def _copy(self, rows: Sequence[int]) -> np.ndarray:
        if not rows or self._index is None:
            return np.zeros((len(rows), self._dim), dtype=np.float32)
        return self._rows()[list(rows)]

    def _metadata_of(self, row: int) -> dict[str, str]:
        return decode_metadata(self._metadata[row])

    def search_columns(
        self,
        queries: np.ndarray,
        k: int,
        model_version: str = "",
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> SearchColumns:
        """`search`'s answer as arrays, made without a Match per match: what the columnar reply sends."""
        self._check_k(k)
        with self._lock.read():
            array = check_queries(queries, model_version, self._model_version, self._dim)
            return self._search_columns(array, k, None, check, self._mask(conditions), max_distance)

    def search_by_id_columns(
        self,
        ids: Sequence[str],
        k: int,
        *,
        check: Check | None = None,
        conditions: Filter = (),
        max_distance: float | None = None,
    ) -> SearchColumns:
        """`search_by_id`'s answer as arrays (each item excluded from its own matches)."""
        self._check_k(k)
        checked_ids = check_id_batch(ids, unique=False)
        with self._lock.read():
            missing = [i for i in checked_ids if i not in self._row_of]
            if missing:
                raise NotFound(f"id {missing[0]!r} is not in the index")
            rows = [self._row_of[i] for i in checked_ids]
            return self._search_columns(
                self._copy(rows), k, rows, check, self._mask(conditions), max_distance
            )

    def _search_columns(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[int] | None,
        check: Check | None = None,
        mask: np.ndarray | None = None,
        max_distance: float | None = None,
    ) -> SearchColumns:
        """Exact k-NN of each query among the rows `mask` selects (every row when None), as arrays; `exclude`
        gives one row per query to leave out of its matches. Runs under the read lock.

        A few queries go to ParallelKnn (its paths: every core, rows read in place). In a batch, a selection
        of few rows (at most SUBSET_FRACTION of them) is copied and searched as it is; a larger one is
        searched in the whole index through a bitmap selector. Either way each query gets exactly its k
        nearest selected rows, at every selectivity: nothing is cut from a fixed top-k afterwards."""
        count = len(self._ids)
        queried, dim = queries.shape
        if self._index is None or count == 0 or queried == 0:
            return SearchColumns.empty(queried)
        if queried < BATCH_THREADS_FROM:  # a few queries: every core through shared pieces, exactly
            selected = count if mask is None else int(np.count_nonzero(mask))
            if selected == 0:
                return SearchColumns.empty(queried)
            fetch = min(k + (1 if exclude is not None else 0), selected)
            squared, rows = parallel_knn().search(self._rows(), queries, fetch, mask)
            excluded = np.asarray(exclude, np.int64) if exclude is not None else None
            return self._columns_of(*_kept(squared, rows, k, excluded, max_distance))
        subset: np.ndarray | None = None  # the selected rows, when they are searched as a copy
        params = None
        selected = count
        if mask is not None:
            selected = int(mask.sum())
            if selected == 0:
                return SearchColumns.empty(queried)
            if selected <= SUBSET_FRACTION * count:
                subset = np.flatnonzero(mask)
            elif selected < count:
                bits = np.packbits(mask, bitorder="little")
                selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits))
                params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        fetch = min(k + (1 if exclude is not None else 0), selected)
        # A batch wants every core (OpenMP keeps its thread count per thread), and its threads too.
        run_on_every_core()
        faiss.omp_set_num_threads(_CORES)
        threshold = faiss.cvar.distance_compute_blas_threshold
        blas = params is None and queried * dim >= threshold  # FAISS never uses BLAS under a selector
        least = -(-threshold // dim)  # the fewest queries FAISS searches with BLAS
        if blas:  # chunks big enough for BLAS to pay, and for FAISS to keep to it
            chunk = max(BLAS_CHUNK_DISTANCES // selected, BLAS_CHUNK_QUERIES, least)
        else:
            chunk = max(BATCH_THREADS_FROM, CHUNK_DISTANCES // selected)
        searched = self._rows()[subset] if subset is not None else self._rows()
        norms = _squared_norms(searched) if blas else None  # once, not in every chunk and part
        excluded = np.asarray(exclude, np.int64) if exclude is not None else None
        counts: list[np.ndarray] = []
        found: list[np.ndarray] = []
        distances: list[np.ndarray] = []
        try:
            for start in range(0, queried, chunk):
                if start and check is not None:
                    check()
                stop = min(start + chunk, queried)
                if params is not None:
                    squared, rows = self._index.search(queries[start:stop], fetch, params=params)
                elif blas:
                    squared, rows = _blas_knn(queries[start:stop], searched, fetch, norms, least)
                else:
                    squared, rows = _knn(queries[start:stop], searched, fetch, norms)
                if subset is not None:
                    rows = np.where(rows >= 0, subset[np.maximum(rows, 0)], -1)
                kept = _kept(
                    squared, rows, k, excluded[start:stop] if excluded is not None else None, max_distance
                )
                counts.append(kept[0])
                found.append(kept[1])
                distances.append(kept[2])
        except BaseException:
            counts.clear()  # the traceback keeps this frame: let the partial answer go now
            found.clear()
            distances.clear()
            raise
        return self._columns_of(np.concatenate(counts), np.concatenate(found), np.concatenate(distances))

    def _columns_of(self, counts: np.ndarray, rows: np.ndarray, distances: np.ndarray) -> SearchColumns:
        """The matches' ids and stored metadata looked up by row (under the read lock)."""
        metadata = self._metadata
        return SearchColumns(counts, self._ids.take(rows), distances, [metadata[r] for r in rows.tolist()])

    def _matches(self, columns: SearchColumns) -> list[list[Match]]:
        """The columns as one list of Matches per query, each match's metadata decoded."""
        matches = [
            Match(item_id, distance, decode_metadata(metadata))
            for item_id, distance, metadata in zip(
                columns.ids, columns.distances.tolist(), columns.metadata, strict=True
            )
        ]
        bounds = [0, *np.cumsum(columns.counts).tolist()]
        return [matches[start:end] for start, end in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class SearchColumns:
    """A search's matches as arrays, query after query, each query's nearest first: what `search_columns`
    returns for the columnar SearchResponse, without a Match (nor a decoded metadata dict) per match."""

    counts: np.ndarray  # int64 [queries]: each query's number of matches
    ids: list[str]  # [matches]
    distances: np.ndarray  # float32 [matches]: Euclidean, not squared
    metadata: list[bytes | None]  # [matches]: as the store keeps it, compact JSON; None when it has none

    @classmethod
    def empty(cls, queries: int) -> SearchColumns:
        return cls(np.zeros(queries, np.int64), [], np.zeros(0, np.float32), [])


def _squared_norms(rows: np.ndarray) -> np.ndarray:
    """The rows' squared L2 norms as FAISS's BLAS search computes them for itself (once per call)."""
    norms = np.empty(rows.shape[0], np.float32)
    faiss.fvec_norms_L2sqr(  # type: ignore[attr-defined]
        faiss.swig_ptr(norms), faiss.swig_ptr(rows), rows.shape[1], rows.shape[0]
    )
    return norms


def _knn(
    queries: np.ndarray, rows: np.ndarray, k: int, norms: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's exact L2 search of C-contiguous float32 rows (parallel_knn.knn_l2sqr), queries made
    contiguous first."""
    return knn_l2sqr(np.ascontiguousarray(queries, np.float32), rows, k, norms)


_BATCH_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the pid it was made in, the pool)
_BATCH_POOL_LOCK = threading.Lock()


def _batch_pool() -> ThreadPoolExecutor:
    """The process's threads for the parts of BLAS searches (one fewer than the cores: the searching thread
    takes a part too), each at one OpenMP thread; made at the first, again in a forked child."""
    global _BATCH_POOL
    with _BATCH_POOL_LOCK:
        if _BATCH_POOL is None or _BATCH_POOL[0] != os.getpid():
            pool = ThreadPoolExecutor(
                max(1, _CORES - 1),
                thread_name_prefix="faiss-batch",
                initializer=faiss.omp_set_num_threads,
                initargs=(1,),
            )
            _BATCH_POOL = (os.getpid(), pool)
        return _BATCH_POOL[1]


def _blas_knn(
    queries: np.ndarray, rows: np.ndarray, k: int, norms: np.ndarray | None, part_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """`_knn` with BLAS, the queries split in up to one part a core of at least `part_queries` each (FAISS
    keeps to BLAS for each), each part searched by single-threaded FAISS in its own thread, this one
    included: the same answer, without FAISS's OpenMP barriers (see BLAS_CHUNK_DISTANCES)."""
    parts = max(1, min(_CORES, queries.shape[0] // part_queries))
    if parts == 1:
        return _knn(queries, rows, k, norms)
    cuts = [queries.shape[0] * part // parts for part in range(parts + 1)]
    pool = _batch_pool()
    futures: list[Future[tuple[np.ndarray, np.ndarray]]] = []
    threads = faiss.omp_get_max_threads()
    try:
        futures = [pool.submit(_knn, queries[a:b], rows, k, norms) for a, b in itertools.pairwise(cuts[1:])]
        faiss.omp_set_num_threads(1)
        answers = [_knn(queries[: cuts[1]], rows, k, norms), *(future.result() for future in futures)]
    finally:
        faiss.omp_set_num_threads(threads)
        wait(futures)  # no part may still read the rows once this returns (the caller's lock goes next)
    return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])


def _kept(
    squared: np.ndarray,
    rows: np.ndarray,
    k: int,
    exclude: np.ndarray | None,
    max_distance: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matches per query, their rows, their distances) of one chunk's FAISS answer: the rows FAISS found
    (not -1), less each query's excluded row, none farther than max_distance, at most k a query."""
    distances = np.sqrt(np.maximum(squared, 0.0))
    keep = rows >= 0
    if exclude is not None:
        keep &= rows != exclude[:, None]
    if max_distance is not None:
        keep &= distances <= np.float64(max_distance)  # compared in float64, as a Python float would be
    if keep.shape[1] > k:  # one more was fetched for the excluded row, which was not among them
        keep &= np.cumsum(keep, axis=1) <= k
    return keep.sum(axis=1), rows[keep], distances[keep]
