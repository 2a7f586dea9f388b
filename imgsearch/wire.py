"""The wire format the client and both services share: float32 vector batches packed into
`imgsearch.v1.Vectors` (little-endian, row-major), and the metadata keys calls carry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from imgsearch.v1 import vectors_pb2

WIRE_DTYPE = np.dtype("<f4")
MetadataBatch = Sequence[Mapping[str, str]]  # one map of string keys and values per item of a batch

# Metadata keys (gRPC keys are lowercase).
REQUEST_ID_KEY = "x-request-id"  # in and out: the caller's request id, echoed in the trailing metadata
BAD_IMAGE_KEY = "imgsearch-bad-image"  # trailing metadata of Embed: the position of the image that failed


def pack(vectors: np.ndarray) -> vectors_pb2.Vectors:
    """Returns the message for a [count, dim] array (little-endian float32, row-major)."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array [count, dim], got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return vectors_pb2.Vectors(dim=array.shape[1], data=array.tobytes())


def unpack(message: vectors_pb2.Vectors, *, expected_count: int | None = None) -> np.ndarray:
    """Returns a read-only [count, dim] float32 view of the message's bytes.

    Raises ValueError with a message that says what is wrong with the shape."""
    dim = message.dim
    data = message.data
    if dim == 0:
        if data:
            raise ValueError("vectors.dim is 0 but vectors.data is not empty")
        count = 0
    else:
        row_bytes = dim * WIRE_DTYPE.itemsize
        if len(data) % row_bytes:
            raise ValueError(
                f"vectors.data has {len(data)} bytes, not a multiple of dim {dim} x 4 bytes (float32)"
            )
        count = len(data) // row_bytes
    if expected_count is not None and count != expected_count:
        raise ValueError(f"expected {expected_count} vectors, got {count}")
    return np.frombuffer(data, dtype=WIRE_DTYPE).reshape(count, dim)
