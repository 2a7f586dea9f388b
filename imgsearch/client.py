"""The Python API: clients for the encoder and the index services, and `ImageSearch`, which uses both.

The client is the only place that knows both services.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np

from imgsearch import convert, security, wire
from imgsearch.convert import Embedding, IndexStats, Match, Reconstruction, ScanPage, StoredItem
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
    """Calls the encoder service: images (encoded bytes or 28x28 uint8 arrays) to vectors."""

    service = "encoder"

    def __init__(
        self,
        address: str = DEFAULT_ENCODER,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(address, timeout_s, tls_ca=tls_ca, token=token)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)

    def embed(self, images: Sequence[bytes | np.ndarray]) -> Embedding:
        """Returns one vector per image; raises BadImage naming the first image it could not use."""
        request = convert.embed_request(images)
        try:
            reply = self.stub.Embed(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._image_call_error(error) from None
        return convert.embedding_of(reply, len(images))

    def reconstruct(self, images: Sequence[bytes | np.ndarray]) -> list[Reconstruction]:
        """For each image, the model's input (the preprocessed image) and the autoencoder's reconstruction
        of it, both uint8 [28, 28]. Raises BadImage naming the first image the encoder could not use, and
        ServiceError otherwise (FAILED_PRECONDITION: the served model has no decoder)."""
        request = encoder_pb2.ReconstructRequest()
        convert.add_images(request, images)
        try:
            reply = self.stub.Reconstruct(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._image_call_error(error) from None
        if len(reply.items) != len(images):
            raise ServiceError(
                self.service,
                self.address,
                None,
                f"the reply holds {len(reply.items)} reconstructions for {len(images)} images",
            )
        return convert.reconstructions_of(reply)

    def _image_call_error(self, error: grpc.RpcError) -> ServiceError:
        """BadImage for a call refused for one of its images (its position in the trailing metadata)."""
        trailing: dict[str, Any] = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined,arg-type]
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT and BAD_IMAGE_KEY in trailing:
            return BadImage(self.address, error.details() or "", int(trailing[BAD_IMAGE_KEY]))
        return ServiceError(self.service, self.address, error.code(), error.details() or "")

    def info(self) -> dict[str, Any]:
        with self._call():
            reply = self.stub.Info(encoder_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return convert.info_of(reply)


class IndexClient(_Client):
    """Calls the index service."""

    service = "index"

    def __init__(
        self,
        address: str = DEFAULT_INDEX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(address, timeout_s, tls_ca=tls_ca, token=token)
        self.stub = index_pb2_grpc.IndexStub(self.channel)

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, metadata: MetadataBatch = (), model_version: str = ""
    ) -> int:
        """Stores or replaces the batch; returns the count stored after it."""
        request = convert.upsert_request(ids, vectors, metadata, model_version)
        with self._call():
            return int(self.stub.Upsert(request, timeout=self.timeout_s, metadata=self._metadata).count)

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Returns (deleted, missing)."""
        with self._call():
            reply = self.stub.Delete(
                index_pb2.DeleteRequest(ids=list(ids)), timeout=self.timeout_s, metadata=self._metadata
            )
        return reply.deleted, reply.missing

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        """Returns (the stored items found, the ids missing)."""
        with self._call():
            reply = self.stub.Get(
                index_pb2.GetRequest(ids=list(ids), with_vectors=with_vectors),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        return convert.items_of(reply, with_vectors)

    def search(self, queries: np.ndarray, k: int = 10, model_version: str = "") -> list[list[Match]]:
        request = index_pb2.SearchRequest(queries=wire.pack(queries), k=k, model_version=model_version)
        with self._call():
            return convert.matches_of(
                self.stub.Search(request, timeout=self.timeout_s, metadata=self._metadata)
            )

    def search_by_id(self, ids: Sequence[str], k: int = 10) -> list[list[Match]]:
        with self._call():
            return convert.matches_of(
                self.stub.SearchById(
                    index_pb2.SearchByIdRequest(ids=list(ids), k=k),
                    timeout=self.timeout_s,
                    metadata=self._metadata,
                )
            )

    def stats(self) -> IndexStats:
        with self._call():
            reply = self.stub.Stats(index_pb2.StatsRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return convert.stats_of(reply)

    def scan(self, page_size: int = 0, with_vectors: bool = False) -> Iterator[ScanPage]:
        """Yields every stored item once, page by page, as the index was when the scan began.

        page_size 0 lets the server choose (1000, or its --max-batch when lower). The stream has no
        overall deadline, since a big index takes as long as it takes: instead each page must arrive
        within timeout_s of being asked for (time spent on a page in between does not count). The
        server holds its copy of the index until the stream ends, so read on; leaving the loop early
        cancels the call."""
        if page_size < 0:
            raise ValueError(f"page_size must be 0 (the server's default) or positive, got {page_size}")
        request = index_pb2.ScanRequest(page_size=page_size, with_vectors=with_vectors)
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


class ImageSearch:
    """Similar-image search through both services: embed with the encoder, store and search in the index.

    Each argument left out comes from its env var (IMGSEARCH_ENCODER, IMGSEARCH_INDEX, IMGSEARCH_TLS_CA,
    IMGSEARCH_TOKEN), as in the CLI; `tls_ca` turns on TLS, `token` is sent on every call."""

    def __init__(
        self,
        encoder: str | None = None,
        index: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls_ca: security.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        tls_ca = tls_ca or os.environ.get("IMGSEARCH_TLS_CA") or None
        token = token or os.environ.get("IMGSEARCH_TOKEN") or None
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

    def add(
        self,
        ids: Sequence[str],
        images: Sequence[bytes | np.ndarray],
        metadata: Sequence[Mapping[str, str]] = (),
    ) -> int:
        """Embeds and stores the images under the ids; returns the count stored after it."""
        embedding = self.encoder.embed(images)
        return self.index.upsert(ids, embedding.vectors, metadata, embedding.model_version)

    def search(self, images: Sequence[bytes | np.ndarray], k: int = 10) -> list[list[Match]]:
        """Returns the k most similar stored images of each query image, nearest first."""
        embedding = self.encoder.embed(images)
        return self.index.search(embedding.vectors, k, embedding.model_version)

    def search_by_id(self, ids: Sequence[str], k: int = 10) -> list[list[Match]]:
        return self.index.search_by_id(ids, k)
