"""The index's promises on disk: the write-ahead log, snapshots, recovery, damage, the lock, full disks."""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from index_service.durable import DataDirError, DurableStore
from index_service.faiss_store import VectorStore
from index_service.snapshot import snapshots
from index_service.store import StorageFull, StorageUnavailable
from index_service.wal import HEADER, segments

DIM = 8


@contextmanager
def opened(data_dir: Path, snapshot_on_close: bool = False, **options: float) -> Iterator[DurableStore]:
    """A DurableStore; closed without a snapshot by default, as a crash would leave it."""
    durable = DurableStore(data_dir, **options)  # type: ignore[arg-type]
    try:
        yield durable
    finally:
        durable.close(snapshot=snapshot_on_close)


class Model:
    """What the store must hold: a dict of id -> (vector, metadata), fed the same operations."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[np.ndarray, dict[str, str]]] = {}

    def upsert(self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, str]]) -> None:
        for item_id, vector, entries in zip(ids, vectors, metadata, strict=True):
            self.items[item_id] = (vector.copy(), entries)

    def delete(self, ids: list[str]) -> None:
        for item_id in ids:
            self.items.pop(item_id, None)


def assert_holds(store: VectorStore, model: Model) -> None:
    state = store.state()
    assert sorted(state.ids) == sorted(model.items)
    for item_id, entries, vector in zip(state.ids, state.metadata, state.vectors, strict=True):
        np.testing.assert_array_equal(vector, model.items[item_id][0])
        assert entries == model.items[item_id][1]
    if model.items:
        ids = sorted(model.items)
        base = np.stack([model.items[i][0] for i in ids])
        query = base[:3] + 0.01
        expected = np.argsort(((query[:, None, :] - base[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :5]
        got = store.search(query, 5)
        assert [[m.id for m in row] for row in got] == [[ids[i] for i in row] for row in expected]


def operations(count: int, seed: int) -> list[tuple[str, list[str], np.ndarray, list[dict[str, str]]]]:
    """A reproducible mix of upserts (new and replacing) and deletes."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)
    result: list[tuple[str, list[str], np.ndarray, list[dict[str, str]]]] = []
    for n in range(count):
        if n and rng.random() < 0.3:
            ids = [f"id{rng.randrange(count * 2)}" for _ in range(rng.randint(1, 3))]
            result.append(("delete", list(dict.fromkeys(ids)), np.zeros((0, DIM), np.float32), []))
        else:
            ids = list(dict.fromkeys(f"id{rng.randrange(count * 2)}" for _ in range(rng.randint(1, 4))))
            metadata = [{"op": str(n), "label": str(rng.randrange(10))} for _ in ids]
            result.append(
                ("upsert", ids, vectors.standard_normal((len(ids), DIM)).astype(np.float32), metadata)
            )
    return result


def apply(durable: DurableStore, model: Model, operation: tuple) -> None:  # type: ignore[type-arg]
    kind, ids, vectors, metadata = operation
    if kind == "upsert":
        durable.store.upsert(ids, vectors, metadata, "m1")
        model.upsert(ids, vectors, metadata)
    else:
        durable.store.delete(ids)
        model.delete(ids)


def test_every_write_is_in_the_log_before_it_returns(tmp_path: Path) -> None:
    model = Model()
    with opened(tmp_path, snapshot_every_ops=10**9) as durable:
        for operation in operations(200, seed=1):
            apply(durable, model, operation)
    assert not snapshots(tmp_path)  # nothing but the log holds the writes
    with opened(tmp_path) as durable:
        assert_holds(durable.store, model)


def test_snapshots_rotate_the_log_and_keep_one_fallback(tmp_path: Path) -> None:
    model = Model()
    with opened(tmp_path, snapshot_every_ops=10**9) as durable:
        for n, operation in enumerate(operations(300, seed=2)):
            apply(durable, model, operation)
            if n % 70 == 69:
                durable.snapshot()
    kept = snapshots(tmp_path)
    assert len(kept) == 2
    oldest_kept_lsn = kept[-1][0]
    listed = segments(tmp_path)
    assert listed[0][0] <= oldest_kept_lsn + 1  # the log still reaches back to the fallback snapshot
    assert len(listed) <= 3
    with opened(tmp_path) as durable:
        assert_holds(durable.store, model)
    newest = kept[0][1]
    newest.write_bytes(newest.read_bytes()[:100])  # the newest snapshot is damaged
    with opened(tmp_path) as durable:
        assert_holds(durable.store, model)


def test_snapshots_are_taken_every_n_operations_in_the_background(tmp_path: Path) -> None:
    with opened(tmp_path, snapshot_every_ops=20, snapshot_every_s=3600) as durable:
        durable.start_snapshots()
        for operation in operations(60, seed=3):
            apply(durable, Model(), operation)
        deadline = time.monotonic() + 10
        while not snapshots(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert snapshots(tmp_path)


def record_offsets(path: Path) -> list[int]:
    """Returns the byte offset at which each record in a segment starts, and the end of the file last."""
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        (length, _, _) = HEADER.unpack_from(data, offset)
        offset += HEADER.size + length
    return [*offsets, offset]


@pytest.mark.parametrize("seed", range(12))
def test_a_damaged_log_keeps_every_record_before_the_damage(
    tmp_path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    history = []  # the operations that made a log record (a delete of absent ids makes none)
    with opened(tmp_path, snapshot_every_ops=10**9) as durable:
        for operation in operations(40, seed=seed):
            before = durable.store.lsn
            apply(durable, Model(), operation)
            if durable.store.lsn != before:
                history.append(operation)
    ((_, path),) = [s for s in segments(tmp_path) if s[1].stat().st_size]
    offsets = record_offsets(path)
    rng = random.Random(seed)
    data = bytearray(path.read_bytes())
    position = rng.randrange(len(data))
    if seed % 2:
        path.write_bytes(bytes(data[:position]))  # torn: power went out mid-write
    else:
        data[position] ^= 1 << rng.randrange(8)  # a flipped bit
        path.write_bytes(bytes(data))
    damaged_record = max(i for i, start in enumerate(offsets[:-1]) if start <= position)
    model = Model()
    for operation in history[:damaged_record]:
        kind, ids, vectors, metadata = operation
        model.upsert(ids, vectors, metadata) if kind == "upsert" else model.delete(ids)
    with caplog.at_level(logging.WARNING), opened(tmp_path) as durable:
        assert_holds(durable.store, model)
        assert durable.store.lsn == damaged_record
        # new writes follow the last good record and survive the next start
        durable.store.upsert(["after"], np.ones((1, DIM), np.float32), (), "m1")
        model.upsert(["after"], np.ones((1, DIM), np.float32), [{}])
    assert f"at byte offset {offsets[damaged_record]}" in caplog.text
    with opened(tmp_path) as durable:
        assert_holds(durable.store, model)


def test_a_second_process_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with opened(tmp_path):
        with pytest.raises(DataDirError, match="in use by another index process"):
            DurableStore(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "index_service", "--port", "0", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and "in use by another index process" in result.stderr
        assert "--backend milvus" in result.stderr  # the way to several replicas
        assert "Traceback" not in result.stderr
    with opened(tmp_path):  # released on close
        pass


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, for a disk that fills up; needs root (as in CI)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_refuses_writes_keeps_reads_and_loses_nothing_acknowledged(small_disk: Path) -> None:
    model = Model()
    rng = np.random.default_rng(0)
    with opened(small_disk, snapshot_every_ops=10**9) as durable:
        refused = 0
        for n in range(10_000):
            vectors = rng.standard_normal((50, DIM)).astype(np.float32)
            ids = [f"n{n}-{i}" for i in range(50)]
            metadata = [{"pad": "x" * 100}] * 50
            try:
                durable.store.upsert(ids, vectors, metadata, "m1")
            except StorageFull as error:
                assert "is full" in str(error)
                refused += 1
                if refused == 3:
                    break
                continue
            model.upsert(ids, vectors, metadata)
        assert refused == 3 and len(model.items) > 1000
        assert_holds(durable.store, model)  # reads work; nothing refused is visible
        (_, path) = segments(small_disk)[-1]
        offsets = record_offsets(path)
        assert offsets[-1] == path.stat().st_size  # no partial record left at the end
    with opened(small_disk) as durable:
        assert_holds(durable.store, model)


def test_a_read_only_data_dir_refuses_writes_and_keeps_reads(small_disk: Path) -> None:
    model = Model()
    with opened(small_disk) as durable:
        for operation in operations(30, seed=4):
            apply(durable, model, operation)
    # (the kernel refuses to remount read-only while a file is open for writing: remount between runs)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with opened(small_disk) as durable:
        assert_holds(durable.store, model)
        with pytest.raises(StorageUnavailable, match="not writable"):
            durable.store.upsert(["x"], np.ones((1, DIM), np.float32), (), "m1")
        assert_holds(durable.store, model)


def test_an_io_error_mid_write_is_refused_and_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fails (EIO, or remounted read-only under a running service) cannot be made real
    while the log file is open, so the fault is injected: half a record is written, then EIO."""
    model = Model()
    with opened(tmp_path) as durable:
        for operation in operations(20, seed=5):
            apply(durable, model, operation)
        real_write = os.write

        def failing_write(fd: int, data: bytes) -> int:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr("index_service.wal.os.write", failing_write)
        with pytest.raises(StorageUnavailable, match="Input/output error"):
            durable.store.upsert(["x"], np.ones((1, DIM), np.float32), (), "m1")
        monkeypatch.undo()
        assert_holds(durable.store, model)
        durable.store.upsert(["y"], np.ones((1, DIM), np.float32), [{"a": "b"}], "m1")  # the disk is back
        model.upsert(["y"], np.ones((1, DIM), np.float32), [{"a": "b"}])
    with opened(tmp_path) as durable:
        assert_holds(durable.store, model)


def test_a_failed_fsync_stops_all_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fsync the kernel may have dropped the pages: no later write may be acknowledged.
    (The write whose fsync failed was applied in memory before its fsync, as group commit does, and is
    refused to its writer: an error means its outcome is unknown; the next one is refused before it is
    applied.)"""
    with opened(tmp_path) as durable:

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr("index_service.wal.os.fsync", failing_fsync)
        with pytest.raises(StorageUnavailable, match="cannot make the write-ahead log durable"):
            durable.store.upsert(["x"], np.ones((1, DIM), np.float32), (), "m1")
        monkeypatch.undo()
        with pytest.raises(StorageUnavailable, match="restart the index service"):
            durable.store.upsert(["y"], np.ones((1, DIM), np.float32), (), "m1")
        assert durable.store.get(["y"])[2] == ["y"]


def test_records_survive_byte_for_byte(tmp_path: Path) -> None:
    with opened(tmp_path) as durable:
        durable.store.upsert(
            ["é/ü"], np.array([[1.5, -0.0, 3e-38, 1e38, 0, 0, 0, 7]], np.float32), [{"k": "∑"}], "m"
        )
    with opened(tmp_path) as durable:
        items, vectors, _ = durable.store.get(["é/ü"])
        assert items == [("é/ü", {"k": "∑"})]
        assert struct.pack("<8f", 1.5, -0.0, 3e-38, 1e38, 0, 0, 0, 7) == vectors.astype("<f4").tobytes()
