"""Snapshots of the store on disk: one file, written atomically, checked when read.

Layout: magic (8 bytes) | header length (uint64 LE) | header (UTF-8 JSON: dim, model version,
ids, metadata) | vectors (count x dim float32 LE) | CRC-32 of everything before it (uint32 LE).
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

log = logging.getLogger(__name__)

MAGIC = b"IMGSNAP1"
SNAPSHOT_NAME = "snapshot.bin"


class SnapshotError(Exception):
    """A snapshot file that cannot be read; the message names the file and the problem."""


def write_snapshot(state: StoreState, data_dir: Path) -> Path:
    """Writes the state to data_dir/snapshot.bin via a temporary file, fsync and rename; returns the path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    header = json.dumps(
        {
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
    path = data_dir / SNAPSHOT_NAME
    temporary = data_dir / (SNAPSHOT_NAME + ".tmp")
    with open(temporary, "wb") as file:
        file.write(body)
        file.write(struct.pack("<I", zlib.crc32(body)))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_dir(data_dir)
    return path


def read_snapshot(data_dir: Path) -> StoreState | None:
    """Returns the state in data_dir/snapshot.bin, None when there is none; SnapshotError when damaged."""
    path = data_dir / SNAPSHOT_NAME
    if not path.exists():
        return None
    raw = path.read_bytes()
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
    )


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
