"""The client's side of the wire: the values it hands its callers (matches, embeddings, stats, scan
pages...) and their conversions from and to the services' protobuf messages, in one place."""

from __future__ import annotations

import gc
import itertools
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

from imgsearch import wire
from imgsearch.v1 import encoder_pb2, index_pb2
from imgsearch.wire import MetadataBatch


@dataclass(frozen=True, slots=True)
class Match:
    id: str
    distance: float
    metadata: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "distance": self.distance, "metadata": self.metadata}


# A Match made by setting its slots directly: what Match(...) makes, in half the time (a frozen dataclass's
# __init__ goes through object.__setattr__ for each field), for the 10,000 of a batch. Slots, not a
# __dict__, also make a Match one object for the garbage collector to track, not two: with 10,000 made at
# once that halves the collections they set off (with them, 16 ms a batch of 10,000 here before, 5 after).
assert [f.name for f in fields(Match)] == ["id", "distance", "metadata"]
_new = object.__new__
_set_id = vars(Match)["id"].__set__  # its slot's descriptor
_set_distance = vars(Match)["distance"].__set__  # its slot's descriptor
_set_metadata = vars(Match)["metadata"].__set__  # its slot's descriptor


@dataclass(frozen=True, eq=False)
class SearchArrays:
    """A search's matches as arrays (`IndexClient.search_arrays`), for callers of many queries at once:
    nothing is made per match but its id until asked for, and each match's metadata is decoded only
    when read. The matches are numbered query after query, each query's nearest first: query q's are
    `offsets[q]` to `offsets[q + 1]`."""

    counts: np.ndarray  # int64 [queries]: each query's number of matches (0 to k)
    ids: list[str]  # [matches]
    distances: np.ndarray  # float32 [matches]: Euclidean (not squared)
    # Every match's metadata as compact JSON, concatenated, and where each ends (int64 [matches]); both
    # empty when no match has any. Read through `match_metadata` and the rest.
    metadata_json: bytes = field(default=b"", repr=False)
    metadata_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def __len__(self) -> int:
        """The number of queries."""
        return len(self.counts)

    @cached_property
    def offsets(self) -> np.ndarray:
        """int64 [queries + 1]: where each query's matches start in the flat arrays, then their total."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def query_ids(self, query: int) -> list[str]:
        start, stop = self._bounds(query)
        return self.ids[start:stop]

    def query_distances(self, query: int) -> np.ndarray:
        start, stop = self._bounds(query)
        return self.distances[start:stop]

    def match_metadata(self, match: int) -> dict[str, str]:
        """The metadata of match number `match` (in the flat arrays), decoded now."""
        if not 0 <= match < len(self.ids):
            raise IndexError(f"match {match} of {len(self.ids)}")
        if not len(self.metadata_ends):
            return {}
        stop = int(self.metadata_ends[match])
        start = int(self.metadata_ends[match - 1]) if match > 0 else 0
        return _metadata(self.metadata_json[start:stop]) if stop > start else {}

    def query_matches(self, query: int) -> list[Match]:
        start, stop = self._bounds(query)
        return self._matches(start, stop)

    def matches(self) -> list[list[Match]]:
        """One list of Matches per query (what `IndexClient.search` returns)."""
        flat = self._matches(0, len(self.ids))
        bounds = self.offsets.tolist()
        return [flat[start:stop] for start, stop in itertools.pairwise(bounds)]

    def _bounds(self, query: int) -> tuple[int, int]:
        if not -len(self.counts) <= query < len(self.counts):
            raise IndexError(f"query {query} of {len(self.counts)}")
        query %= len(self.counts)
        return int(self.offsets[query]), int(self.offsets[query + 1])

    def _matches(self, start: int, stop: int) -> list[Match]:
        with _collector_paused():
            return self._made(start, stop)

    def _made(self, start: int, stop: int) -> list[Match]:
        if len(self.metadata_ends):
            bounds = [
                int(self.metadata_ends[start - 1]) if start else 0,
                *self.metadata_ends[start:stop].tolist(),
            ]
            data = self.metadata_json
            metadata = [_metadata(data[a:b]) if b > a else {} for a, b in itertools.pairwise(bounds)]
        else:
            metadata = [{} for _ in range(stop - start)]
        made: list[Match] = []
        add = made.append
        for item_id, distance, entries in zip(
            self.ids[start:stop], self.distances[start:stop].tolist(), metadata, strict=True
        ):
            match = _new(Match)
            _set_id(match, item_id)
            _set_distance(match, distance)
            _set_metadata(match, entries)
            add(match)
        return made


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Holds off Python's cyclic garbage collector while a batch's Matches are made (and enables it again
    only if it was enabled). Every 700 objects made it would otherwise look at the young ones, all alive,
    and move them on to the oldest generation, whose full collections (every few batches, ~25 ms each in a
    client of 50,000 objects) then go through all of them: 5.7 ms a batch of 10,000 on average, more than
    making them. Nothing made here is garbage, nor part of a cycle."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


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
    """One list of Matches per query, from either form of the reply (ValueError when it is malformed)."""
    if not reply.counts:  # the Match messages: a server that predates the columnar form
        return [
            [Match(m.id, float(m.distance), dict(m.metadata)) for m in row.matches] for row in reply.results
        ]
    return search_arrays_of(reply).matches()


def search_arrays_of(reply: index_pb2.SearchResponse) -> SearchArrays:
    """The reply's matches as arrays, from either form (index.proto, SearchResponse); ValueError when the
    columnar form's arrays do not agree with each other."""
    if not reply.counts:
        rows = [row.matches for row in reply.results]
        flat = [match for row in rows for match in row]
        encoded = [_metadata_json(match.metadata) for match in flat]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        return SearchArrays(
            np.fromiter(map(len, rows), np.int64, len(rows)),
            [match.id for match in flat],
            np.array([match.distance for match in flat], np.float32),
            b"".join(encoded) if lengths.any() else b"",
            np.cumsum(lengths) if lengths.any() else np.zeros(0, np.int64),
        )
    counts = _uint32s(reply.counts, "counts")
    total = int(counts.sum())
    id_ends = _uint32s(reply.id_ends, "id_ends")
    if len(id_ends) != total or len(reply.distances) != 4 * total:
        raise ValueError(
            f"the reply counts {total} matches, with {len(id_ends)} id ends and "
            f"{len(reply.distances) / 4:g} distances"
        )
    metadata_ends = _uint32s(reply.metadata_ends, "metadata_ends")
    if len(metadata_ends) not in (0, total) or (not len(metadata_ends) and reply.metadata):
        raise ValueError(f"the reply counts {total} matches, with {len(metadata_ends)} metadata ends")
    _check_ends(metadata_ends, len(reply.metadata), "metadata")
    return SearchArrays(
        counts,
        split_utf8(reply.ids, id_ends),
        np.frombuffer(reply.distances, "<f4").astype(np.float32),
        reply.metadata,
        metadata_ends,
    )


def split_utf8(data: bytes, ends: np.ndarray) -> list[str]:
    """The strings of UTF-8 `data` cut at the byte offsets `ends` (each one past a string's last byte, the
    last one len(data)): decoded at once, then cut by characters. ValueError when an end is out of order
    or inside a character, or the data is not UTF-8."""
    _check_ends(ends, len(data), "ids")
    text = data.decode("utf-8")
    if len(text) != len(data):  # not all ASCII: byte offsets to character offsets
        leading = (np.frombuffer(data, np.uint8) & 0xC0) != 0x80  # each character's first byte
        inner = ends[ends < len(data)]
        if not leading[inner].all():
            raise ValueError("an id ends inside a UTF-8 character")
        ends = np.concatenate([[0], np.cumsum(leading)])[ends]
    bounds = [0, *ends.tolist()]
    return [text[start:stop] for start, stop in itertools.pairwise(bounds)]


def _uint32s(data: bytes, name: str) -> np.ndarray:
    if len(data) % 4:
        raise ValueError(f"the reply's {name} is {len(data)} bytes, not whole uint32s")
    return np.frombuffer(data, "<u4").astype(np.int64)


def _check_ends(ends: np.ndarray, size: int, name: str) -> None:
    """End offsets must rise (or stay: an empty entry) from 0 to exactly `size`."""
    if not len(ends):
        if size:
            raise ValueError(f"the reply's {name} has {size} bytes and no ends")
        return
    if int(ends[-1]) != size or int(ends[0]) < 0 or (len(ends) > 1 and bool((np.diff(ends) < 0).any())):
        raise ValueError(f"the reply's {name} ends do not rise from 0 to its {size} bytes")


def _metadata(encoded: bytes) -> dict[str, str]:
    entries = json.loads(encoded)
    if not isinstance(entries, dict):
        raise ValueError(f"a match's metadata is not a JSON object: {encoded[:80]!r}")
    return entries


def _metadata_json(entries: Any) -> bytes:
    """Metadata as the index keeps it: compact JSON (b"" when empty)."""
    return json.dumps(dict(entries), ensure_ascii=False, separators=(",", ":")).encode() if entries else b""


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
