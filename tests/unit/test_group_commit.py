"""Group commit: concurrent writers share fsyncs, and each is acknowledged only after an fsync that covers
its record (index_service/wal.py, WriteAheadLog.sync)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index_service.durable import DurableStore
from index_service.wal import WriteAheadLog, recover

DIM = 8
WRITERS = 8
WRITES_EACH = 12


class SlowDisk:
    """Wraps os.fsync in the log: each takes a few ms (as a real disk's does), and what each covered is
    recorded when it returns: the highest lsn whose record was written before it began."""

    def __init__(self, wal: WriteAheadLog, delay_s: float = 0.004) -> None:
        self.wal = wal
        self.delay_s = delay_s
        self.durable_through = 0  # the highest lsn an fsync that has returned covered
        self.calls = 0
        self._lock = threading.Lock()
        self._real = os.fsync

    def fsync(self, descriptor: int) -> None:
        covered = self.wal.next_lsn - 1  # records written completely before this fsync began
        time.sleep(self.delay_s)
        self._real(descriptor)
        with self._lock:
            self.calls += 1
            self.durable_through = max(self.durable_through, covered)


def write_concurrently(
    durable: DurableStore, disk: SlowDisk, snapshot_midway: bool = False
) -> dict[str, int]:
    """WRITERS threads upsert one vector a call; returns, for each id, what the disk had made durable
    when its upsert returned."""
    acknowledged: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(WRITERS)

    def writer(number: int) -> None:
        try:
            start.wait()
            for write in range(WRITES_EACH):
                item_id = f"w{number}-{write}"
                vector = np.full((1, DIM), number + write / 100, np.float32)
                durable.store.upsert([item_id], vector, [{"w": str(number)}], "m1")
                acknowledged[item_id] = disk.durable_through
                if snapshot_midway and number == 0 and write == WRITES_EACH // 2:
                    durable.snapshot()
        except BaseException as error:  # the test thread reports it
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return acknowledged


def logged_lsns(data_dir: Path) -> dict[str, int]:
    return {
        item_id: lsn for lsn, operation in recover(data_dir, 0) for item_id in getattr(operation, "ids", ())
    }


def test_concurrent_writers_share_fsyncs_and_each_is_acknowledged_after_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = DurableStore(tmp_path)
    try:
        assert durable.wal is not None
        disk = SlowDisk(durable.wal)
        monkeypatch.setattr("index_service.wal.os.fsync", disk.fsync)
        acknowledged = write_concurrently(durable, disk)
        writes = WRITERS * WRITES_EACH
        assert durable.store.stats().count == writes
        # Shared: with 8 writers waiting on a 4 ms disk, far fewer fsyncs than writes.
        assert disk.calls <= writes // 2, f"{disk.calls} fsyncs for {writes} writes"
    finally:
        durable.close(snapshot=False)
    lsns = logged_lsns(tmp_path)
    late = {i: (lsns[i], seen) for i, seen in acknowledged.items() if lsns[i] > seen}
    assert not late, f"acknowledged before an fsync covered their records (lsn, durable then): {late}"


def test_one_writer_still_fsyncs_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    durable = DurableStore(tmp_path)
    try:
        assert durable.wal is not None
        disk = SlowDisk(durable.wal, delay_s=0.0)
        monkeypatch.setattr("index_service.wal.os.fsync", disk.fsync)
        for number in range(5):
            durable.store.upsert([f"x{number}"], np.ones((1, DIM), np.float32), (), "m1")
            assert disk.durable_through == durable.wal.last_lsn  # durable when upsert returned
        durable.store.delete(["x0"])
        assert disk.durable_through == durable.wal.last_lsn
        assert disk.calls == 6
    finally:
        durable.close(snapshot=False)


def test_a_snapshot_amid_concurrent_writers_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot rotates the log while writers wait for fsyncs of the old segment: rotate makes it
    durable first, so every waiter is released and every write is found again after a restart."""
    durable = DurableStore(tmp_path)
    try:
        assert durable.wal is not None
        disk = SlowDisk(durable.wal, delay_s=0.002)
        monkeypatch.setattr("index_service.wal.os.fsync", disk.fsync)
        write_concurrently(durable, disk, snapshot_midway=True)
    finally:
        durable.close(snapshot=False)
    monkeypatch.undo()
    reopened = DurableStore(tmp_path)
    try:
        assert reopened.store.stats().count == WRITERS * WRITES_EACH
        items, _, missing = reopened.store.get(
            [f"w{n}-{w}" for n in range(WRITERS) for w in range(WRITES_EACH)]
        )
        assert not missing and len(items) == WRITERS * WRITES_EACH
    finally:
        reopened.close(snapshot=False)
