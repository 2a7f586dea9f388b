"""Snapshots of the store on disk: one file each, written atomically, checked when read.

A snapshot is `snapshot-<lsn>.bin`, holding the state after the log record `lsn`:
magic (8 bytes) | header length (uint64 LE) | header (UTF-8 JSON: lsn, dim, model version, ids,
metadata) | vectors (count x dim float32 LE) | CRC-32 of everything before it (uint32 LE).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from index_service.store import StoreState
from index_service.wal import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"IMGSNAP1"
PREFIX, SUFFIX = "snapshot-", ".bin"


class SnapshotError(Exception):
    """A snapshot file that cannot be read; the message names the file and the problem."""


def snapshot_path(data_dir: Path, lsn: int) -> Path:
    return data_dir / f"{PREFIX}{lsn:020d}{SUFFIX}"


def snapshots(data_dir: Path) -> list[tuple[int, Path]]:
    """Returns the snapshot files in the data dir as (lsn, path), newest first."""
    found = []
    for path in data_dir.glob(f"{PREFIX}*{SUFFIX}"):
        digits = path.name[len(PREFIX) : -len(SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found, reverse=True)


def write_snapshot(state: StoreState, data_dir: Path) -> Path:
    """Writes the state via a temporary file, fsync, rename and a directory fsync; returns the path."""
    header = json.dumps(
        {
            "lsn": state.lsn,
            "dim": state.dim,
            "model_version": state.model_version,
            "count": len(state.ids),
            "ids": state.ids,
            "metadata": state.metadata,
            "created": time.time(),
        },
        ensure_ascii=False,
    ).encode("utf-8")
    vectors = np.ascontiguousarray(state.vectors, dtype="<f4").tobytes()
    body = MAGIC + struct.pack("<Q", len(header)) + header + vectors
    path = snapshot_path(data_dir, state.lsn)
    temporary = path.with_suffix(".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(body)
            file.write(struct.pack("<I", zlib.crc32(body)))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(data_dir)
    return path


def read_snapshot(path: Path) -> StoreState:
    """Returns the state in a snapshot file; SnapshotError naming the file when it is damaged."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"{path} cannot be read: {error.strerror or error}") from error
    if len(raw) < len(MAGIC) + 12 or not raw.startswith(MAGIC):
        raise SnapshotError(f"{path} is not an imgsearch snapshot (bad magic or too short)")
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if zlib.crc32(body) != crc:
        raise SnapshotError(f"{path} is damaged: its checksum does not match")
    (header_length,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(body[start : start + header_length].decode("utf-8"))
    dim, count = int(header["dim"]), int(header["count"])
    vectors = np.frombuffer(body, dtype="<f4", offset=start + header_length)
    if vectors.size != count * dim:
        raise SnapshotError(f"{path} is damaged: {vectors.size} floats for {count} vectors of dim {dim}")
    return StoreState(
        dim=dim,
        model_version=header["model_version"],
        ids=list(header["ids"]),
        metadata=[dict(m) for m in header["metadata"]],
        vectors=vectors.reshape(count, dim).astype(np.float32),
        lsn=int(header["lsn"]),
    )


def newest_valid_snapshot(data_dir: Path) -> StoreState | None:
    """Returns the newest snapshot that reads back whole, falling back to older ones with a warning.

    None when there is none at all; SnapshotError (naming every file) when none is readable."""
    found = snapshots(data_dir)
    problems = []
    for _, path in found:
        try:
            state = read_snapshot(path)
        except SnapshotError as error:
            log.warning("%s; falling back to an older snapshot", error)
            problems.append(str(error))
            continue
        return state
    if problems:
        raise SnapshotError("no readable snapshot: " + "; ".join(problems))
    return None


def remove_older_snapshots(data_dir: Path, keep: int = 2) -> int | None:
    """Keeps the newest `keep` snapshots; returns the lsn of the oldest one kept."""
    found = snapshots(data_dir)
    for _, path in found[keep:]:
        path.unlink(missing_ok=True)
    return found[:keep][-1][0] if found else None
