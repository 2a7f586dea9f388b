"""Exact k-NN of one or a few queries on every core: the rows split into one contiguous shard per core.

FAISS searches a single query on one core (its OpenMP over two threads is 2-3x slower here), so at 1M rows
one query takes 20-40 ms while the other cores idle. `ParallelKnn` searches each shard in its own thread with
single-threaded FAISS (its SWIG calls release the GIL) and merges the per-shard top-k exactly.

Exact means bitwise what one single-threaded FAISS search over the same rows gives (`IndexFlatL2.search`
after `faiss.omp_set_num_threads(1)`, for fewer than 1000 queries of d=128): the same rows, the same
float32 squared distances, ties to the lower row, padded with (FLT_MAX, -1) when fewer than k rows are
selected. Checked against FAISS 1.15.1 (tests/unit/test_parallel_knn.py):

- FAISS has two L2 kernels. The sequential one (`fvec_L2sqr` per row) runs for a single thread with
  nq * d < `faiss.cvar.distance_compute_blas_threshold` (128000 by default; faiss_store lowers it to
  8192), always under an IDSelector (except IDSelectorRange, which FAISS turns into a plain slice), and
  in `knn_L2sqr_by_idx`. The BLAS one (|x|^2 + |y|^2 - 2 x.y, clamped at 0) runs for nq * d at or over
  the threshold and, with OpenMP threads > nq and ny >= max(10000, threads * 1024), in FAISS's
  database-parallel search: there distances differ from the
  sequential kernel in the last bits (ids the same in what we tried). Every search here that splits runs
  the sequential kernel: its threads, and the calling thread while it searches a shard, run with
  OpenMP at 1 thread, and only nq * d below the BLAS threshold is split. A row's distance then does not
  depend on which shard or which path (slice, dense, bitmap, row list) reads it.
- FAISS breaks ties by the lower row (its heaps compare ids on equal distances, at every k, including
  the k = 1 and k >= 100 result handlers), so the merge sorts on (distance, row).

Paths, all of them exact (a filtered search returns the k nearest *selected* rows, nothing cut after):

- unfiltered: shard i is `rows[a:b]` (a view) through `faiss.knn_L2sqr`, offsets added after.
- dense (a mask selecting more than `dense_subset_fraction` of the rows, the rows at least
  `dense_from_bytes`, where they are read from memory, not cache): every row's distance computed with
  FAISS's batched row kernel (`fvec_L2sqr_ny`, bitwise `fvec_L2sqr`'s outside ROW_BY_ROW_DIMS), +inf
  added to the rows not selected, the k smallest kept in FAISS's own heaps (`float_maxheap_array_t.addn`,
  ties to the lower row as in a search). A bitmap search computes only the selected rows' distances but
  one row at a time behind a branch on its bit, which mispredicts at mixed masks: one thread at 1M, 50 %
  selected, took 34-48 ms against 20-23 unfiltered; computing every distance and masking takes about
  1.2x unfiltered at any selectivity. Shards are even: every row costs the same.
- bitmap (a mask selecting more than `subset_fraction` of fewer rows, or at ROW_BY_ROW_DIMS): the mask
  packed once into a bitmap; shard i gets an `IDSelectorBitmap` over its own rows only, pointing into the
  whole bitmap at byte a/8 (so shard starts are multiples of `BLOCK` rows). Its membership test costs one
  bit read per row, nothing measurable at 1M next to the distance (an all-ones bitmap: 0.91x `index.search`,
  as fast as `faiss.knn` unfiltered), where IDSelectorAnd(IDSelectorRange, bitmap over the whole index) per
  shard took 1.87x (two virtual calls a row, and every shard tests every row of the index); a 50 % random
  bitmap costs 1.2-1.9x unfiltered (the branch on each bit mispredicts). Shards are cut at equal counts of
  selected rows (popcounts per block), not of rows, so a mask whose selected rows bunch together still
  splits the work evenly.
- subset (a mask selecting at most `subset_fraction` of the rows, `dense_subset_fraction` where the dense
  path would run): `faiss.knn_L2sqr_by_idx` over the selected row numbers, reading the rows in place: no
  copy of the selected rows (faiss_store copies them and then searches the copy, 2x slower for one query).
  The row numbers are split evenly across shards.

Measured on this machine: 2 vCPUs (AMD EPYC), shared with other work, so the second core is often not
free. One query, k=10, d=128, standard-normal float32 rows (seed 0), random masks; median of 41 calls at 1M
(61 at 100k) of each, interleaved with the baseline: `faiss.omp_set_num_threads(1)` then faiss_store's path
(`index.search`; with a bitmap selector at 50 %; copying the selected rows, then `faiss.knn`, at 5 %). ms,
default thresholds, two workers, a quiet spell (load average ~1):

    rows  case          baseline  ParallelKnn  ratio   (earlier runs)
    1M    unfiltered      21.56      16.36     0.76    0.72, 0.75
    1M    bitmap 50 %     33.82      20.95     0.62    0.57, 0.58
    1M    subset 5 %      11.07       4.36     0.39    0.41, 0.43 (one thread in place: 0.57-0.60)
    100k  unfiltered       2.82       2.11     0.75    0.95, 0.97
    100k  bitmap 50 %      3.89       2.66     0.68    0.93, 1.30 (both just after an OpenMP search)
    100k  subset 5 %       1.19       0.57     0.48    5k selected rows: not split; in place, one thread

Those 50 % rows ran through bitmaps. The dense path, 2026-12-02, one query with 50 % selected, 5 ms
asleep before each call, median of 31 at 1M (61 at 100k), ms: FAISS with a bitmap on one thread 48.5
(4.89), ParallelKnn 17.8 (2.55): 0.37x (0.52x); unfiltered one-thread FAISS 20.8 (2.19).

FAISS's own OpenMP at 2 threads on one query: 1.9-3.5x the one-thread time at 1M, 2-5.6x at 100k. With
both cores busy with other work (load average 4-6) splitting gains nothing: 1M unfiltered 0.95-1.11, bitmap
0.78-0.87, subset 0.48-0.65; 100k unfiltered 1.14-1.16. The unfiltered scan tops out near 0.72x here even
with the second core free, likely memory bandwidth: 512 MB a query at 1M, ~24 GB/s for one thread, ~32 for
two (at 100k each of two concurrent half-shards took 75 % of the whole one's time).

When not to split: handing a shard to a thread costs 40-200 us here (more when the cores are busy), so a
search splits only when every thread gets at least `min_rows` rows (`min_subset_rows` selected rows for
the subset); fewer run in one call in the calling thread; so does a batch of `split_below_queries`
queries or more (faiss_store gives those every core through FAISS's own OpenMP and BLAS:
BATCH_THREADS_FROM = 8), and any batch with nq * d at or over FAISS's BLAS threshold. A search started
while others are in flight in the same instance takes only its share of the workers (workers // searches
in flight), so concurrent searches do not queue behind each other's shards.

Work shared, helpers pinned: a search that splits cuts its rows into `pieces_per_thread` pieces per
thread, and the calling thread and its helpers take the next piece as each finishes one. Each helper is
one thread pinned to one core, and a search hands pieces to helpers on cores other than its own. Between
calls (the service's case: a query every few ms) a fixed two-shard split lost its gain here: the helper,
woken on the caller's own core, pre-empted the caller, and the other (idle, halted) vCPU took 1-3 ms to
run either. One query at 100k, ms (x one-thread FAISS), median of 120 calls, the three in one process
on 2026-12-02 (fixed shards: this module before the change):

    rest between calls    fixed shards    pinned, shared    bitmap 50 %: fixed    shared
    none                  1.51 (0.63)     1.71 (0.72)       3.24                  3.26
    5 ms                  2.69 (0.89)     2.14 (0.71)       5.88                  3.45
    20 ms                 3.04 (1.14)     2.32 (0.87)       6.04                  3.69

At 1M the two are the same within the noise (0.64-0.72x unfiltered, 27-30 ms at 50 %). A helper still
busy with another search's pieces, or slow to wake, only leaves more pieces to the caller: no search
waits for a helper that has not started.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import TypeVar

import faiss
import numpy as np

from imgsearch_server.cpus import current_cpu

PAD_DISTANCE = float(np.finfo(np.float32).max)  # what FAISS writes where fewer than k rows are selected
PAD_ROW = -1
Result = tuple[np.ndarray, np.ndarray]  # (squared distances float32 [nq, k], row numbers int64 [nq, k])
Task = tuple[Callable[..., Result], tuple[object, ...]]
T = TypeVar("T")
BLOCK = 512  # shard starts are multiples of this many rows: whole bytes (64 of them) of the bitmap
PIECES_PER_THREAD = 4  # a split search's pieces per thread taking part, each at least min_rows / 4 rows
SPLIT_BELOW_QUERIES = 8  # faiss_store.BATCH_THREADS_FROM: from this many queries FAISS's OpenMP takes over
# A shard gets at least this many rows (unfiltered, bitmap) or selected row numbers (subset); fewer run
# in one call in the calling thread. One query, d=128, 2 shards vs 1 call, median of 31, under nice -10 (to
# get the second core from the other work on this machine): unfiltered 16k rows 1.38x, 32k 0.94x, 64k
# 0.90x, 128k 0.80x, 256k 0.82x; bitmap at 50 %: 16k 1.01x, 32k 1.06x, 64k 0.81x, 128k 0.78x (100k: 0.76,
# 200k: 0.66); selected rows scattered over a 1M index: 16k 0.92x, 32k 0.86x, 64k 0.78x.
MIN_ROWS = 32768
MIN_SUBSET_ROWS = 8192
# A mask selecting at most this share of the rows is searched as a list of row numbers, in place
# (knn_L2sqr_by_idx); more, through a bitmap (indexes under DENSE_FROM_BYTES) or densely (every distance,
# the rest masked). One query, one thread, median of 41 (15 at 1M), ms, 2026-12-02 (`python -m
# bench.knn_paths --n N --repeat R`), row list vs dense (bitmap):
#   1M (unfiltered 21.6): 10 % 10.8 vs 22.6 (18.9); 20 % 17.3 vs 21.2 (23.8); 30 % 24.0 vs 20.7 (30.1);
#         40 % 29.8 vs 20.1 (35.2); 50 % 37.0 vs 22.0 (41.4); 90 % 45.5 vs 23.3 (23.2)
#   100k (unfiltered 1.56): 10 % 0.92 vs 2.50 (1.68); 20 % 2.10 vs 2.79 (3.36); 30 % 2.90 vs 2.75 (4.00);
#         40 % 3.60 vs 2.55 (4.53); 50 % 3.98 vs 2.28 (4.68); 90 % 3.68 vs 1.91 (1.78)
#   50k (0.69, median of 21): 30 % 0.33 vs 0.80 (0.58); 40 % 0.53 vs 0.82 (0.80); 50 % 0.87 vs 0.87
#         (1.08); 90 % 1.35 vs 0.87 (0.85)
#   30k (0.25): 40 % 0.25 vs 0.45 (0.37); 50 % 0.29 vs 0.44 (0.41); 90 % 0.43 vs 0.42 (0.42)
# Rows that fit in the cache (50k x 128 floats, 25 MB, and fewer) are read at its speed by every path,
# and the dense path's fixed costs (three passes over each chunk) lose there; beyond, every path waits on
# memory, and the dense path's one sequential read of every row wins from about a quarter selected.
SUBSET_FRACTION = 0.4
DENSE_SUBSET_FRACTION = 0.25
DENSE_FROM_BYTES = 48 << 20  # 98,304 rows of 128 floats
# FAISS's fvec_L2sqr_ny has kernels of its own for these dimensions, whose float32 sums differ from
# fvec_L2sqr's in the last bits: a filtered search there goes through the bitmap, row by row.
ROW_BY_ROW_DIMS = frozenset({2, 4, 8, 12})
DENSE_CHUNK = 16384  # rows a dense piece computes at a time: 64 KiB of distances
INFINITY_BITS = np.uint32(0x7F800000)  # float32 +inf, as an integer
BATCH_SUBSET_FRACTION = 0.1  # faiss_store.SUBSET_FRACTION: a batch copies at most this share of the rows


class _Helper:
    """One thread, pinned to one core (when `cpu` is not None and the system lets it), that takes pieces
    of searches handed to it; its thread starts at its first piece."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="parallel-knn", initializer=self._start)

    def _start(self) -> None:
        faiss.omp_set_num_threads(1)  # OpenMP's thread count is per thread: a helper runs 1
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})  # 0: this thread only
            except OSError:  # a core taken away since, or a sandbox that refuses: run unpinned
                self.cpu = None


class ParallelKnn:
    """Exact L2 k-NN of a few queries over a FAISS IndexFlatL2's rows, split across the cores.

    One instance serves concurrent searches (its helpers are shared; a search waits only for the pieces
    its helpers took). The calling thread takes pieces too, so a search of `workers` threads uses
    `workers - 1` helpers; there is one helper per worker, pinned to the cores in turn (`pin`)."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        min_rows: int = MIN_ROWS,
        min_subset_rows: int = MIN_SUBSET_ROWS,
        subset_fraction: float = SUBSET_FRACTION,
        dense_subset_fraction: float = DENSE_SUBSET_FRACTION,
        dense_from_bytes: int = DENSE_FROM_BYTES,
        split_below_queries: int = SPLIT_BELOW_QUERIES,
        pieces_per_thread: int = PIECES_PER_THREAD,
        pin: bool = True,
    ) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.workers = max(1, workers if workers is not None else len(cores))
        self.min_rows = max(1, min_rows)
        self.min_subset_rows = max(1, min_subset_rows)
        self.subset_fraction = subset_fraction
        self.dense_subset_fraction = dense_subset_fraction
        self.dense_from_bytes = dense_from_bytes
        self.split_below_queries = split_below_queries
        self.pieces_per_thread = max(1, pieces_per_thread)
        self._closed = False
        self._in_flight = 0  # searches in this instance now: they share the cores
        self._in_flight_lock = threading.Lock()
        pinned = pin and len(cores) > 1
        self._helpers: list[_Helper] = (
            [_Helper(cores[i % len(cores)] if pinned else None) for i in range(self.workers)]
            if self.workers > 1
            else []
        )

    def close(self) -> None:
        """Stops the threads (after the searches in flight); later searches raise RuntimeError."""
        self._closed = True
        for helper in self._helpers:
            helper.pool.shutdown(wait=True)

    def __enter__(self) -> ParallelKnn:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def search(self, rows: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> Result:
        """(squared distances float32 [nq, k], row numbers int64 [nq, k]) of each query's k nearest rows
        among those `mask` selects (every row when None), nearest first, ties to the lower row, padded
        with (PAD_DISTANCE, -1). `rows` is the index's [n, d] float32 C-contiguous storage (a view of it
        is fine: nothing is copied), and must not change until this returns."""
        if self._closed:
            raise RuntimeError("ParallelKnn is closed")
        if rows.ndim != 2 or rows.dtype != np.float32 or not rows.flags.c_contiguous:
            raise ValueError("rows must be a C-contiguous float32 [n, d] array")
        count, dim = rows.shape
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries must be [nq, {dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != (count,)):
            raise ValueError(f"mask must be a bool array of shape ({count},)")
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._search(rows, queries, k, mask)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _search(self, rows: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None) -> Result:
        count, dim = rows.shape
        nq = queries.shape[0]
        selected = count if mask is None else int(np.count_nonzero(mask))
        if nq == 0 or selected == 0:
            return _padding(nq, k)
        if nq >= self.split_below_queries or nq * dim >= faiss.cvar.distance_compute_blas_threshold:
            return _batch(rows, queries, k, mask, selected)
        if mask is None or selected == count:
            threads = self._shards(count, self.min_rows)
            bounds = _even_bounds(count, self._pieces(threads, count, self.min_rows))
            tasks: list[Task] = [(_knn_shard, (queries, rows, a, b, k)) for a, b in _pairs(bounds)]
            return self._run(tasks, threads, k)
        dense = rows.nbytes >= self.dense_from_bytes and dim not in ROW_BY_ROW_DIMS
        if selected <= (self.dense_subset_fraction if dense else self.subset_fraction) * count:
            subset = np.flatnonzero(mask).astype(np.int64, copy=False)
            threads = self._shards(selected, self.min_subset_rows)
            pieces = self._pieces(threads, selected, self.min_subset_rows)
            cuts = [selected * s // pieces for s in range(pieces + 1)]
            tasks = [(_subset_shard, (queries, rows, subset[a:b], k)) for a, b in _pairs(cuts)]
            return self._run(tasks, threads, k)
        threads = self._shards(count, self.min_rows)
        pieces = self._pieces(threads, count, self.min_rows)
        if dense:
            unselected = ~mask  # once for every piece
            bounds = _even_bounds(count, pieces)  # every row costs one distance
            tasks = [(_dense_shard, (queries, rows, unselected, a, b, k)) for a, b in _pairs(bounds)]
            return self._run(tasks, threads, k)
        bits = _bitmap(mask)
        bounds = _balanced_bounds(bits, count, pieces)
        tasks = [(_bitmap_shard, (queries, rows, bits, a, b, k)) for a, b in _pairs(bounds)]
        return self._run(tasks, threads, k)

    def _shards(self, work: int, min_rows: int) -> int:
        """How many threads a search takes: as many as the cores this search may take (the others'
        searches keep theirs busy), each with at least min_rows of the work."""
        return max(1, min(self.workers // max(1, self._in_flight), work // min_rows))

    def _pieces(self, threads: int, work: int, min_rows: int) -> int:
        """How many pieces the threads share: pieces_per_thread each, of at least min_rows / that many."""
        if threads == 1:
            return 1
        smallest = max(1, min_rows // self.pieces_per_thread)
        return max(threads, min(threads * self.pieces_per_thread, work // smallest))

    def _run(self, tasks: list[Task], threads: int, k: int) -> Result:
        """Runs the pieces' searches, shared by this thread (at one OpenMP thread) and `threads - 1`
        helpers on other cores, and merges them."""
        if len(tasks) == 1:  # one thread, one piece: no hand-off, no futures to wait for
            return _on_one_thread(*tasks[0])
        pieces = iter(tasks)  # shared: next() on a list iterator is atomic under the GIL
        futures: list[Future[list[Result]]] = [
            helper.pool.submit(_take_all, pieces) for helper in self._helpers_for(threads - 1)
        ]
        parts: list[Result] = []
        try:
            parts = _on_one_thread(_take_all, (pieces,))
        finally:
            # A helper that has not started never will (cancel); one that took pieces is waited for:
            # never leave a piece reading rows the caller may change once this returns.
            taken = [future for future in futures if not future.cancel()]
            wait(taken)
            for future in taken:
                parts.extend(future.result())
        return _merge(parts, k)

    def _helpers_for(self, count: int) -> list[_Helper]:
        """`count` helpers, those pinned to other cores than this thread's first."""
        here = current_cpu()
        return sorted(self._helpers, key=lambda helper: helper.cpu == here)[:count]


def _take_all(pieces: Iterator[Task]) -> list[Result]:
    """Searches pieces until none is left: the next one, whoever asks first."""
    return [function(*args) for function, args in pieces]


def _on_one_thread(function: Callable[..., T], args: tuple[object, ...]) -> T:
    """Runs one shard's search in this thread with OpenMP at 1 thread, its setting restored after."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return function(*args)
    finally:
        faiss.omp_set_num_threads(threads)


def _batch(rows: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None, selected: int) -> Result:
    """A batch, in one call in the calling thread under its OpenMP setting, as faiss_store searches one
    (FAISS's threads and BLAS do better there): a few selected rows copied, many through a bitmap."""
    count = rows.shape[0]
    if mask is None or selected == count:
        return knn_l2sqr(queries, rows, k)
    if selected <= BATCH_SUBSET_FRACTION * count:
        subset = np.flatnonzero(mask)
        squared, found = knn_l2sqr(queries, rows[subset], k)
        return squared, np.where(found >= 0, subset[np.maximum(found, 0)], PAD_ROW)
    return _bitmap_shard(queries, rows, _bitmap(mask), 0, count, k)


def _bitmap(mask: np.ndarray) -> np.ndarray:
    """The mask as FAISS's bitmap (bit i of byte i // 8 for row i), zero-padded to whole blocks."""
    blocks = -(-mask.shape[0] // BLOCK)
    bits = np.zeros(blocks * BLOCK // 8, np.uint8)
    bits[: (mask.shape[0] + 7) // 8] = np.packbits(mask, bitorder="little")
    return bits


def _padding(nq: int, k: int) -> Result:
    return np.full((nq, k), PAD_DISTANCE, np.float32), np.full((nq, k), PAD_ROW, np.int64)


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _even_bounds(count: int, shards: int) -> list[int]:
    """Shard starts at multiples of BLOCK rows, the rows shared as evenly as that allows."""
    blocks = -(-count // BLOCK)
    return [min(count, blocks * s // shards * BLOCK) for s in range(shards)] + [count]


def _balanced_bounds(bits: np.ndarray, count: int, shards: int) -> list[int]:
    """Shard starts at multiples of BLOCK rows with about as many selected rows in each shard: a row
    the bitmap skips costs a bit test, a selected one a distance."""
    per_block = np.bitwise_count(bits.view(np.uint64)).reshape(-1, BLOCK // 64).sum(axis=1, dtype=np.int64)
    total = np.cumsum(per_block)
    targets = total[-1] * np.arange(1, shards) // shards
    cuts = (np.searchsorted(total, targets, side="left") + 1) * BLOCK
    return [0, *np.minimum(cuts, count).tolist(), count]


def knn_l2sqr(queries: np.ndarray, base: np.ndarray, k: int, norms: np.ndarray | None = None) -> Result:
    """One FAISS flat search of `base` (what IndexFlatL2.search runs on its storage): (squared distances,
    rows, -1 past the rows). `norms`, the rows' squared norms when given, spares a BLAS search computing
    them again."""
    squared = np.empty((queries.shape[0], k), np.float32)
    found = np.empty((queries.shape[0], k), np.int64)
    faiss.knn_L2sqr(
        faiss.swig_ptr(queries),
        faiss.swig_ptr(base),
        base.shape[1],
        queries.shape[0],
        base.shape[0],
        k,
        faiss.swig_ptr(squared),
        faiss.swig_ptr(found),
        None if norms is None else faiss.swig_ptr(norms),
    )
    return squared, found


def _knn_shard(queries: np.ndarray, rows: np.ndarray, a: int, b: int, k: int) -> Result:
    squared, found = knn_l2sqr(queries, rows[a:b], k)
    if a:
        np.add(found, a, out=found, where=found >= 0)
    return squared, found


def _bitmap_shard(queries: np.ndarray, rows: np.ndarray, bits: np.ndarray, a: int, b: int, k: int) -> Result:
    """Rows a:b (a a multiple of 8) through a bitmap selector over those rows only."""
    own_bits = bits[a // 8 :]  # kept referenced until FAISS returns: the selector holds a raw pointer
    selector = faiss.IDSelectorBitmap(b - a, faiss.swig_ptr(own_bits))
    squared = np.empty((queries.shape[0], k), np.float32)
    found = np.empty((queries.shape[0], k), np.int64)
    faiss.knn_L2sqr(
        faiss.swig_ptr(queries),
        faiss.swig_ptr(rows[a:b]),
        rows.shape[1],
        queries.shape[0],
        b - a,
        k,
        faiss.swig_ptr(squared),
        faiss.swig_ptr(found),
        None,
        selector,
    )
    del selector, own_bits
    if a:
        np.add(found, a, out=found, where=found >= 0)
    return squared, found


def _dense_shard(
    queries: np.ndarray, rows: np.ndarray, unselected: np.ndarray, a: int, b: int, k: int
) -> Result:
    """Rows a:b, every distance computed (FAISS's batched row kernel), +inf added to those `unselected`
    (a bool array over every row) and the k smallest kept in FAISS's heaps. In chunks of DENSE_CHUNK
    rows, so the distances stay in cache between the three passes. Adding 0.0 leaves a distance as it
    is; +inf never enters a heap (its empty slots hold FLT_MAX); rows come in ascending order, so an
    equal distance never displaces a lower row: what FAISS's bitmap search keeps, bitwise (outside
    ROW_BY_ROW_DIMS). The +inf comes from the mask's bytes times the bits of +inf, two SIMD passes
    (np.copyto(..., where=) took 4 ns a row, 20 % of the distances' time)."""
    nq, dim = queries.shape
    squared = np.empty((nq, k), np.float32)
    found = np.empty((nq, k), np.int64)
    heaps = faiss.float_maxheap_array_t()
    heaps.k, heaps.nh = k, nq
    heaps.val, heaps.ids = faiss.swig_ptr(squared), faiss.swig_ptr(found)
    heaps.heapify()
    flags = unselected.view(np.uint8)  # 1 where not selected
    size = min(DENSE_CHUNK, b - a)
    distances = np.empty(size, np.float32)
    penalty = np.empty(size, np.uint32)
    for start in range(a, b, DENSE_CHUNK):
        stop = min(b, start + DENSE_CHUNK)
        chunk, extra = distances[: stop - start], penalty[: stop - start].view(np.float32)
        np.multiply(flags[start:stop], INFINITY_BITS, out=penalty[: stop - start])
        block = faiss.swig_ptr(rows[start:stop])
        for query in range(nq):
            faiss.fvec_L2sqr_ny(  # type: ignore[attr-defined]
                faiss.swig_ptr(chunk), faiss.swig_ptr(queries[query]), block, dim, stop - start
            )
            np.add(chunk, extra, out=chunk)
            heaps.addn(stop - start, faiss.swig_ptr(chunk), start, query, 1)  # type: ignore[call-arg]
    heaps.reorder()
    return squared, found


def _subset_shard(queries: np.ndarray, rows: np.ndarray, subset: np.ndarray, k: int) -> Result:
    """The listed rows (ascending row numbers, int64), read in place."""
    squared = np.empty((queries.shape[0], k), np.float32)
    found = np.empty((queries.shape[0], k), np.int64)
    faiss.knn_L2sqr_by_idx(  # type: ignore[attr-defined]
        faiss.swig_ptr(queries),
        faiss.swig_ptr(rows),
        faiss.swig_ptr(subset),
        rows.shape[1],
        queries.shape[0],
        rows.shape[0],
        subset.shape[0],
        k,
        faiss.swig_ptr(squared),
        faiss.swig_ptr(found),
        0,  # every query searches the same row numbers
    )
    return squared, found


def _merge(parts: list[Result], k: int) -> Result:
    """Each query's k smallest (distance, row) over the shards' sorted top-k blocks; padding (FLT_MAX,
    -1, read as the largest row) sorts last: FAISS keeps no row at FLT_MAX or more."""
    squared = np.concatenate([p[0] for p in parts], axis=1)
    found = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((found.view(np.uint64), squared), axis=1)[:, :k]
    return np.take_along_axis(squared, order, axis=1), np.take_along_axis(found, order, axis=1)
