"""The FAISS backend: a `Store` keeping ids, metadata and vectors in memory, in an exact-L2 index.

Every change goes through `VectorStore._commit`, the one write path: it checks an operation
against the current state and applies it under the write lock. A write-ahead log hooks in
there (write the operation's record before applying it), and `upsert`/`delete` wait for the fsync
that covers it (`sync`) once the lock is released, before they return; recovery replays operations
through `_apply`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import faiss
import numpy as np

from imgsearch.wire import MetadataBatch
from imgsearch_server.memory import release_free_memory
from index_service.columns import MAX_COLUMNS, Column
from index_service.duplicates import DEFAULT_MAX_PAIRS, Group, duplicate_groups
from index_service.filters import Filter
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

BULK_ITEMS = 4096  # an upsert this large may have grown FAISS's storage: give the slack back
BATCH_THREADS_FROM = 8  # queries in one call from which FAISS gets every core instead of one
# A search runs in chunks of queries of about this many distances (a few tens of ms), checking between
# chunks whether anyone still wants the answer.
CHUNK_DISTANCES = 1 << 24
_CORES = len(os.sched_getaffinity(0))
# A filtered search over at most this share of the rows copies those rows and searches the copy; over more,
# it searches the whole index through a bitmap of the rows (IDSelectorBitmap). Both are exact. Measured for
# one query at 100k x 128 on one core (median of 30; unfiltered 1.42 ms): at 1 % subset 0.05 ms, bitmap
# 0.21; 5 %: 0.15, 0.32; 10 %: 0.37, 0.41; 20 %: 1.14, 0.65; 50 %: 3.56, 1.95.
SUBSET_FRACTION = 0.1


class VectorStore:
    """Exact-L2 k-NN over string ids with metadata; thread-safe (concurrent reads, exclusive writes).

    Memory per item is kept close to its vector: a plain `IndexFlatL2` whose row n belongs to
    `_ids[n]` (no FAISS id map), an id -> row dict, and metadata as compact JSON bytes (None when
    empty). A replaced item keeps its row; a deleted one's row is refilled from the last row."""

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
        self._ids: list[str] = []  # row -> id
        self._row_of: dict[str, int] = {}  # id -> row
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
        rows = self._rows()
        new_positions = []
        for position, (item_id, entries) in enumerate(zip(operation.ids, operation.metadata, strict=True)):
            encoded = encode_metadata(entries)
            row = self._row_of.get(item_id)
            if row is None:
                new_positions.append(position)
                self._row_of[item_id] = len(self._ids)
                self._ids.append(item_id)
                self._metadata.append(encoded)
                self._text_bytes += len(item_id.encode()) + len(encoded or b"")
            else:
                rows[row] = operation.vectors[position]
                self._text_bytes += len(encoded or b"") - len(self._metadata[row] or b"")
                self._metadata[row] = encoded
                for key, column in self._columns.items():
                    column.set(row, entries.get(key))
        for key, column in self._columns.items():
            column.append([operation.metadata[p].get(key) for p in new_positions])
        if new_positions:
            self._index.add(np.ascontiguousarray(operation.vectors[new_positions]))

    def _remove(self, ids: Sequence[str]) -> None:
        """Deletes rows by moving the last live row into each gap, then cutting the tail off."""
        if not ids or self._index is None:
            return
        count = len(self._ids)
        rows = self._rows()
        last = count - 1
        for row in sorted((self._row_of.pop(i) for i in ids), reverse=True):
            self._text_bytes -= len(self._ids[row].encode()) + len(self._metadata[row] or b"")
            if row != last:
                moved = self._ids[last]
                rows[row] = rows[last]
                self._ids[row], self._metadata[row] = moved, self._metadata[last]
                self._row_of[moved] = row
                for column in self._columns.values():
                    column.move(last, row)
            self._ids.pop()
            self._metadata.pop()
            last -= 1
        for column in self._columns.values():
            column.truncate(last + 1)
        self._index.remove_ids(faiss.IDSelectorRange(last + 1, count))

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
        self._check_k(k)
        with self._lock.read():
            array = check_queries(queries, model_version, self._model_version, self._dim)
            return self._search(array, k, None, check, self._mask(conditions), max_distance)

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
        self._check_k(k)
        checked_ids = check_id_batch(ids, unique=False)
        with self._lock.read():
            missing = [i for i in checked_ids if i not in self._row_of]
            if missing:
                raise NotFound(f"id {missing[0]!r} is not in the index")
            rows = [self._row_of[i] for i in checked_ids]
            return self._search(self._copy(rows), k, rows, check, self._mask(conditions), max_distance)

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
                ids, vectors = list(self._ids), self._rows().copy()
            else:
                rows = np.flatnonzero(mask)
                ids, vectors = [self._ids[r] for r in rows.tolist()], self._rows()[rows]
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
            ids=list(self._ids),
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

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[int] | None,
        check: Check | None = None,
        mask: np.ndarray | None = None,
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Exact k-NN of each query among the rows `mask` selects (every row when None).

        A selection of few rows (at most SUBSET_FRACTION of them) is copied and searched as it is; a larger
        one is searched in the whole index through a bitmap selector. Either way each query gets exactly its
        k nearest selected rows, at every selectivity: nothing is cut from a fixed top-k afterwards."""
        count = len(self._ids)
        if self._index is None or count == 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        subset: np.ndarray | None = None  # the selected rows, when they are searched as a copy
        params = None
        selected = count
        if mask is not None:
            selected = int(mask.sum())
            if selected == 0:
                return [[] for _ in range(queries.shape[0])]
            if selected <= SUBSET_FRACTION * count:
                subset = np.flatnonzero(mask)
            elif selected < count:
                bits = np.packbits(mask, bitorder="little")
                selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits))
                params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        fetch = min(k + (1 if exclude is not None else 0), selected)
        # One query is fastest on one thread; a batch wants every core. OpenMP keeps this per thread.
        faiss.omp_set_num_threads(1 if queries.shape[0] < BATCH_THREADS_FROM else _CORES)
        chunk = max(BATCH_THREADS_FROM, CHUNK_DISTANCES // selected)
        base = self._rows()[subset] if subset is not None else None
        results: list[list[Match]] = []
        try:
            for start in range(0, queries.shape[0], chunk):
                if start and check is not None:
                    check()
                stop = min(start + chunk, queries.shape[0])
                if base is not None and subset is not None:
                    squared, found = faiss.knn(queries[start:stop], base, fetch)
                    rows = np.where(found >= 0, subset[np.maximum(found, 0)], -1)
                elif params is not None:
                    squared, rows = self._index.search(queries[start:stop], fetch, params=params)
                else:
                    squared, rows = self._index.search(queries[start:stop], fetch)
                excluded = exclude[start:stop] if exclude is not None else None
                distances = np.sqrt(np.maximum(squared, 0.0))
                results += self._matches(distances, rows, k, excluded, max_distance)
        except BaseException:
            results.clear()  # the traceback keeps this frame: let the partial answer go now
            raise
        return results

    def _matches(
        self,
        distances: np.ndarray,
        rows: np.ndarray,
        k: int,
        exclude: list[int] | None,
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        results = []
        for query, (row_distances, row_rows) in enumerate(
            zip(distances.tolist(), rows.tolist(), strict=True)
        ):
            matches = []
            for distance, row in zip(row_distances, row_rows, strict=True):
                if row < 0 or (exclude is not None and row == exclude[query]):
                    continue
                if max_distance is not None and distance > max_distance:
                    break  # nearest first: the rest are farther still
                matches.append(Match(self._ids[row], distance, self._metadata_of(row)))
            results.append(matches[:k])
        return results
