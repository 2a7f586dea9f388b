"""The write-ahead log: every write (upserts, deletes, collections and aliases made or dropped),
checksummed and fsync'd before it is acknowledged; concurrent writers share fsyncs (group commit).

The log is a series of segment files `wal-<first lsn>.log` in the data dir. A record is

    payload length (uint32 LE) | CRC-32 of lsn + payload (uint32 LE) | lsn (uint64 LE) | payload

where lsn (log sequence number) counts records from 1, one more for each, and payload is an operation:
kind (1 byte) | JSON length (uint32 LE) | JSON | vectors (float32 LE, upserts only). The kinds are
U = upsert, D = delete (their JSON names the collection; a record without one, as versions before
collections wrote, is of `default`), C = create a collection, X = drop one, A = set an alias and
R = remove one.

A segment is closed (and a new one begun) when a snapshot is taken, so whole segments can be removed
once a snapshot covers them. Reading stops at the first record that is torn, fails its checksum or
breaks the lsn sequence: everything before it is kept, everything from it on is dropped with a warning.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_service.store import (
    DEFAULT_COLLECTION,
    CreateCollection,
    Delete,
    DropAlias,
    DropCollection,
    Operation,
    SetAlias,
    Upsert,
)

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQ")  # payload length, crc32, lsn
MAX_RECORD_BYTES = 1 << 31
SEGMENT_PREFIX, SEGMENT_SUFFIX = "wal-", ".log"


class LogWriteError(Exception):
    """A record could not be made durable; nothing of it counts. `errno` tells disk full from other faults."""

    def __init__(self, message: str, error_number: int | None) -> None:
        super().__init__(message)
        self.errno = error_number

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def segment_name(first_lsn: int) -> str:
    return f"{SEGMENT_PREFIX}{first_lsn:020d}{SEGMENT_SUFFIX}"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """Returns the log segments in the directory as (first lsn, path), oldest first."""
    found = []
    for path in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
        digits = path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


# The catalog's operations: kind byte, class, and its fields in the JSON header.
_CATALOG_KINDS: dict[bytes, tuple[type, tuple[str, ...]]] = {
    b"C": (CreateCollection, ("name", "model_name")),
    b"X": (DropCollection, ("name",)),
    b"A": (SetAlias, ("alias", "collection")),
    b"R": (DropAlias, ("alias",)),
}


def _record(kind: bytes, header: dict[str, object], tail: bytes = b"") -> bytes:
    encoded = json.dumps(header, ensure_ascii=False).encode()
    return kind + struct.pack("<I", len(encoded)) + encoded + tail


def encode(operation: Operation) -> bytes:
    """Returns the payload of a record for the operation."""
    if isinstance(operation, Delete):
        return _record(b"D", {"ids": list(operation.ids), "collection": operation.collection})
    if isinstance(operation, Upsert):
        header = {
            "ids": list(operation.ids),
            "metadata": list(operation.metadata),
            "model_version": operation.model_version,
            "model_name": operation.model_name,
            "collection": operation.collection,
            "dim": int(operation.vectors.shape[1]),
        }
        return _record(b"U", header, np.ascontiguousarray(operation.vectors, dtype="<f4").tobytes())
    for kind, (operation_class, fields) in _CATALOG_KINDS.items():
        if isinstance(operation, operation_class):
            return _record(kind, {name: getattr(operation, name) for name in fields})
    raise TypeError(f"not a loggable operation: {operation!r}")


def decode(payload: bytes) -> Operation:
    """Returns the operation in a payload; ValueError when it is not one."""
    kind = payload[:1]
    (length,) = struct.unpack_from("<I", payload, 1)
    header = json.loads(payload[5 : 5 + length].decode("utf-8"))
    if kind == b"D":
        return Delete(tuple(header["ids"]), header.get("collection", DEFAULT_COLLECTION))
    if kind in _CATALOG_KINDS:
        operation_class, fields = _CATALOG_KINDS[kind]
        return operation_class(*(str(header[name]) for name in fields))  # type: ignore[no-any-return]
    if kind != b"U":
        raise ValueError(f"unknown operation kind {kind!r}")
    ids, dim = tuple(header["ids"]), int(header["dim"])
    vectors = np.frombuffer(payload, dtype="<f4", offset=5 + length).astype(np.float32)
    if vectors.size != len(ids) * dim:
        raise ValueError(f"{vectors.size} floats for {len(ids)} vectors of dim {dim}")
    return Upsert(
        ids,
        vectors.reshape(len(ids), dim),
        tuple(header["metadata"]),
        header["model_version"],
        header.get("model_name", ""),
        header.get("collection", DEFAULT_COLLECTION),
    )


@dataclass(frozen=True)
class Damage:
    path: Path
    offset: int
    reason: str


def read_segment(path: Path, expected_lsn: int | None) -> tuple[list[tuple[int, Operation]], Damage | None]:
    """Returns the segment's valid records in order, and where and why reading stopped early (if it did)."""
    data = path.read_bytes()
    records: list[tuple[int, Operation]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            return records, Damage(path, offset, "a torn record header")
        length, crc, lsn = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            return records, Damage(path, offset, "a torn record")
        body = data[offset + 8 : end]  # lsn + payload
        if zlib.crc32(body) != crc:
            return records, Damage(path, offset, "a checksum mismatch")
        if expected_lsn is not None and lsn != expected_lsn:
            return records, Damage(path, offset, f"lsn {lsn} where {expected_lsn} was expected")
        try:
            operation = decode(data[offset + HEADER.size : end])
        except (ValueError, KeyError, UnicodeDecodeError, struct.error) as error:
            return records, Damage(path, offset, f"an unreadable operation ({error})")
        records.append((lsn, operation))
        expected_lsn = lsn + 1
        offset = end
    return records, None


def recover(directory: Path, after_lsn: int) -> Iterator[tuple[int, Operation]]:
    """Yields every logged operation with lsn > after_lsn (the snapshot's), in order, across segments.

    At the first damaged record it logs a warning naming the file and offset, cuts that segment there
    and sets the later segments aside (renamed *.damaged), so new records follow the last good one.
    Raises RecoveryError when the log does not continue the snapshot."""
    expected: int | None = None
    last = after_lsn
    listed = segments(directory)
    for position, (_, path) in enumerate(listed):
        records, damage = read_segment(path, expected)
        for lsn, operation in records:
            expected = lsn + 1
            if lsn <= after_lsn:
                continue
            if lsn != last + 1:
                raise RecoveryError(
                    f"{path} continues at lsn {lsn} but the snapshot ends at lsn {after_lsn}: "
                    f"records {last + 1} to {lsn - 1} are missing"
                )
            yield lsn, operation
            last = lsn
        if damage is not None:
            _set_damage_aside(damage, len(records), listed[position + 1 :])
            return


def _set_damage_aside(damage: Damage, kept: int, later: list[tuple[int, Path]]) -> None:
    dropped = damage.path.stat().st_size - damage.offset
    log.warning(
        "write-ahead log %s: %s at byte offset %d; keeping the %d records before it, dropping %d bytes%s",
        damage.path,
        damage.reason,
        damage.offset,
        kept,
        dropped,
        " and the later segments" if later else "",
    )
    try:
        with open(damage.path, "r+b") as file:
            file.truncate(damage.offset)
            os.fsync(file.fileno())
        for _, path in later:
            path.rename(path.with_suffix(path.suffix + ".damaged"))
        fsync_dir(damage.path.parent)
    except OSError as error:
        log.error("write-ahead log: cannot cut the damaged part of %s: %s", damage.path, error)


class RecoveryError(Exception):
    """The data dir cannot be brought back to a consistent state; the message says why."""


class WriteAheadLog:
    """Appends records to the current segment; `sync` returns once a record is on disk.

    Group commit: `write` only hands a record to the kernel (the caller serialises writes: the catalog's
    journal lock), and `sync(lsn)` waits for one fsync that covers it. While one caller fsyncs, the
    others that wrote meanwhile wait; when it returns, the next fsync covers all of them at once. So 8
    writers cost about one fsync per round of writes rather than one each, and still each is told its
    write is durable only after the fsync that covers it has returned."""

    def __init__(self, directory: Path, next_lsn: int) -> None:
        self.directory = directory
        self.next_lsn = next_lsn
        self.durable_lsn = next_lsn - 1  # every record through it is on disk
        self.broken: str | None = None  # set after an I/O failure that leaves the file's state unknown
        self.fsyncs = 0  # how many fsyncs the records needed (group commit makes it fewer than records)
        self._fd = -1
        self._offset = 0
        self._sync_done = threading.Condition()
        self._syncing = False  # one fsync at a time; `rotate` waits for it too
        self._open_segment(next_lsn)

    @property
    def last_lsn(self) -> int:
        return self.next_lsn - 1

    def _open_segment(self, first_lsn: int) -> None:
        """Begins the segment for first_lsn; the current one stays in use if that fails."""
        path = self.directory / segment_name(first_lsn)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._offset = descriptor, 0

    def append(self, operation: Operation) -> int:
        """Makes the operation durable (write, then sync); returns its lsn. On LogWriteError nothing of it
        counts."""
        lsn = self.write(operation)
        self.sync(lsn)
        return lsn

    def _unusable(self) -> LogWriteError:
        return LogWriteError(
            f"the write-ahead log is unusable since an earlier I/O error ({self.broken}); "
            "restart the index service",
            errno.EIO,
        )

    def write(self, operation: Operation) -> int:
        """Writes the operation's record (not yet durable: see `sync`); returns its lsn. One caller at a
        time. On LogWriteError nothing of it stays behind."""
        if self.broken:
            raise self._unusable()
        lsn = self.next_lsn
        payload = encode(operation)
        body = struct.pack("<Q", lsn) + payload
        record = memoryview(struct.pack("<II", len(payload), zlib.crc32(body)) + body)
        start = self._offset
        try:
            while record:
                written = os.write(self._fd, record)
                record = record[written:]
                self._offset += written
        except OSError as error:
            self._undo(start, error)
            raise LogWriteError(
                f"cannot write the write-ahead log: {error.strerror or error}", error.errno
            ) from error
        self.next_lsn += 1  # after the whole record is written: an fsync from now on covers it
        return lsn

    def sync(self, lsn: int) -> None:
        """Returns once every record through lsn is on disk: at once if an fsync covered it already,
        else after the next one, which this caller makes unless another is making it (then it waits and
        looks again). Raises LogWriteError if that fsync failed."""
        with self._sync_done:
            while self.durable_lsn < lsn:
                if self.broken:
                    raise self._unusable()
                if self._syncing:
                    self._sync_done.wait()
                    continue
                self._syncing = True
                covered, descriptor = self.next_lsn - 1, self._fd
                self._sync_done.release()
                failure: OSError | None = None
                try:
                    os.fsync(descriptor)
                except OSError as error:
                    failure = error
                finally:
                    self._sync_done.acquire()
                    self._syncing = False
                    self._sync_done.notify_all()
                self.fsyncs += 1
                if failure is not None:
                    # After a failed fsync the kernel may have dropped the dirty pages: content unknown.
                    self.broken = f"fsync failed: {failure.strerror or failure}"
                    raise LogWriteError(
                        f"cannot make the write-ahead log durable: {failure.strerror or failure}",
                        failure.errno,
                    ) from failure
                self.durable_lsn = max(self.durable_lsn, covered)

    def _undo(self, start: int, error: OSError) -> None:
        """Cuts a partly written record off the end, so the next record follows the last good one."""
        try:
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
            self._offset = start
        except OSError as undo_error:
            self.broken = f"{error.strerror or error}, then could not cut the partial record: {undo_error}"
            log.error("write-ahead log: %s", self.broken)

    def rotate(self) -> None:
        """Makes the current segment durable, then begins a new one at the next lsn and closes the old.
        Called with every writer held off, so nothing is written meanwhile; a caller still waiting in
        `sync` for a record of the old segment finds it durable."""
        with self._sync_done:
            while self._syncing:
                self._sync_done.wait()
            if self.durable_lsn < self.last_lsn:
                try:
                    os.fsync(self._fd)
                except OSError as error:
                    self.broken = f"fsync failed: {error.strerror or error}"
                    self._sync_done.notify_all()
                    raise
                self.fsyncs += 1
                self.durable_lsn = self.last_lsn
                self._sync_done.notify_all()
            self._open_segment(self.next_lsn)

    def remove_through(self, lsn: int) -> None:
        """Removes the segments whose every record has an lsn <= lsn (a durable snapshot holds them)."""
        listed = segments(self.directory)
        for (_, path), (next_first, _) in itertools.pairwise(listed):
            if next_first - 1 <= lsn:
                path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def close(self) -> None:
        """Closes the segment; records written and not yet synced are fsync'd first (best effort)."""
        if self._fd >= 0:
            with self._sync_done:
                while self._syncing:
                    self._sync_done.wait()
                if self.durable_lsn < self.last_lsn and not self.broken:
                    try:
                        os.fsync(self._fd)
                        self.durable_lsn = self.last_lsn
                    except OSError as error:
                        log.error("write-ahead log: the last fsync at close failed: %s", error)
                os.close(self._fd)
                self._fd = -1


def fsync_dir(directory: Path) -> None:
    """Makes a directory's entries (creations, renames, removals) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
