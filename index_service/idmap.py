"""Compact id bookkeeping for VectorStore: row -> id (`PackedIds`) and id -> row (`RowMap`).

A `list[str]` of ids plus a `dict[str, int]` back to their rows costs about 130-150 B of Python objects
per item (a str object, a list slot, a dict entry, an int object per row above 256). Here the ids are
stored once, as UTF-8 in one byte buffer with an int64 start and a uint16 length per row, and the
id -> row map is an open-addressing hash table of two flat int32/uint32 arrays that compares keys
against that buffer.

Storage is `bytearray` and `array.array` of a fixed capacity: scalar access returns plain Python ints
(about 20 ns, against about 40 ns for a numpy scalar) and the vectorised paths see the same memory
through `np.frombuffer` views. None of them is ever resized in place (growth and compaction allocate a
new one and copy), so a view can never block a resize.

Measured by `python -m index_service.idmap` at 1M ids of 11 ASCII bytes (`img-0000001`, fresh str
objects), on a shared 2-core machine under load (ranges over runs; the list/dict figures in brackets
were measured alongside):

    memory, tracemalloc          37.8 B/item: PackedIds 21.0 (11 + 8 + 2) + RowMap 16.8 (2**21 slots of
                                 8 B at 0.48 load); [list + dict: 127.2]. Resident (RSS after
                                 malloc_trim): 40.5 against 136. Peak while loading 1M: 77.8 B/item.
    load 1M (PackedIds(ids) + RowMap.extend)           0.13-0.33 s   [list + dict(zip): 0.27-0.59 s]
    insert 1M one by one (map[id] = n; ids.append)     1.1-1.7 s     [0.32-0.43 s]
    RowMap.get 1M one by one                           0.66-0.89 s   [0.41-0.57 s]
    RowMap.rows_array 1M (bulk)                        0.25-0.32 s
    PackedIds[row] 1M one by one                       0.23-0.44 s   [list: ~0.02 s]
    PackedIds.take / blob_of / tolist, 1M rows         0.23-0.40 / 0.10-0.15 / 0.15-0.21 s
    PackedIds.copy at 1M                               2-10 ms
    delete 100k one by one, as VectorStore._remove     0.44-0.67 s   [0.19-0.29 s]
    delete 100k: pop_many + remove_rows + remap        0.14 s

Per item, on that machine: get ~0.5-0.9 us (dict ~0.25), insert ~1.1 us, pop ~1 us. Bulk calls have a
fixed cost of tens of us (rows_array: ~40 us for 1 key) and beat a loop from about 500 keys
(`rows_array`) or 100 rows (`take`).
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar, overload

import numpy as np

from index_service.store import MAX_ID_BYTES

_T = TypeVar("_T")

GROWTH = 1.5  # capacity factor when a buffer fills
MAX_LOAD = 0.7  # the hash table doubles when more than this share of its slots is taken
_MIN_BYTES = 256
_MIN_ROWS = 16
_MIN_SLOTS = 8
TAKE_ONE_BY_ONE = 32  # take() of at most this many rows reads each on its own
_GATHER_ROWS = 1 << 16  # rows per chunk of a vectorised gather (bounds its index arrays to a few MB)
_TAG_MASK = 0xFFFFFFFF
_MAX_ROW = 0x7FFFFFFF  # rows are int32
_ITER_ROWS = 4096

assert array("q").itemsize == 8 and array("H").itemsize == 2
assert array("i").itemsize == 4 and array("I").itemsize == 4


def _zeros(typecode: str, count: int) -> array[int]:
    return array(typecode, [0]) * count


def _encode_all(ids: Sequence[str], errors: str = "strict") -> tuple[bytes, np.ndarray]:
    """(the ids' UTF-8 concatenated, each one's byte count as int64)."""
    joined = "".join(ids)
    if joined.isascii():  # the usual case: one encode, and a str's length is its byte count
        return joined.encode("ascii"), np.fromiter(map(len, ids), np.int64, len(ids))
    encoded = [item_id.encode("utf-8", errors) for item_id in ids]
    return b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded))


def _check_sizes(sizes: np.ndarray) -> None:
    if sizes.size and (int(sizes.min()) < 1 or int(sizes.max()) > MAX_ID_BYTES):
        bad = int(np.flatnonzero((sizes < 1) | (sizes > MAX_ID_BYTES))[0])
        raise ValueError(f"id {bad} is {int(sizes[bad])} bytes of UTF-8; ids must be 1 to {MAX_ID_BYTES}")


def _gather(source: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the byte ranges source[starts[i]:starts[i] + sizes[i]] concatenated, their int64 end offsets).

    Vectorised in chunks of rows: per chunk an index array of its bytes (int32 while the source allows),
    made with one repeat and one arange, then one fancy-indexing copy."""
    ends = np.cumsum(sizes, dtype=np.int64)
    total = int(ends[-1]) if ends.size else 0
    out = np.empty(total, np.uint8)
    if not total:
        return out, ends
    index_type = np.int32 if source.size < (1 << 31) and total < (1 << 31) else np.int64
    shift = starts - (ends - sizes)  # where each range's bytes come from, less where they go
    for first in range(0, sizes.size, _GATHER_ROWS):
        stop = min(first + _GATHER_ROWS, sizes.size)
        begin, end = int(ends[first] - sizes[first]), int(ends[stop - 1])
        index = np.repeat(shift[first:stop].astype(index_type), sizes[first:stop])
        index += np.arange(begin, end, dtype=index_type)
        out[begin:end] = source[index]
    return out, ends


def _split(blob: bytes, ends: np.ndarray) -> list[str]:
    """The strings whose UTF-8 is `blob`, cut at the byte offsets `ends`."""
    if not ends.size:
        return []
    if blob.isascii():
        text = blob.decode("ascii")
        bounds = ends.tolist()
    else:
        text = blob.decode()
        # a character starts at every byte that is not a continuation byte (0b10xxxxxx)
        starts_char = (np.frombuffer(blob, np.uint8) & 0xC0) != 0x80
        bounds = np.cumsum(starts_char, dtype=np.int64)[ends - 1].tolist()
    return [text[begin:end] for begin, end in zip([0, *bounds[:-1]], bounds, strict=True)]


def fill_from_tail(count: int, rows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The moves that delete distinct `rows` out of `count` rows, keeping them dense, exactly as
    VectorStore._remove makes them one by one (visiting the deleted rows from the highest, moving the
    last row into each): (sources, targets), int64, the survivor at row sources[i] ending at row
    targets[i] (targets ascending, all below count - len(rows), sources all at or above it: apply them
    in any order). Rows [0, count - len(rows)) are the survivors afterwards.

    Found without a Python step per row: the deleted rows in the tail (at or above the new end) are
    visited first, the k-th highest of them taking what is at row count - 1 - k, which may itself have
    been moved there; those chains are followed by pointer doubling. The gaps below the new end then take
    the rest of the tail in order."""
    gone = np.asarray(rows, np.int64)
    keep = count - gone.size
    if gone.size and (int(gone.min()) < 0 or int(gone.max()) >= count):
        raise IndexError("a row to delete is out of range")
    seen = np.zeros(count, bool)
    seen[gone] = True
    if int(np.count_nonzero(seen)) != gone.size:
        raise ValueError("the rows to delete must be distinct")
    tail = -np.sort(-gone[gone >= keep])  # the deleted rows of the tail, highest first
    # came_from[x - keep]: the row whose content sits at tail row x once the tail's gaps are filled
    came_from = np.arange(keep, count, dtype=np.int64)
    came_from[tail - keep] = count - 1 - np.arange(tail.size)
    while True:
        further = came_from[came_from - keep]
        if np.array_equal(further, came_from):
            break
        came_from = further
    return came_from[: count - tail.size - keep], np.sort(gone[gone < keep])


class PackedIds(Sequence[str]):
    """A list of ids (row -> id) kept as UTF-8 in one byte buffer: about 21 B per 11-byte id.

    `ids[row]`, `append`, `pop` and `ids[row] = id` work as on a list (ids must be 1 to MAX_ID_BYTES
    bytes of UTF-8). A row given the id of the last row (what a delete does when it moves the last row
    into a gap: `ids[row] = ids[-1]; ids.pop()`, or `ids.move(last, row)`) points at that id's bytes:
    no copy. Bytes no longer referenced (popped or overwritten ids) are garbage, compacted away once
    they outweigh the live ones. Bulk reads (`take`, `blob_of`, `tolist`, iteration) are vectorised."""

    __slots__ = ("_buf", "_len", "_live", "_n", "_start", "_used", "_view")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._buf = bytearray(_MIN_BYTES)  # the ids' UTF-8, [0, _used) written
        self._view = memoryview(self._buf)  # writes through a memoryview are about twice as fast
        self._start: array[int] = _zeros("q", _MIN_ROWS)  # row -> offset of its id in _buf
        self._len: array[int] = _zeros("H", _MIN_ROWS)  # row -> byte count of its id
        self._n = 0  # rows
        self._used = 0  # bytes of _buf written (live and garbage)
        self._live = 0  # sum of the rows' byte counts (bytes two rows share count twice)
        self.extend(ids)

    # ---- list-like ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):  # a scan's page: only those rows decoded
            return self.take(np.arange(*row.indices(self._n)))
        if row < 0:
            row += self._n
        if not 0 <= row < self._n:
            raise IndexError("PackedIds index out of range")
        start = self._start[row]
        return self._buf[start : start + self._len[row]].decode()

    def __iter__(self) -> Iterator[str]:
        for first in range(0, self._n, _ITER_ROWS):
            yield from self.take(np.arange(first, min(first + _ITER_ROWS, self._n)))

    def tolist(self) -> list[str]:
        return self.take(np.arange(self._n))

    def append(self, item_id: str) -> None:
        data = item_id.encode()
        size = len(data)
        if not 1 <= size <= MAX_ID_BYTES:
            raise ValueError(f"id is {size} bytes of UTF-8; ids must be 1 to {MAX_ID_BYTES}")
        row = self._n
        if row == len(self._start):
            self._resize_rows(max(row + 1, int(row * GROWTH)))
        start = self._used  # _write, inlined: this is the per-item path
        end = start + size
        if end > len(self._buf):
            self._resize_bytes(max(end, int(len(self._buf) * GROWTH)))
        self._view[start:end] = data
        self._used = end
        self._start[row] = start
        self._len[row] = size
        self._live += size
        self._n = row + 1

    def extend(self, ids: Iterable[str]) -> None:
        """Appends many ids at once: one encode, one copy (about 0.1 s for 1M)."""
        items = ids if isinstance(ids, list | tuple) else list(ids)
        if not items:
            return
        data, sizes = _encode_all(items)
        _check_sizes(sizes)
        count, first = len(items), self._n
        if first + count > len(self._start):
            self._resize_rows(max(first + count, int(len(self._start) * GROWTH)))
        begin = self._write(data)
        self._live += len(data)
        del data
        np.frombuffer(self._len, np.uint16)[first : first + count] = sizes
        starts = np.frombuffer(self._start, np.int64)[first : first + count]
        np.cumsum(sizes, out=starts)
        starts -= sizes
        starts += begin
        self._n = first + count

    def pop(self) -> str:
        """Removes and returns the last id."""
        row = self._n - 1
        if row < 0:
            raise IndexError("pop from empty PackedIds")
        start, size = self._start[row], self._len[row]
        item_id = self._buf[start : start + size].decode()
        self._n = row
        self._live -= size
        self._after_release()
        return item_id

    def __setitem__(self, row: int, item_id: str) -> None:
        """Gives a row an id; the last row's id is shared rather than copied (a delete's move)."""
        if row < 0:
            row += self._n
        if not 0 <= row < self._n:
            raise IndexError("PackedIds assignment index out of range")
        data = item_id.encode()
        size = len(data)
        last = self._n - 1
        start = self._start[last]
        if size != self._len[last] or self._buf[start : start + size] != data:
            if not 1 <= size <= MAX_ID_BYTES:
                raise ValueError(f"id is {size} bytes of UTF-8; ids must be 1 to {MAX_ID_BYTES}")
            start = self._write(data)
        self._live += size - self._len[row]
        self._start[row] = start
        self._len[row] = size
        self._after_release()

    def move(self, source: int, target: int) -> None:
        """Gives row `target` the id of row `source` (sharing its bytes), as `ids[target] = ids[source]`
        without decoding or comparing anything."""
        if not (0 <= source < self._n and 0 <= target < self._n):
            raise IndexError("PackedIds move index out of range")
        size = self._len[source]
        self._live += size - self._len[target]
        self._start[target] = self._start[source]
        self._len[target] = size
        self._after_release()

    def copy(self) -> PackedIds:
        """An independent copy, made with a few memcpys (~5 ms at 1M ids): under a lock, copy this and
        decode (`tolist`) after releasing it."""
        copied = PackedIds()
        copied._set_buffer(bytearray(self._view[: max(self._used, 1)]))
        copied._start, copied._len = _zeros("q", max(self._n, 1)), _zeros("H", max(self._n, 1))
        np.frombuffer(copied._start, np.int64)[: self._n] = self._starts()
        np.frombuffer(copied._len, np.uint16)[: self._n] = self._sizes()
        copied._n, copied._used, copied._live = self._n, self._used, self._live
        return copied

    # ---- bulk changes -------------------------------------------------------------------

    def move_many(self, sources: np.ndarray | Sequence[int], targets: np.ndarray | Sequence[int]) -> None:
        """`move` for many rows at once: row targets[i] gets the id of row sources[i] (all read first),
        sharing its bytes; targets must be distinct."""
        old = np.asarray(sources, np.int64)
        new = np.asarray(targets, np.int64)
        if old.shape != new.shape or old.ndim != 1:
            raise ValueError("sources and targets must be two 1-d arrays of one length")
        if not old.size:
            return
        if min(int(old.min()), int(new.min())) < 0 or max(int(old.max()), int(new.max())) >= self._n:
            raise IndexError("PackedIds move index out of range")
        starts, sizes = self._starts(), self._sizes()
        starts[new], sizes[new] = starts[old], sizes[old]
        self._live = int(sizes.sum(dtype=np.int64))
        self._after_release()

    def truncate(self, count: int) -> None:
        """Cuts the rows from `count` on (as `del ids[count:]`)."""
        if not 0 <= count <= self._n:
            raise IndexError("PackedIds truncate count out of range")
        self._n = count
        self._live = int(self._sizes().sum(dtype=np.int64))
        self._after_release()

    def remove_rows(self, rows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Deletes distinct rows the way VectorStore._remove does, all at once: each gap below the new
        end is filled from the tail (`fill_from_tail`), then the tail is cut. Returns (sources, targets),
        the moves made, for the caller's other row-indexed structures (then `RowMap.remap` them)."""
        sources, targets = fill_from_tail(self._n, rows)
        self.move_many(sources, targets)
        self.truncate(self._n - len(rows))
        return sources, targets

    # ---- bulk reads ---------------------------------------------------------------------

    def take(self, rows: np.ndarray | Sequence[int]) -> list[str]:
        """The ids of many rows (negative rows count from the end), vectorised: ~0.25 s for 1M. A few
        rows (a search's matches) are read one by one: 4 us for 10 against 17 vectorised."""
        if isinstance(rows, np.ndarray):
            if rows.ndim == 1 and rows.size <= TAKE_ONE_BY_ONE:
                return [self[row] for row in rows.tolist()]
        elif len(rows) <= TAKE_ONE_BY_ONE:
            return [self[int(row)] for row in rows]
        blob, ends = self._blob(rows)
        return _split(blob, ends)

    def blob_of(self, rows: np.ndarray | Sequence[int]) -> tuple[bytes, np.ndarray]:
        """(the ids of rows as UTF-8, concatenated; their uint32 end offsets in it): a columnar
        encoding of the ids, made without a Python-level step per id."""
        blob, ends = self._blob(rows)
        if ends.size and int(ends[-1]) > _TAG_MASK:
            raise OverflowError("the ids are over 4 GiB: too long for uint32 offsets")
        return blob, ends.astype(np.uint32)

    def byte_size(self, row: int) -> int:
        """The UTF-8 byte count of a row's id (`len(ids[row].encode())` without decoding it)."""
        if row < 0:
            row += self._n
        if not 0 <= row < self._n:
            raise IndexError("PackedIds index out of range")
        return self._len[row]

    @property
    def id_bytes(self) -> int:
        """The UTF-8 byte counts of all the ids, summed (kept up to date: O(1))."""
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes of memory the storage holds (its capacity, not only what is in use)."""
        return len(self._buf) + len(self._start) * 8 + len(self._len) * 2

    # ---- internals ----------------------------------------------------------------------

    def _blob(self, rows: np.ndarray | Sequence[int]) -> tuple[bytes, np.ndarray]:
        selected = np.asarray(rows, dtype=np.int64)
        if selected.ndim != 1:
            raise ValueError("rows must be one-dimensional")
        starts = self._starts()[selected]  # IndexError when a row is out of range
        sizes = self._sizes()[selected].astype(np.int64)
        out, ends = _gather(np.frombuffer(self._buf, np.uint8), starts, sizes)
        return out.tobytes(), ends

    def _starts(self) -> np.ndarray:
        return np.frombuffer(self._start, np.int64, self._n)

    def _sizes(self) -> np.ndarray:
        return np.frombuffer(self._len, np.uint16, self._n)

    def _write(self, data: bytes) -> int:
        """Writes bytes after the last written ones, making room first; returns where they went."""
        size = len(data)
        if self._used + size > len(self._buf):  # (not compacting: _after_release keeps garbage small)
            self._resize_bytes(max(self._used + size, int(len(self._buf) * GROWTH)))
        start = self._used
        self._view[start : start + size] = data
        self._used = start + size
        return start

    def _after_release(self) -> None:
        """After bytes became garbage or rows went: compact or shrink once the waste dominates (each
        costs O(what is left), and waits for at least as much waste, so it is amortised O(1))."""
        if self._used - self._live > max(self._live, _MIN_BYTES):
            self._compact(int(self._live * GROWTH))
        if len(self._start) > _MIN_ROWS and self._n < len(self._start) // 4:
            self._resize_rows(self._n * 2)

    def _compact(self, capacity: int) -> None:
        """Rewrites the live ids contiguously, in row order, into a new buffer of `capacity` bytes."""
        sizes = self._sizes().astype(np.int64)
        out, ends = _gather(np.frombuffer(self._buf, np.uint8), self._starts(), sizes)
        buffer = bytearray(max(capacity, out.size, _MIN_BYTES))
        np.frombuffer(buffer, np.uint8)[: out.size] = out
        self._starts()[:] = ends - sizes
        self._set_buffer(buffer)
        self._used = self._live = out.size

    def _resize_bytes(self, capacity: int) -> None:
        buffer = bytearray(capacity)
        buffer[: self._used] = self._view[: self._used]
        self._set_buffer(buffer)

    def _set_buffer(self, buffer: bytearray) -> None:
        self._view = memoryview(buffer)
        self._buf = buffer

    def _resize_rows(self, capacity: int) -> None:
        capacity = max(capacity, _MIN_ROWS)
        starts, sizes = _zeros("q", capacity), _zeros("H", capacity)
        np.frombuffer(starts, np.int64)[: self._n] = self._starts()
        np.frombuffer(sizes, np.uint16)[: self._n] = self._sizes()
        self._start, self._len = starts, sizes


class RowMap:
    """A dict of id -> row over the ids of a `PackedIds` (the keys are not stored again): an
    open-addressing table of int32 rows and uint32 hash tags (8 B a slot, a power of two of them, at
    most MAX_LOAD full), linear probing, backward-shift deletion (no tombstones).

    A key is found by its hash tag, then confirmed against the bytes of `ids[row]`, so every row the
    map holds must be a row of `ids` holding its key whenever the map is used: add an id to `ids` just
    before or just after `map[id] = row` or `map.extend` (nothing reading the map in between), give a
    moved row its id in `ids` before or after `map[moved] = row` but before popping the old row, and
    `map.pop(id)` before `ids.pop()`. `hash_fn` must return ints in int64's range (the default, the
    builtin `hash`, differs between processes, which is fine: the table is rebuilt at every start)."""

    __slots__ = ("_count", "_hash", "_ids", "_limit", "_mask", "_rows", "_tags")

    def __init__(self, ids: PackedIds, *, capacity: int = _MIN_SLOTS, hash_fn: Callable[[str], int] = hash):
        self._ids = ids
        self._hash = hash_fn
        self._count = 0
        self._rows: array[int] = array("i")  # slot -> row, -1 when free
        self._tags: array[int] = array("I")  # slot -> the low 32 bits of its key's hash
        self._mask = self._limit = 0
        self._build(capacity, np.zeros(0, np.uint32), np.zeros(0, np.int32))

    # ---- dict-like ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @overload
    def get(self, key: str) -> int | None: ...
    @overload
    def get(self, key: str, default: _T) -> int | _T: ...
    def get(self, key: str, default: object = None) -> object:
        tag = self._hash(key) & _TAG_MASK
        rows, tags, mask = self._rows, self._tags, self._mask
        slot = tag & mask
        row = rows[slot]
        while row >= 0:
            if tags[slot] == tag:
                ids = self._ids
                start = ids._start[row]
                if ids._buf[start : start + ids._len[row]] == key.encode("utf-8", "surrogatepass"):
                    return row
            slot = (slot + 1) & mask
            row = rows[slot]
        return default

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        tag = self._hash(key) & _TAG_MASK
        rows, tags, mask = self._rows, self._tags, self._mask
        slot = tag & mask
        row = rows[slot]
        while row >= 0:
            if tags[slot] == tag:
                ids = self._ids
                start = ids._start[row]
                if ids._buf[start : start + ids._len[row]] == key.encode("utf-8", "surrogatepass"):
                    return True
            slot = (slot + 1) & mask
            row = rows[slot]
        return False

    def __getitem__(self, key: str) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __setitem__(self, key: str, row: int) -> None:
        """Inserts key -> row, or changes the row of a key held already (a moved row)."""
        if not 0 <= row <= _MAX_ROW:
            raise ValueError(f"row {row} is not in 0 to 2**31 - 1")
        tag = self._hash(key) & _TAG_MASK
        rows, tags, mask = self._rows, self._tags, self._mask  # _slot, inlined: the per-item path
        slot = tag & mask
        held = rows[slot]
        while held >= 0:
            if tags[slot] == tag:
                ids = self._ids
                start = ids._start[held]
                if ids._buf[start : start + ids._len[held]] == key.encode("utf-8", "surrogatepass"):
                    rows[slot] = row
                    return
            slot = (slot + 1) & mask
            held = rows[slot]
        rows[slot] = row
        tags[slot] = tag
        self._count += 1
        if self._count > self._limit:
            self._build(len(self._rows) * 2, *self._entries())

    def pop(self, key: str) -> int:
        """Removes a key; returns its row (KeyError when it is not held)."""
        slot = self._slot(key, self._hash(key) & _TAG_MASK)
        if slot < 0:
            raise KeyError(key)
        rows, tags, mask = self._rows, self._tags, self._mask
        row = rows[slot]
        # Backward shift: pull later entries of the probe run into the gap when the gap lies on their
        # path from their home slot, so no lookup ever stops early at it.
        gap, probe = slot, slot
        while True:
            probe = (probe + 1) & mask
            moved = rows[probe]
            if moved < 0:
                break
            tag = tags[probe]
            if (probe - (tag & mask)) & mask >= (probe - gap) & mask:
                rows[gap] = moved
                tags[gap] = tag
                gap = probe
        rows[gap] = -1
        self._count -= 1
        if self._count < self._limit // 8 and len(rows) > _MIN_SLOTS:  # mostly empty: shrink (amortised)
            self._build(len(rows) // 4, *self._entries())
        return row

    # ---- bulk ---------------------------------------------------------------------------

    def extend(self, keys: Sequence[str], first_row: int) -> None:
        """Inserts keys[i] -> first_row + i for every i, vectorised. The keys must be distinct and not
        held yet: otherwise ValueError, and the map is left as it was. A batch of at least a quarter of
        what is held (or one that makes the table grow) rebuilds the table with a sort (~0.1 s for 1M
        into an empty map, half of it hashing); a smaller one probes for its slots in rounds."""
        count = len(keys)
        if not count:
            return
        if first_row < 0 or first_row + count - 1 > _MAX_ROW:
            raise ValueError("rows must be 0 to 2**31 - 1")
        tags = self._tags_of(keys)
        rows = np.arange(first_row, first_row + count, dtype=np.int32)
        needed = self._count + count
        if needed > self._limit or 4 * count >= self._count:
            size = len(self._rows)
            while needed > int(size * MAX_LOAD):
                size *= 2
            held_tags, held_rows = self._entries()
            self._build(
                size,
                np.concatenate((held_tags, tags)),
                np.concatenate((held_rows, rows)),
                keys,
                held_rows.size,
            )
        else:
            self._place(tags, rows, keys, first_row)
        self._count = needed

    def rows_array(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of many keys as int64, -1 where a key is not held; vectorised."""
        return self._find_many(keys)[1]

    def pop_many(self, keys: Sequence[str]) -> np.ndarray:
        """Removes many distinct keys; returns their rows (int64), in the keys' order. KeyError when one
        is not held, ValueError when one is given twice: then nothing is removed. A batch of at least
        1/32 of what is held clears its slots and rebuilds the table (~0.1 s at 1M, where popping costs
        ~3 us a key); a smaller one pops key by key."""
        if not len(keys):
            return np.zeros(0, np.int64)
        slots, rows = self._find_many(keys)
        if int(rows.min()) < 0:
            raise KeyError(keys[int(np.flatnonzero(rows < 0)[0])])
        seen = np.zeros(len(self._rows), bool)
        seen[slots] = True
        if int(np.count_nonzero(seen)) != slots.size:
            raise ValueError("a key is given twice")
        if 32 * rows.size < self._count:
            for key in keys:
                self.pop(key)
            return rows
        self._arrays()[0][slots] = -1
        self._count -= rows.size
        size = len(self._rows)
        while size > _MIN_SLOTS and self._count < int(size * MAX_LOAD) // 8:
            size //= 4
        self._build(size, *self._entries())
        return rows

    def remap(self, sources: np.ndarray | Sequence[int], targets: np.ndarray | Sequence[int]) -> None:
        """Gives every key held at row sources[i] (distinct) the row targets[i], all at once and by row
        (no key is hashed or compared), as after `ids.move_many(sources, targets)`: one pass over the
        table, so for a few moves `map[moved] = row` is cheaper."""
        old = np.asarray(sources, np.int64)
        new = np.asarray(targets, np.int64)
        if old.shape != new.shape or old.ndim != 1:
            raise ValueError("sources and targets must be two 1-d arrays of one length")
        if not old.size:
            return
        if int(old.min()) < 0 or int(new.min()) < 0 or int(new.max()) > _MAX_ROW:
            raise ValueError("rows must be 0 to 2**31 - 1")
        table_rows = self._arrays()[0]
        held = np.flatnonzero(table_rows >= 0)
        current = table_rows[held]
        lookup = np.arange(max(int(current.max(initial=0)), int(old.max())) + 1, dtype=np.int32)
        lookup[old] = new
        table_rows[held] = lookup[current]

    def rows_of(self, keys: Sequence[str]) -> list[int | None]:
        """The rows of many keys, None where a key is not held."""
        return [row if row >= 0 else None for row in self.rows_array(keys).tolist()]

    @property
    def nbytes(self) -> int:
        """Bytes of memory the table holds."""
        return len(self._rows) * 8

    # ---- internals ----------------------------------------------------------------------

    def _slot(self, key: str, tag: int) -> int:
        """The slot holding key, or ~(the free slot where its probe ended) when it is not held."""
        rows, tags, mask = self._rows, self._tags, self._mask
        slot = tag & mask
        row = rows[slot]
        while row >= 0:
            if tags[slot] == tag:
                ids = self._ids
                start = ids._start[row]
                if ids._buf[start : start + ids._len[row]] == key.encode("utf-8", "surrogatepass"):
                    return slot
            slot = (slot + 1) & mask
            row = rows[slot]
        return ~slot

    def _find_many(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the slot of each key, its row), both int64 and -1 where a key is not held: probing all keys
        at once, a round per step along their chains, comparing bytes where tags agree."""
        count = len(keys)
        found_slots, found_rows = np.full(count, -1, np.int64), np.full(count, -1, np.int64)
        if not count or not self._count:
            return found_slots, found_rows
        table_rows, table_tags = self._arrays()
        tags = self._tags_of(keys)
        data, sizes = _encode_all(keys, "surrogatepass")  # such a key matches no id, and raises nothing
        asked = np.frombuffer(data, np.uint8), np.cumsum(sizes) - sizes, sizes
        slots = tags.astype(np.int64) & self._mask
        pending = np.arange(count)
        while pending.size:
            at = slots[pending]
            held = table_rows[at].astype(np.int64)
            going_on = held >= 0
            candidates = np.flatnonzero(going_on & (table_tags[at] == tags[pending]))
            if candidates.size:
                hits = candidates[self._equal(asked, pending[candidates], held[candidates])]
                found_slots[pending[hits]] = at[hits]
                found_rows[pending[hits]] = held[hits]
                going_on[hits] = False
            pending = pending[going_on]
            slots[pending] = (slots[pending] + 1) & self._mask
        return found_slots, found_rows

    def _tags_of(self, keys: Sequence[str]) -> np.ndarray:
        hashes = np.fromiter(map(self._hash, keys), np.int64, len(keys))
        return (hashes & _TAG_MASK).astype(np.uint32)

    def _equal(
        self, asked: tuple[np.ndarray, np.ndarray, np.ndarray], positions: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """Whether key positions[i] is the id of rows[i], for every i, comparing bytes (vectorised).
        `asked` is the keys' UTF-8 concatenated, with each one's start and byte count."""
        data, starts, sizes = asked
        ids = self._ids
        held_sizes = ids._sizes()[rows].astype(np.int64)
        equal = held_sizes == sizes[positions]
        alike = np.flatnonzero(equal)
        if alike.size:
            held, ends = _gather(
                np.frombuffer(ids._buf, np.uint8), ids._starts()[rows[alike]], held_sizes[alike]
            )
            given, _ = _gather(data, starts[positions[alike]], held_sizes[alike])
            differs = held != given
            if differs.any():
                equal[alike] = ~np.logical_or.reduceat(differs, ends - held_sizes[alike])
        return equal

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._rows, np.int32), np.frombuffer(self._tags, np.uint32)

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(tags, rows) of every entry held."""
        table_rows, table_tags = self._arrays()
        held = table_rows >= 0
        return table_tags[held], table_rows[held]

    def _build(
        self, size: int, tags: np.ndarray, rows: np.ndarray, keys: Sequence[str] | None = None, old: int = 0
    ) -> None:
        """Replaces the table with one of at least `size` slots (a power of two) holding the entries
        (tags[i], rows[i]), laid out as linear probing would, without probing: sorted by home slot, the
        i-th entry lands at max(its home, where the one before landed + 1), a running maximum
        (np.maximum.accumulate of home - i, plus i). Entries run past the end wrap to the first free
        slots. With keys (the keys of the entries from `old` on; those before are held keys, of
        `ids[row]`), two entries of one key raise ValueError before anything changes."""
        size = max(_MIN_SLOTS, 1 << max(0, size - 1).bit_length())
        mask = size - 1
        new_rows: array[int] = array("i", [-1]) * size
        new_tags: array[int] = _zeros("I", size)
        table_rows, table_tags = np.frombuffer(new_rows, np.int32), np.frombuffer(new_tags, np.uint32)
        if tags.size:
            # (in place where it can be: at 1M entries every temporary array is 8 MB)
            wide = tags.astype(np.int64)
            by = wide & mask
            by <<= 32
            by |= wide
            order = np.argsort(by)  # by home slot, then by tag
            del by
            ordered = wide[order]
            del wide
            if keys is not None:
                self._check_distinct(ordered, order, rows, keys, old)
            landing = ordered
            landing &= mask
            step = np.arange(order.size)
            landing -= step
            np.maximum.accumulate(landing, out=landing)
            landing += step
            del step
            inside = int(np.searchsorted(landing, size))
            table_rows[landing[:inside]] = rows[order[:inside]]
            table_tags[landing[:inside]] = tags[order[:inside]]
            slot = 0
            for entry in order[inside:].tolist():  # wrapped past the end: a handful at most
                while table_rows[slot] >= 0:
                    slot += 1
                table_rows[slot], table_tags[slot] = rows[entry], tags[entry]
        self._rows, self._tags = new_rows, new_tags
        self._mask = mask
        self._limit = int(size * MAX_LOAD)

    def _check_distinct(
        self, ordered: np.ndarray, order: np.ndarray, rows: np.ndarray, keys: Sequence[str], old: int
    ) -> None:
        """Raises ValueError when two entries have one key. Entries of one key have one tag, so after
        sorting by tag they are neighbours in a run of equal tags: only those runs (rare: two tags out
        of 2**32 alike) are compared, by key."""
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        run: set[str] = set()
        for index, position in enumerate(same.tolist()):
            if not index or same[index - 1] != position - 1:
                run = {self._key_of(int(order[position]), rows, keys, old)}
            key = self._key_of(int(order[position + 1]), rows, keys, old)
            if key in run:
                raise ValueError(f"id {key!r} is held already or given twice")
            run.add(key)

    def _key_of(self, entry: int, rows: np.ndarray, keys: Sequence[str], old: int) -> str:
        return keys[entry - old] if entry >= old else self._ids[int(rows[entry])]

    def _place(self, tags: np.ndarray, rows: np.ndarray, keys: Sequence[str], first_row: int) -> None:
        """Puts new entries (tag, row) for keys into free slots of the table by linear probing, in
        rounds: every pending entry looks at its slot; of those finding it free, one per slot takes it
        (the others look again next round); those finding it taken move one slot on, after comparing
        keys with an entry of the same tag: the same key raises ValueError, undoing the rounds."""
        table_rows, table_tags = self._arrays()
        mask = self._mask
        slots = tags.astype(np.int64) & mask
        pending = np.arange(rows.size)
        taken: list[np.ndarray] = []
        ours = np.zeros(table_rows.size, bool)  # the slots this batch took
        while pending.size:
            at = slots[pending]
            free = table_rows[at] < 0
            same = np.flatnonzero(~free & (table_tags[at] == tags[pending]))
            for position, slot in zip(pending[same].tolist(), at[same].tolist(), strict=True):
                held = int(table_rows[slot])
                other = keys[held - first_row] if ours[slot] else self._ids[held]
                if other == keys[position]:
                    for slots_taken in taken:
                        table_rows[slots_taken] = -1
                        table_tags[slots_taken] = 0
                    raise ValueError(f"id {keys[position]!r} is held already or given twice")
            claim = np.flatnonzero(free)
            claimants, claimed = pending[claim], at[claim]
            table_rows[claimed] = -2 - claimants  # a mark per entry: one of them lands in each slot
            won = table_rows[claimed] == -2 - claimants
            table_rows[claimed[won]] = rows[claimants[won]]
            table_tags[claimed[won]] = tags[claimants[won]]
            ours[claimed[won]] = True
            taken.append(claimed[won])
            blocked = pending[~free]
            slots[blocked] = (slots[blocked] + 1) & mask
            stay = np.ones(pending.size, bool)
            stay[claim[won]] = False
            pending = pending[stay]


# ---- measuring ----------------------------------------------------------------------------


def _measure(count: int) -> None:  # pragma: no cover - a benchmark, run by hand
    """Prints memory per item and operation timings at `count` ids like `img-0000001`, next to a list
    and a dict doing the same."""

    def timed(what: str, action: Callable[[], object]) -> None:
        began = time.perf_counter()
        action()
        print(f"{what:<52} {time.perf_counter() - began:7.3f} s")

    def fresh() -> list[str]:  # new str objects, their hashes not computed yet, as a request or load has
        return [f"img-{i:07d}" for i in range(count)]

    tracemalloc.start()
    ids = fresh()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    packed = PackedIds(ids)
    row_map = RowMap(packed)
    row_map.extend(ids, 0)
    ours, peak = (size - base for size in tracemalloc.get_traced_memory())
    del packed, row_map
    base = tracemalloc.get_traced_memory()[0]
    listed = [i.encode().decode() for i in ids]  # str objects of their own, as a list of ids has
    mapped = {item_id: row for row, item_id in enumerate(listed)}
    theirs = tracemalloc.get_traced_memory()[0] - base
    del listed, mapped
    tracemalloc.stop()
    print(
        f"memory (tracemalloc): PackedIds + RowMap {ours / count:.1f} B/item (peak while loading "
        f"{peak / count:.1f}); list + dict {theirs / count:.1f} B/item"
    )

    ids = fresh()
    packed, row_map = PackedIds(), RowMap(PackedIds())

    def load() -> None:
        nonlocal packed, row_map
        packed = PackedIds(ids)
        row_map = RowMap(packed)
        row_map.extend(ids, 0)

    timed("load: PackedIds(ids) + RowMap.extend (bulk)", load)
    print(f"  nbytes: PackedIds {packed.nbytes / count:.1f} B/item, RowMap {row_map.nbytes / count:.1f}")
    dict_ids = fresh()
    timed(
        "  (list(ids) + dict(zip(ids, range)))",
        lambda: (list(dict_ids), dict(zip(dict_ids, range(count), strict=True))),
    )
    one_packed = PackedIds()
    one_map = RowMap(one_packed)
    ids = fresh()

    def insert_each() -> None:
        for item_id in ids:
            one_map[item_id] = len(one_packed)
            one_packed.append(item_id)

    timed("one by one: map[id] = len(ids); ids.append(id)", insert_each)
    one_list: list[str] = []
    one_dict: dict[str, int] = {}
    dict_ids = fresh()

    def insert_each_dict() -> None:
        for item_id in dict_ids:
            one_dict[item_id] = len(one_list)
            one_list.append(item_id)

    timed("  (the same on a list and a dict)", insert_each_dict)
    ids = fresh()
    timed("RowMap.get one by one", lambda: [row_map.get(i) for i in ids])
    dict_ids = fresh()
    timed("  (dict.get one by one)", lambda: [one_dict.get(i) for i in dict_ids])
    timed("id in RowMap one by one (hashes computed already)", lambda: [i in row_map for i in ids])
    ids = fresh()
    timed("RowMap.rows_array (bulk, all found)", lambda: row_map.rows_array(ids))
    timed("PackedIds[row] one by one", lambda: [packed[r] for r in range(count)])
    rows = np.random.default_rng(0).permutation(count)
    timed("PackedIds.take (shuffled rows)", lambda: packed.take(rows))
    timed("PackedIds.blob_of (shuffled rows)", lambda: packed.blob_of(rows))
    timed("PackedIds.tolist", packed.tolist)
    victims = [ids[r] for r in rows[: count // 10].tolist()]

    def remove(ids: PackedIds | list[str], row_of: RowMap | dict[str, int]) -> None:  # as VectorStore
        last = len(ids) - 1
        for row in sorted((row_of.pop(i) for i in victims), reverse=True):
            if row != last:
                moved = ids[last]
                ids[row] = moved
                row_of[moved] = row
            ids.pop()
            last -= 1

    bulk_ids, bulk_map = packed.copy(), RowMap(PackedIds())
    bulk_map._ids = bulk_ids
    bulk_map.extend(bulk_ids.tolist(), 0)
    timed("PackedIds.copy", packed.copy)
    timed(f"delete {len(victims)} as VectorStore._remove does", lambda: remove(packed, row_map))
    timed("  (the same on a list and a dict)", lambda: remove(one_list, one_dict))
    assert packed.tolist() == one_list

    def remove_bulk() -> None:
        sources, targets = bulk_ids.remove_rows(bulk_map.pop_many(victims))
        bulk_map.remap(sources, targets)

    timed(f"delete {len(victims)}: pop_many + remove_rows + remap", remove_bulk)
    assert bulk_ids.tolist() == one_list
    assert bulk_map.rows_array(one_list).tolist() == list(range(len(one_list)))


if __name__ == "__main__":  # pragma: no cover
    _measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
