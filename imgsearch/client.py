"""The Python API: clients for the encoder and the index services, and `ImageSearch`, which uses both.

The client is the only place that knows both services.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from imgsearch import convert, security, wire
from imgsearch.convert import (
    CollectionInfo,
    Embedding,
    IndexStats,
    Match,
    Reconstruction,
    ScanPage,
    SearchArrays,
    StoredItem,
)
from imgsearch.filters import Condition, filter_message
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
from imgsearch.wire import BAD_IMAGE_KEY, MetadataBatch

DEFAULT_ENCODER = "localhost:50051"
DEFAULT_INDEX = "localhost:50052"
DEFAULT_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# round_robin spreads calls over every address a target resolves to (scaled encoder replicas);
# a call that finds a replica gone (UNAVAILABLE) is retried, on another one where there is one.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "imgsearch.v1.Encoder"}, {"service": "imgsearch.v1.Index"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class ServiceError(Exception):
    """A call that failed; the message is one line that names the service, its address and the cause."""

    def __init__(self, service: str, address: str, code: grpc.StatusCode | None, details: str) -> None:
        self.service, self.address, self.code, self.details = service, address, code, details
        if code == grpc.StatusCode.UNAVAILABLE:
            text = f"the {service} service at {address} is not reachable ({details})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            text = f"the {service} service at {address} did not answer in time"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("refused for load"):
            text = f"the {service} service at {address} is busy ({details})"
        else:
            name = code.name if code else "?"
            text = f"the {service} service at {address} refused the call: {name}: {details}"
        super().__init__(text)


class ModelNotServed(ServiceError):
    """The encoder serves no model of the name a collection is filled by."""

    def __init__(self, address: str, details: str, model: str) -> None:
        super().__init__("encoder", address, grpc.StatusCode.NOT_FOUND, details)
        self.model = model


class BadImage(ServiceError):
    """The encoder could not use one image of a batch; `position` says which."""

    def __init__(self, address: str, details: str, position: int) -> None:
        super().__init__("encoder", address, grpc.StatusCode.INVALID_ARGUMENT, details)
        self.position = position


def channel_target(address: str) -> str:
    """Returns a gRPC target: a comma list of host:port becomes one `ipv4:`/`ipv6:` target with every
    address, so round_robin spreads calls over them; anything else (host:port, dns:///...) is kept."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        return address.strip()
    resolved = []
    for part in parts:
        host, _, port = part.rpartition(":")
        host = host.strip("[]")
        for family, *_, sockaddr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            ip = sockaddr[0]
            resolved.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            break
    scheme = "ipv6" if all(r.startswith("[") for r in resolved) else "ipv4"
    if scheme == "ipv4" and any(r.startswith("[") for r in resolved):
        raise ValueError(f"cannot mix IPv4 and IPv6 addresses in one target: {address}")
    return f"{scheme}:" + ",".join(resolved)


def open_channel(address: str, tls_ca: security.PathLike | None = None) -> grpc.Channel:
    """Returns a channel with round_robin, retries on UNAVAILABLE and large message limits; TLS that
    trusts the CA file `tls_ca` when given, else plaintext."""
    return security.open_channel(
        channel_target(address),
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
        tls_ca=tls_ca,
    )


class _Stall:
    """Cancels a streaming call when its next message is awaited for longer than timeout_s.

    A deadline on the whole stream would cut a scan of a big index short however healthy it is;
    this applies the per-call timeout to each message instead. The clock runs only while the
    caller waits for the next message, not while it works on the last one."""

    def __init__(self, call: grpc.RpcContext, timeout_s: float) -> None:
        self._call = call
        self._timeout_s = timeout_s
        self._deadline: float | None = None  # None while the caller holds a message
        self._done = False
        self.fired = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="imgsearch-stream-stall", daemon=True)
        self._thread.start()

    def waiting(self) -> None:
        with self._condition:
            self._deadline = time.monotonic() + self._timeout_s
            self._condition.notify()

    def received(self) -> None:
        with self._condition:
            self._deadline = None

    def close(self) -> None:
        with self._condition:
            self._done = True
            self._condition.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._condition:
            while not self._done:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self.fired = True
                    self._call.cancel()
                    return
                self._condition.wait(remaining)


class _Client:
    service = ""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(address, tls_ca)
        self._metadata = security.call_metadata(token)  # sent on every call

    def close(self) -> None:
        self.channel.close()

    @contextmanager
    def _call(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as error:
            raise ServiceError(self.service, self.address, error.code(), error.details() or "") from None


class EncoderClient(_Client):
    """Calls the encoder service: images (encoded bytes, or uint8 arrays of the model's input size) to
    vectors, by the model `model` names (a call's `model` argument overrides it; "" is the encoder's
    default model)."""

    service = "encoder"

    def __init__(
        self,
        address: str = DEFAULT_ENCODER,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
        model: str = "",
    ) -> None:
        super().__init__(address, timeout_s, tls_ca=tls_ca, token=token)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)
        self.model = model

    def embed(
        self, images: Sequence[bytes | np.ndarray], model: str | None = None, *, novelty: bool = True
    ) -> Embedding:
        """Returns one vector per image, and each image's novelty where the model gives it (`novelty`
        False: the encoder skips it, a third faster); raises BadImage naming the first image it could not
        use, and ModelNotServed when the encoder serves no model of that name."""
        chosen = self.model if model is None else model
        request = convert.embed_request(images, chosen, novelty)
        try:
            reply = self.stub.Embed(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._image_call_error(error, chosen) from None
        return convert.embedding_of(reply, len(images))

    def reconstruct(
        self, images: Sequence[bytes | np.ndarray], model: str | None = None
    ) -> list[Reconstruction]:
        """For each image, the model's input (the preprocessed image) and the autoencoder's reconstruction
        of it, both uint8 at the model's input size. Raises BadImage naming the first image the encoder
        could not use, ModelNotServed, and ServiceError otherwise (FAILED_PRECONDITION: the model has no
        decoder)."""
        chosen = self.model if model is None else model
        request = encoder_pb2.ReconstructRequest(model=chosen)
        convert.add_images(request, images)
        try:
            reply = self.stub.Reconstruct(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._image_call_error(error, chosen) from None
        if len(reply.items) != len(images):
            raise ServiceError(
                self.service,
                self.address,
                None,
                f"the reply holds {len(reply.items)} reconstructions for {len(images)} images",
            )
        return convert.reconstructions_of(reply)

    def _image_call_error(self, error: grpc.RpcError, model: str) -> ServiceError:
        """BadImage for a call refused for one of its images (its position in the trailing metadata),
        ModelNotServed for a model the encoder does not serve."""
        trailing: dict[str, Any] = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined,arg-type]
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT and BAD_IMAGE_KEY in trailing:
            return BadImage(self.address, error.details() or "", int(trailing[BAD_IMAGE_KEY]))
        if error.code() == grpc.StatusCode.NOT_FOUND and model:
            return ModelNotServed(self.address, error.details() or "", model)
        return ServiceError(self.service, self.address, error.code(), error.details() or "")

    def info(self) -> dict[str, Any]:
        with self._call():
            reply = self.stub.Info(encoder_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return convert.info_of(reply)


class IndexClient(_Client):
    """Calls the index service. Data calls go to the collection (or alias) `collection` names, "" for
    `default`; a call's `collection` argument overrides it."""

    service = "index"

    def __init__(
        self,
        address: str = DEFAULT_INDEX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
        collection: str = "",
    ) -> None:
        super().__init__(address, timeout_s, tls_ca=tls_ca, token=token)
        self.stub = index_pb2_grpc.IndexStub(self.channel)
        self.collection = collection

    def _in(self, collection: str | None) -> str:
        return self.collection if collection is None else collection

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: MetadataBatch = (),
        model_version: str = "",
        *,
        model_name: str = "",
        collection: str | None = None,
    ) -> int:
        """Stores or replaces the batch; returns the count stored after it."""
        request = convert.upsert_request(
            ids, vectors, metadata, model_version, model_name, self._in(collection)
        )
        with self._call():
            return int(self.stub.Upsert(request, timeout=self.timeout_s, metadata=self._metadata).count)

    def delete(self, ids: Sequence[str], *, collection: str | None = None) -> tuple[int, int]:
        """Returns (deleted, missing)."""
        with self._call():
            reply = self.stub.Delete(
                index_pb2.DeleteRequest(ids=list(ids), collection=self._in(collection)),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return reply.deleted, reply.missing

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, *, collection: str | None = None
    ) -> tuple[list[StoredItem], list[str]]:
        """Returns (the stored items found, the ids missing)."""
        with self._call():
            reply = self.stub.Get(
                index_pb2.GetRequest(
                    ids=list(ids), with_vectors=with_vectors, collection=self._in(collection)
                ),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return convert.items_of(reply, with_vectors)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        model_version: str = "",
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """The k nearest stored items of each query among those that match `filter` (exactly, at every
        selectivity), none farther than `max_distance`."""
        reply = self._search(queries, k, model_version, collection, filter, max_distance)
        return self._read(convert.matches_of, reply)

    def search_arrays(
        self,
        queries: np.ndarray,
        k: int = 10,
        model_version: str = "",
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> SearchArrays:
        """`search`'s answer as arrays (flat ids, float32 distances, each match's metadata decoded when
        read), for callers of many queries at once: no object is made per match but its id."""
        reply = self._search(queries, k, model_version, collection, filter, max_distance)
        return self._read(convert.search_arrays_of, reply)

    def search_by_id(
        self,
        ids: Sequence[str],
        k: int = 10,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        reply = self._search_by_id(ids, k, collection, filter, max_distance)
        return self._read(convert.matches_of, reply)

    def search_by_id_arrays(
        self,
        ids: Sequence[str],
        k: int = 10,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> SearchArrays:
        """`search_by_id`'s answer as arrays, as `search_arrays` gives them."""
        reply = self._search_by_id(ids, k, collection, filter, max_distance)
        return self._read(convert.search_arrays_of, reply)

    # Searches ask for the columnar reply (index.proto, SearchResponse): a few bytes a match, read without
    # a protobuf message per match. A server that predates it sends Match messages, which are read too.

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        model_version: str,
        collection: str | None,
        filter: Sequence[Condition],
        max_distance: float | None,
    ) -> index_pb2.SearchResponse:
        request = index_pb2.SearchRequest(
            queries=wire.pack(queries),
            k=k,
            model_version=model_version,
            collection=self._in(collection),
            filter=filter_message(filter),
            max_distance=max_distance,
            columnar=True,
        )
        with self._call():
            return self.stub.Search(request, timeout=self.timeout_s, metadata=self._metadata)

    def _search_by_id(
        self,
        ids: Sequence[str],
        k: int,
        collection: str | None,
        filter: Sequence[Condition],
        max_distance: float | None,
    ) -> index_pb2.SearchResponse:
        request = index_pb2.SearchByIdRequest(
            ids=list(ids),
            k=k,
            collection=self._in(collection),
            filter=filter_message(filter),
            max_distance=max_distance,
            columnar=True,
        )
        with self._call():
            return self.stub.SearchById(request, timeout=self.timeout_s, metadata=self._metadata)

    def _read(self, read: Callable[[index_pb2.SearchResponse], T], reply: index_pb2.SearchResponse) -> T:
        """The reply read by `read`; a malformed one is a ServiceError naming this service."""
        try:
            return read(reply)
        except ValueError as error:
            raise ServiceError(
                self.service, self.address, None, f"a malformed search reply: {error}"
            ) from None

    def stats(self, *, collection: str | None = None) -> IndexStats:
        with self._call():
            reply = self.stub.Stats(
                index_pb2.StatsRequest(collection=self._in(collection)),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return convert.stats_of(reply)

    def scan(
        self,
        page_size: int = 0,
        with_vectors: bool = False,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
    ) -> Iterator[ScanPage]:
        """Yields every stored item once, page by page, as the index was when the scan began.

        page_size 0 lets the server choose (1000, or its --max-batch when lower). The stream has no
        overall deadline, since a big index takes as long as it takes: instead each page must arrive
        within timeout_s of being asked for (time spent on a page in between does not count). The
        server holds its copy of the index until the stream ends, so read on; leaving the loop early
        cancels the call."""
        if page_size < 0:
            raise ValueError(f"page_size must be 0 (the server's default) or positive, got {page_size}")
        request = index_pb2.ScanRequest(
            page_size=page_size,
            with_vectors=with_vectors,
            collection=self._in(collection),
            filter=filter_message(filter),
        )
        return self._scan(request)

    def _scan(self, request: index_pb2.ScanRequest) -> Iterator[ScanPage]:
        call = self.stub.Scan(request, metadata=self._metadata)
        stall = _Stall(call, self.timeout_s)
        try:
            while True:
                stall.waiting()
                try:
                    reply = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""
                    if stall.fired:
                        code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "no scan page in time"
                    raise ServiceError(self.service, self.address, code, details) from None
                stall.received()
                yield convert.page_of(reply, request.with_vectors)
        finally:
            call.cancel()  # a no-op once the stream has ended; frees the server's copy when left early
            stall.close()

    def duplicates(
        self,
        max_distance: float,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        timeout_s: float | None = None,
    ) -> Duplicates:
        """The groups of stored items (those matching `filter`) within max_distance of each other: one
        batched range search in the index service. It may take a while on a large collection: the call's
        deadline is timeout_s (default: this client's, at least 10 minutes)."""
        request = index_pb2.DuplicatesRequest(
            collection=self._in(collection), max_distance=max_distance, filter=filter_message(filter)
        )
        found = Duplicates([], 0, 0)
        with self._call():
            for page in self.stub.Duplicates(
                request, timeout=timeout_s or max(self.timeout_s, 600.0), metadata=self._metadata
            ):
                found.items, found.pairs = page.items, page.pairs
                found.groups += [(list(group.ids), float(group.max_distance)) for group in page.groups]
        return found

    # ---- collections and aliases ---------------------------------------------------------------

    def create_collection(self, name: str, model_name: str = "") -> CollectionInfo:
        """A new, empty collection for the model named ("" for the encoder's default)."""
        with self._call():
            reply = self.stub.CreateCollection(
                index_pb2.CreateCollectionRequest(name=name, model_name=model_name),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return convert.collection_of(reply.collection)

    def list_collections(self) -> list[CollectionInfo]:
        with self._call():
            reply = self.stub.ListCollections(
                index_pb2.ListCollectionsRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        return [convert.collection_of(c) for c in reply.collections]

    def drop_collection(self, name: str) -> int:
        """Removes the collection and its items; returns how many it held."""
        with self._call():
            reply = self.stub.DropCollection(
                index_pb2.DropCollectionRequest(name=name), timeout=self.timeout_s, metadata=self._metadata
            )
        return int(reply.dropped)

    def set_alias(self, alias: str, collection: str) -> str:
        """Points the alias at the collection (atomically); returns where it pointed before ("" if new)."""
        with self._call():
            reply = self.stub.SetAlias(
                index_pb2.SetAliasRequest(alias=alias, collection=collection),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return str(reply.previous)

    def drop_alias(self, alias: str) -> str:
        """Removes the alias; returns the collection it pointed at."""
        with self._call():
            reply = self.stub.DropAlias(
                index_pb2.DropAliasRequest(alias=alias), timeout=self.timeout_s, metadata=self._metadata
            )
        return str(reply.collection)

    def list_aliases(self) -> dict[str, str]:
        with self._call():
            reply = self.stub.ListAliases(
                index_pb2.ListAliasesRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        return {a.alias: a.collection for a in reply.aliases}


@dataclass
class Duplicates:
    """What `IndexClient.duplicates` found."""

    groups: list[tuple[list[str], float]]  # ids (sorted) and the largest linked distance, largest first
    items: int  # the items compared (those that matched the filter)
    pairs: int  # the linked pairs


@dataclass(frozen=True)
class Target:
    """Where image calls go: a collection (an alias resolved) and the encoder model that fills it."""

    collection: str
    model: str  # "" while the collection has no model yet: the encoder's default


T = TypeVar("T")


class ImageSearch:
    """Similar-image search through both services: embed with the encoder, store and search in the index.

    Image calls go to a collection (`collection`, else IMGSEARCH_COLLECTION, else `default`; an alias is
    accepted) and are embedded by the model that collection is filled by, so a collection of clothes is
    searched with the clothes model: the model of each name is looked up once and remembered, and looked
    up again when the index says the collection (an alias moved) now holds another model's vectors. Each
    call is one index call, so an alias moved meanwhile never mixes two collections.

    Each argument left out comes from its env var (IMGSEARCH_ENCODER, IMGSEARCH_INDEX, IMGSEARCH_TLS_CA,
    IMGSEARCH_TOKEN, IMGSEARCH_COLLECTION), as in the CLI; `tls_ca` turns on TLS, `token` is sent on every
    call."""

    def __init__(
        self,
        encoder: str | None = None,
        index: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
        collection: str | None = None,
    ) -> None:
        tls_ca = tls_ca or os.environ.get("IMGSEARCH_TLS_CA") or None
        token = token or os.environ.get("IMGSEARCH_TOKEN") or None
        self.collection = collection or os.environ.get("IMGSEARCH_COLLECTION") or "default"
        self.pinned: Target | None = None  # set by pin()
        self._models: dict[str, str] = {}  # collection or alias -> the model that fills it, as last seen
        self.encoder = EncoderClient(
            encoder or os.environ.get("IMGSEARCH_ENCODER") or DEFAULT_ENCODER,
            timeout_s,
            tls_ca=tls_ca,
            token=token,
        )
        try:
            self.index = IndexClient(
                index or os.environ.get("IMGSEARCH_INDEX") or DEFAULT_INDEX,
                timeout_s,
                tls_ca=tls_ca,
                token=token,
                collection=self.collection,
            )
        except BaseException:
            self.encoder.close()
            raise

    def close(self) -> None:
        self.encoder.close()
        self.index.close()

    def __enter__(self) -> ImageSearch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def target(self, collection: str | None = None) -> Target:
        """The collection a name (default: this client's) stands for, and the model that fills it."""
        stats = self.index.stats(collection=collection or self.collection)
        return Target(stats.collection or collection or self.collection, stats.model_name)

    def pin(self, collection: str | None = None) -> Target:
        """Resolves the collection once and sends every later call of `index` and `encoder` to it and its
        model: for a command of many calls (an ingest, an evaluation) that must not straddle an alias
        move."""
        found = self.target(collection)
        self.collection = self.index.collection = found.collection
        self.encoder.model = found.model
        self.pinned = found
        return found

    def embed(
        self, images: Sequence[bytes | np.ndarray], target: Target, *, novelty: bool = True
    ) -> Embedding:
        """The images embedded by the target's model; a model the encoder does not serve is named.
        `novelty` False skips the decoder (a call that only stores or searches the vectors)."""
        try:
            return self.encoder.embed(images, target.model, novelty=novelty)
        except ModelNotServed as error:
            raise self.not_served(error, target) from None

    def not_served(self, error: ModelNotServed, target: Target | None = None) -> ModelNotServed:
        """The encoder's refusal of a model, said of the collection that needs it (the pinned one unless
        given)."""
        target = target or self.pinned
        if target is None:
            return error
        return ModelNotServed(
            error.address,
            f"the collection {target.collection!r} is filled by the model {target.model!r}, which the "
            f"encoder does not serve ({error.details}); start the encoder with that model in --models "
            "(IMGSEARCH_MODELS)",
            target.model,
        )

    def _resolved(self, collection: str | None, call: Callable[[Target], T]) -> T:
        """Runs an image call on a collection (or alias), embedded by the model that fills it.

        The model of each name is looked up once (a Stats call) and remembered, and the call names the
        collection or alias and carries the model version: the index resolves an alias in the call, so an
        alias moved to a collection of the same model is followed at once, at no extra cost. When the alias
        has moved to a collection of another model, the index refuses the call (FAILED_PRECONDITION): then
        the alias is resolved (its collection and model) and the call made again on that collection itself,
        which no later move can change. A collection dropped between that lookup and the call (an alias
        moved, then its old collection dropped) gets one more lookup."""
        name = collection or self.collection
        model = self._models.get(name)
        if model is not None:
            try:
                return call(Target(name, model))
            except ServiceError as error:
                if error.service != "index" or error.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        for attempt in range(2):
            target = self.target(name)
            self._models[name] = target.model
            try:
                return call(target)
            except ServiceError as error:
                if attempt or error.service != "index" or error.code != grpc.StatusCode.NOT_FOUND:
                    raise
        raise AssertionError("unreachable")

    def add(
        self,
        ids: Sequence[str],
        images: Sequence[bytes | np.ndarray],
        metadata: Sequence[Mapping[str, str]] = (),
        *,
        collection: str | None = None,
    ) -> int:
        """Embeds and stores the images under the ids; returns the count stored after it."""

        def add(target: Target) -> int:
            embedding = self.embed(images, target, novelty=False)
            return self.index.upsert(
                ids,
                embedding.vectors,
                metadata,
                embedding.model_version,
                model_name=embedding.model,
                collection=target.collection,
            )

        return self._resolved(collection, add)

    def search(
        self,
        images: Sequence[bytes | np.ndarray],
        k: int = 10,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        """Returns the k most similar stored images of each query image, nearest first, among those that
        match `filter`, none farther than `max_distance`."""

        def search(target: Target) -> list[list[Match]]:
            embedding = self.embed(images, target, novelty=False)
            return self.index.search(
                embedding.vectors,
                k,
                embedding.model_version,
                collection=target.collection,
                filter=filter,
                max_distance=max_distance,
            )

        return self._resolved(collection, search)

    def search_by_id(
        self,
        ids: Sequence[str],
        k: int = 10,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
        max_distance: float | None = None,
    ) -> list[list[Match]]:
        return self.index.search_by_id(
            ids, k, collection=collection or self.collection, filter=filter, max_distance=max_distance
        )
