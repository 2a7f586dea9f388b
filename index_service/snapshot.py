"""Snapshots of the index on disk: one file each, written atomically, checked when read.

A snapshot is `snapshot-<lsn>.bin`, holding every collection and alias after the log record `lsn`:
magic (8 bytes, IMGSNAP2) | header length (uint64 LE) | header (UTF-8 JSON: lsn, aliases, and per
collection its name, model name, dim, model version, count, ids, metadata) | each collection's vectors
in turn (count x dim float32 LE) | CRC-32 of everything before it (uint32 LE).

Versions before collections wrote IMGSNAP1, one collection (lsn, dim, model version, ids, metadata at
the header's top level): it reads as the collection `default`.
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

from index_service.store import DEFAULT_COLLECTION, CatalogState, StoreState
from index_service.wal import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"IMGSNAP2"
MAGIC_ONE_COLLECTION = b"IMGSNAP1"  # before collections
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


def write_snapshot(state: CatalogState, data_dir: Path) -> Path:
    """Writes the state via a temporary file, fsync, rename and a directory fsync; returns the path."""
    names = sorted(state.collections)
    header = json.dumps(
        {
            "lsn": state.lsn,
            "aliases": state.aliases,
            "collections": [
                {
                    "name": name,
                    "model_name": state.collections[name].model_name,
                    "dim": state.collections[name].dim,
                    "model_version": state.collections[name].model_version,
                    "count": len(state.collections[name].ids),
                    "ids": state.collections[name].ids,
                    "metadata": state.collections[name].metadata,
                }
                for name in names
            ],
            "created": time.time(),
        },
        ensure_ascii=False,
    ).encode("utf-8")
    path = snapshot_path(data_dir, state.lsn)
    temporary = path.with_suffix(".tmp")
    try:
        with open(temporary, "wb") as file:
            prefix = MAGIC + struct.pack("<Q", len(header)) + header
            crc = zlib.crc32(prefix)
            file.write(prefix)
            for name in names:  # one collection's vectors at a time: no copy of them all at once
                vectors = np.ascontiguousarray(state.collections[name].vectors, dtype="<f4").tobytes()
                crc = zlib.crc32(vectors, crc)
                file.write(vectors)
                del vectors
            file.write(struct.pack("<I", crc))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(data_dir)
    return path


def _vectors(path: Path, body: bytes, offset: int, count: int, dim: int) -> np.ndarray:
    size = count * dim * 4
    if offset + size > len(body):
        raise SnapshotError(f"{path} is damaged: too few bytes for {count} vectors of dim {dim}")
    return (
        np.frombuffer(body, dtype="<f4", count=count * dim, offset=offset)
        .reshape(count, dim)
        .astype(np.float32)
    )


def read_snapshot(path: Path) -> CatalogState:
    """Returns the state in a snapshot file; SnapshotError naming the file when it is damaged."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"{path} cannot be read: {error.strerror or error}") from error
    magic = raw[: len(MAGIC)]
    if len(raw) < len(MAGIC) + 12 or magic not in (MAGIC, MAGIC_ONE_COLLECTION):
        raise SnapshotError(f"{path} is not an imgsearch snapshot (bad magic or too short)")
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if zlib.crc32(body) != crc:
        raise SnapshotError(f"{path} is damaged: its checksum does not match")
    (header_length,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(body[start : start + header_length].decode("utf-8"))
    lsn = int(header["lsn"])
    offset = start + header_length
    if magic == MAGIC_ONE_COLLECTION:
        entries = [{**header, "name": DEFAULT_COLLECTION, "model_name": ""}]
        aliases: dict[str, str] = {}
    else:
        entries, aliases = header["collections"], dict(header["aliases"])
    collections = {}
    for entry in entries:
        dim, count = int(entry["dim"]), int(entry["count"])
        vectors = _vectors(path, body, offset, count, dim)
        offset += count * dim * 4
        collections[entry["name"]] = StoreState(
            dim=dim,
            model_version=entry["model_version"],
            ids=list(entry["ids"]),
            metadata=[dict(m) for m in entry["metadata"]],
            vectors=vectors,
            lsn=lsn,
            model_name=entry.get("model_name", ""),
        )
    if offset != len(body):
        raise SnapshotError(f"{path} is damaged: {len(body) - offset} bytes past the last vectors")
    return CatalogState(collections, aliases, lsn)


def newest_valid_snapshot(data_dir: Path) -> CatalogState | None:
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
