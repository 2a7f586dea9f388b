"""A Catalog (the FAISS collections) that keeps its promises on disk: the lock, recovery, the log and
snapshots.

Layout of a data dir:
    LOCK                      held (flock) by the one index process using the dir
    snapshot-<lsn>.bin        the two newest snapshots (the older one is the fallback)
    wal-<first lsn>.log       log segments since the older snapshot

Start: take the lock, load the newest readable snapshot, replay the log after it, begin a new
segment. Write: the collection's store (or the catalog) checks the operation, `journal` writes it to the
log, then it is applied, under the store's write lock (the catalog's lock); then, with the lock released,
`sync` waits for the fsync that covers it (group commit: one fsync for every writer waiting then), and
only then is the write acknowledged. So nothing is acknowledged before it is durable; a concurrent reader
may see a write a moment before its writer is told it is durable (and if that fsync fails, the write is
refused to its writer, the log is marked unusable and every later write is refused until a restart).
Snapshot (every N operations or T seconds, and on close): copy the state and rotate the log at the
same lsn, write the snapshot atomically, then drop what two snapshots make unneeded.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path

from imgsearch_server.memory import release_free_memory
from index_service.catalog import Catalog
from index_service.faiss_store import VectorStore
from index_service.snapshot import newest_valid_snapshot, remove_older_snapshots, write_snapshot
from index_service.store import Operation, StorageFull, StorageUnavailable
from index_service.wal import LogWriteError, RecoveryError, WriteAheadLog, recover

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"


class DataDirError(Exception):
    """The data dir cannot be used (locked by another process, unreadable, inconsistent)."""


class DataDirLocked(DataDirError):
    """Another index process holds the data dir: with FAISS, a second replica over the same volume."""


SCALE_HINT = (
    "the FAISS backend keeps its vectors in this process, so it runs as one replica; to run several "
    "index replicas, use the Milvus backend (--backend milvus; with Docker Compose, "
    "IMGSEARCH_INDEX_BACKEND=milvus and the milvus profile: README, Scaling out)"
)


def _storage_error(error: LogWriteError, data_dir: Path) -> StorageFull | StorageUnavailable:
    if error.disk_full:
        return StorageFull(f"the disk holding {data_dir} is full: {error}")
    return StorageUnavailable(f"writes are refused: {error}")


class DirectoryLock:
    """An exclusive flock on data_dir/LOCK, released when closed or when the process dies."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / LOCK_NAME
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            self._fd = os.open(path, os.O_RDONLY)  # a read-only data dir can still be locked
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = os.pread(self._fd, 128, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise DataDirLocked(
                    f"{data_dir} is in use by another index process (pid {owner}); "
                    f"one data dir serves one index process: {SCALE_HINT}"
                ) from None
            raise
        try:
            os.ftruncate(self._fd, 0)
            # The host name too: in a container every replica is pid 1, and its host name is its id.
            os.pwrite(self._fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # read-only: the lock holds all the same

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DurableStore:
    """Owns a data dir: recovers it at open, logs every write, snapshots now and then."""

    def __init__(
        self,
        data_dir: Path,
        *,
        max_k: int = 1000,
        snapshot_every_ops: int = 10_000,
        snapshot_every_s: float = 300.0,
    ) -> None:
        self.data_dir = data_dir
        self.snapshot_every_ops = snapshot_every_ops
        self.snapshot_every_s = snapshot_every_s
        started = time.monotonic()
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataDirError(f"cannot create the data dir {data_dir}: {error.strerror or error}") from error
        self._lock_file = DirectoryLock(data_dir)
        try:
            self.catalog, replayed = self._recover(max_k)
            self.wal: WriteAheadLog | None = None
            self.read_only_reason = ""
            try:
                self.wal = WriteAheadLog(data_dir, self.catalog.lsn + 1)
            except OSError as error:
                self.read_only_reason = f"the data dir {data_dir} is not writable ({error.strerror or error})"
                log.error("%s: serving reads only", self.read_only_reason)
            self.catalog.journal = self._journal
            self.catalog.sync = self._sync
        except BaseException:
            self._lock_file.close()
            raise
        release_free_memory()  # what loading the snapshot and replaying the log left on the heap
        for stale in data_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        stats = self.catalog.total()
        log.info(
            "recovered %d vectors in %d collections from %s: snapshot at lsn %d, %d log records replayed, "
            "in %.3f s",
            stats.count,
            len(self.catalog.collections()),
            data_dir,
            self.catalog.lsn - replayed,
            replayed,
            time.monotonic() - started,
        )
        self._ops_since_snapshot = replayed
        self._last_snapshot = time.monotonic()
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def store(self) -> VectorStore:
        """The `default` collection's store (it always exists)."""
        return self.catalog.default

    def _recover(self, max_k: int) -> tuple[Catalog, int]:
        try:
            state = newest_valid_snapshot(self.data_dir)
            catalog = Catalog(state, max_k=max_k)
            replayed = 0
            for lsn, operation in recover(self.data_dir, catalog.lsn):
                catalog.replay(operation, lsn)
                replayed += 1
        except (RecoveryError, OSError) as error:
            raise DataDirError(f"cannot recover {self.data_dir}: {error}") from error
        except Exception as error:  # a SnapshotError names its file
            raise DataDirError(str(error)) from error
        return catalog, replayed

    def _journal(self, operation: Operation) -> int:
        """Writes one operation to the log (called by the catalog, one at a time); `_sync` makes it
        durable."""
        if self.wal is None:
            raise StorageUnavailable(f"writes are refused: {self.read_only_reason}")
        try:
            lsn = self.wal.write(operation)
        except LogWriteError as error:
            raise _storage_error(error, self.data_dir) from error
        self._ops_since_snapshot += 1
        return lsn

    def _sync(self, lsn: int) -> None:
        """Returns once the log holds everything through lsn on disk (one fsync for every writer waiting
        at the time: group commit)."""
        if self.wal is None:
            raise StorageUnavailable(f"writes are refused: {self.read_only_reason}")
        try:
            self.wal.sync(lsn)
        except LogWriteError as error:
            raise _storage_error(error, self.data_dir) from error

    # ---- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> Path | None:
        """Writes a snapshot at the current lsn and drops the log it makes unneeded; returns its path."""
        if self.wal is None:
            return None
        wal = self.wal
        with self._snapshot_lock:
            started = time.monotonic()

            def rotate() -> None:  # runs with writers held off: the new segment begins at state.lsn + 1
                wal.rotate()
                self._ops_since_snapshot = 0

            state = self.catalog.state(while_consistent=rotate)
            self._last_snapshot = time.monotonic()
            path = write_snapshot(state, self.data_dir)
            oldest_kept = remove_older_snapshots(self.data_dir, keep=2)
            if oldest_kept is not None:
                wal.remove_through(oldest_kept)
            log.info(
                "snapshot of %d vectors in %d collections at lsn %d written to %s in %.3f s",
                sum(len(c.ids) for c in state.collections.values()),
                len(state.collections),
                state.lsn,
                path,
                time.monotonic() - started,
            )
            return path

    def _snapshot_due(self) -> bool:
        if self._ops_since_snapshot == 0:
            return False
        return (
            self._ops_since_snapshot >= self.snapshot_every_ops
            or time.monotonic() - self._last_snapshot >= self.snapshot_every_s
        )

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(0.5):
            if self._snapshot_due():
                try:
                    self.snapshot()
                except OSError as error:  # disk full: the log still holds everything; try again later
                    log.error("snapshot failed, the log keeps every write: %s", error)
                    self._last_snapshot = time.monotonic()

    def start_snapshots(self) -> None:
        """Starts the background thread that snapshots every N operations or T seconds."""
        self._thread = threading.Thread(target=self._snapshot_loop, name="snapshots", daemon=True)
        self._thread.start()

    def close(self, snapshot: bool = True) -> None:
        """Stops the snapshot thread, writes a last snapshot (unless told not to), releases the dir."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if snapshot and self._ops_since_snapshot:
                self.snapshot()
        except OSError as error:
            log.error("final snapshot failed, the log keeps every write: %s", error)
        finally:
            if self.wal is not None:
                self.wal.close()
            self._lock_file.close()
