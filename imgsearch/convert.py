"""The client's side of the wire: the values it hands its callers (matches, embeddings, stats, scan
pages...) and their conversions from and to the services' protobuf messages, in one place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgsearch import wire
from imgsearch.v1 import encoder_pb2, index_pb2
from imgsearch.wire import MetadataBatch


@dataclass(frozen=True)
class Match:
    id: str
    distance: float
    metadata: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "distance": self.distance, "metadata": self.metadata}


@dataclass(frozen=True)
class Embedding:
    vectors: np.ndarray  # float32 [count, dim]
    model_version: str
    replica: str = ""  # the encoder replica that made them
    model: str = ""  # the name of the encoder's model that made them
    # One per image: how unlike the model's training data it looks (above 1: unlike it; see
    # encoder_service/novelty.py); None when the encoder gives none (no decoder or threshold, skipped).
    novelty: list[float] | None = None


@dataclass(frozen=True)
class Reconstruction:
    """One image as the encoder's model sees it (`EncoderClient.reconstruct`): both uint8 [28, 28],
    0 = background, 255 = ink (MNIST's convention)."""

    input: np.ndarray  # the preprocessed image, the model's input
    output: np.ndarray  # the autoencoder's reconstruction of it from its embedding


@dataclass(frozen=True)
class IndexStats:
    count: int
    dim: int
    model_version: str
    bytes_used: int
    collection: str = ""  # the collection answered for (an alias resolved)
    model_name: str = ""  # the encoder model that fills it; "" until known (the encoder's default)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    count: int
    dim: int
    model_name: str
    model_version: str
    bytes_used: int
    aliases: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StoredItem:
    id: str
    metadata: dict[str, str]
    vector: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ScanPage:
    """One page of `IndexClient.scan`: items in the order the index keeps them."""

    ids: list[str]
    metadata: list[dict[str, str]]
    vectors: np.ndarray | None  # float32 [len(ids), dim] when scanned with_vectors, else None
    total: int  # items in the whole scan
    model_version: str  # the index's when the scan began


def embed_request(
    images: Sequence[bytes | np.ndarray], model: str = "", novelty: bool = True
) -> encoder_pb2.EmbedRequest:
    """The request, each image added in place (half the time of building Image messages to copy in);
    `novelty` False asks the encoder to skip it."""
    request = encoder_pb2.EmbedRequest(model=model, skip_novelty=not novelty)
    add_images(request, images)
    return request


def add_images(
    request: encoder_pb2.EmbedRequest | encoder_pb2.ReconstructRequest, images: Sequence[bytes | np.ndarray]
) -> None:
    """Adds each image to the request's `images` (Embed and Reconstruct take the same field)."""
    add = request.images.add
    for image in images:
        if isinstance(image, bytes):
            add(encoded=image)
        elif isinstance(image, bytearray | memoryview):
            add(encoded=bytes(image))
        else:
            pixels = np.ascontiguousarray(image, dtype=np.uint8)
            if pixels.ndim not in (2, 3):
                raise ValueError(
                    f"raw pixels must be a uint8 array [height, width] or [height, width, channels], got "
                    f"shape {pixels.shape}"
                )
            raw = encoder_pb2.RawPixels(
                height=pixels.shape[0],
                width=pixels.shape[1],
                channels=pixels.shape[2] if pixels.ndim == 3 else 1,
                pixels=pixels.tobytes(),
            )
            add(raw=raw)


def pixels_of(raw: encoder_pb2.RawPixels) -> np.ndarray:
    """RawPixels as a uint8 [height, width] array, or [height, width, channels] for colour (a copy the
    caller may write to)."""
    channels = raw.channels or 1
    if len(raw.pixels) != raw.height * raw.width * channels:
        raise ValueError(f"{len(raw.pixels)} bytes of pixels for {raw.height}x{raw.width}x{channels}")
    shape = (raw.height, raw.width) if channels == 1 else (raw.height, raw.width, channels)
    return np.frombuffer(raw.pixels, dtype=np.uint8).reshape(shape).copy()


def matches_of(reply: index_pb2.SearchResponse) -> list[list[Match]]:
    return [[Match(m.id, float(m.distance), dict(m.metadata)) for m in row.matches] for row in reply.results]


def embedding_of(reply: encoder_pb2.EmbedResponse, count: int) -> Embedding:
    """The reply's vectors (ValueError unless `count` rows) and its novelty (None unless one per image)."""
    novelty = [float(value) for value in reply.novelty] if len(reply.novelty) == count else None
    return Embedding(
        wire.unpack(reply.vectors, expected_count=count),
        reply.model_version,
        reply.replica,
        reply.model,
        novelty,
    )


def reconstructions_of(reply: encoder_pb2.ReconstructResponse) -> list[Reconstruction]:
    return [Reconstruction(pixels_of(item.input), pixels_of(item.reconstruction)) for item in reply.items]


def info_of(reply: encoder_pb2.InfoResponse) -> dict[str, Any]:
    return {
        "model_version": reply.model_version,
        "dim": reply.dim,
        "input_shape": list(reply.input_shape),
        "runtime": reply.runtime,
        "card": json.loads(reply.card_json) if reply.card_json else {},
        "images_embedded": reply.images_embedded,
        "calls_abandoned": reply.calls_abandoned,
        "replica": reply.replica,
        "models": [
            {
                "name": model.name,
                "model_version": model.model_version,
                "dim": model.dim,
                "input_shape": list(model.input_shape),
                "runtime": model.runtime,
                "default": model.is_default,
                "card": json.loads(model.card_json) if model.card_json else {},
            }
            for model in reply.models
        ],
    }


def upsert_request(
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: MetadataBatch,
    model_version: str,
    model_name: str = "",
    collection: str = "",
) -> index_pb2.UpsertRequest:
    return index_pb2.UpsertRequest(
        ids=list(ids),
        vectors=wire.pack(vectors),
        metadata=[index_pb2.Metadata(entries=m) for m in metadata],
        model_version=model_version,
        model_name=model_name,
        collection=collection,
    )


def items_of(reply: index_pb2.GetResponse, with_vectors: bool) -> tuple[list[StoredItem], list[str]]:
    """(the stored items found, the ids missing)."""
    vectors = wire.unpack(reply.vectors) if with_vectors else None
    items = [
        StoredItem(item.id, dict(item.metadata), None if vectors is None else vectors[n])
        for n, item in enumerate(reply.items)
    ]
    return items, list(reply.missing_ids)


def stats_of(reply: index_pb2.StatsResponse) -> IndexStats:
    return IndexStats(
        reply.count, reply.dim, reply.model_version, reply.bytes_used, reply.collection, reply.model_name
    )


def collection_of(reply: index_pb2.Collection) -> CollectionInfo:
    return CollectionInfo(
        reply.name,
        reply.count,
        reply.dim,
        reply.model_name,
        reply.model_version,
        reply.bytes_used,
        list(reply.aliases),
    )


def page_of(reply: index_pb2.ScanResponse, with_vectors: bool) -> ScanPage:
    count = len(reply.items)
    return ScanPage(
        [item.id for item in reply.items],
        [dict(item.metadata) for item in reply.items],
        wire.unpack(reply.vectors, expected_count=count) if with_vectors else None,
        reply.total,
        reply.model_version,
    )
