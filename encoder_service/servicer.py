"""The Encoder gRPC servicer: images in, decoded by `preprocess`, embedded by a runtime, vectors out;
`Reconstruct`: the same images out as the model sees them and as its decoder redraws them."""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import numpy as np

from encoder_service.preprocess import ImageError, decode_image, from_raw_pixels
from encoder_service.runtime import NoDecoderError, Runtime
from imgsearch import vectors as wire
from imgsearch.errors import RequestError, call_gone, grpc_errors
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc

BAD_IMAGE_KEY = "imgsearch-bad-image"  # trailing metadata: the position of the image that failed
CHECK_EVERY_S = 0.005  # while decoding a batch, look this often whether its caller still waits

log = logging.getLogger(__name__)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(
        self,
        runtime: Runtime,
        *,
        max_batch: int,
        max_image_bytes: int,
        max_image_pixels: int,
        batch_window_s: float = 0.0,
        replica_id: str = "",
    ) -> None:
        self.runtime = runtime
        self.replica_id = replica_id
        self.batcher = MicroBatcher(runtime, batch_window_s) if batch_window_s > 0 else None
        self.max_batch = max_batch
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._embedded = 0
        self._abandoned = 0
        self._counts_lock = threading.Lock()

    def _decode(self, position: int, image: encoder_pb2.Image) -> np.ndarray:
        try:
            kind = image.WhichOneof("content")
            if kind == "raw":
                return from_raw_pixels(image.raw.height, image.raw.width, image.raw.pixels)
            if kind is None:
                raise ImageError("empty image: neither encoded bytes nor raw pixels")
            data = image.encoded  # each read of the field makes a new bytes object: read it once
            if len(data) > self.max_image_bytes:
                raise ImageError(
                    f"{len(data)} bytes, over the limit of {self.max_image_bytes} bytes per image"
                )
            return decode_image(data, max_pixels=self.max_image_pixels)
        except ImageError as error:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image {position}: {error}",
                ((BAD_IMAGE_KEY, str(position)),),
            ) from error

    @grpc_errors({})
    def Embed(
        self, request: encoder_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.EmbedResponse:
        count = len(request.images)
        self._check_batch_size(count)
        if self.batcher is None:
            vectors = self.runtime.embed(self._decode_all(request, context))
        else:
            self.batcher.start()
            try:
                batch = self._decode_all(request, context)
            except BaseException:
                self.batcher.cancel()
                raise
            vectors = self.batcher.embed(batch)
        with self._counts_lock:
            self._embedded += count
        return encoder_pb2.EmbedResponse(
            vectors=wire.pack(vectors), model_version=self.runtime.model_version, replica=self.replica_id
        )

    @grpc_errors({NoDecoderError: grpc.StatusCode.FAILED_PRECONDITION})
    def Reconstruct(
        self, request: encoder_pb2.ReconstructRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.ReconstructResponse:
        """Each image as the model's input and as the decoder's output from its embedding, both uint8
        (0 = background, 255 = ink). Limits, bad images and deadlines as in Embed; runs the model
        directly, never through the batcher. Not counted in Info's images_embedded, which counts Embed."""
        self.runtime.check_decoder()  # before any decoding: a model without a decoder fails at once
        self._check_batch_size(len(request.images))
        batch = self._decode_all(request, context)
        pictures = self.runtime.reconstruct(batch)
        height, width = batch.shape[1:3]
        reply = encoder_pb2.ReconstructResponse(
            model_version=self.runtime.model_version, replica=self.replica_id
        )
        for seen, redrawn in zip(_to_uint8(batch), _to_uint8(pictures), strict=True):
            item = reply.items.add()
            item.input.height, item.input.width, item.input.pixels = height, width, seen.tobytes()
            item.reconstruction.height, item.reconstruction.width = height, width
            item.reconstruction.pixels = redrawn.tobytes()
        return reply

    def _check_batch_size(self, count: int) -> None:
        if count > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} images in one call; the limit is {self.max_batch} (--max-batch)",
            )

    def _decode_all(
        self,
        request: encoder_pb2.EmbedRequest | encoder_pb2.ReconstructRequest,
        context: grpc.ServicerContext,
    ) -> np.ndarray:
        """The request's images as the model's input batch, float32 [N, H, W]."""
        count = len(request.images)
        height, width, _ = self.runtime.input_shape
        batch = np.empty((count, height, width), dtype=np.float32)
        checked = -CHECK_EVERY_S
        for position, image in enumerate(request.images):
            now = time.monotonic()
            if now - checked >= CHECK_EVERY_S:  # before each image of a slow batch, not of a fast one
                self._give_up_if_gone(context, f"after decoding {position} of {count} images")
                checked = now
            batch[position] = self._decode(position, image)
        self._give_up_if_gone(context, f"after decoding {count} images, before the model")
        return batch

    def _give_up_if_gone(self, context: grpc.ServicerContext, where: str) -> None:
        """Stops work nobody waits for, so a timed-out or abandoned batch frees its worker."""
        code = call_gone(context)
        if code is None:
            return
        with self._counts_lock:
            self._abandoned += 1
        log.info("Embed abandoned %s: %s", where, code.name)
        raise RequestError(code, f"abandoned {where}: {code.name.lower().replace('_', ' ')}")

    @grpc_errors({})
    def Info(
        self, request: encoder_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.InfoResponse:
        return encoder_pb2.InfoResponse(
            model_version=self.runtime.model_version,
            dim=self.runtime.dim,
            input_shape=list(self.runtime.input_shape),
            runtime=self.runtime.name,
            card_json=json.dumps(self.runtime.card, sort_keys=True),
            images_embedded=self._embedded,
            calls_abandoned=self._abandoned,
            replica=self.replica_id,
        )


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [0, 1] to uint8 0..255, rounded to nearest (clipped first: a decoder's float
    output may stray past either end)."""
    return np.rint(np.clip(images, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


class MicroBatcher:
    """Runs the model once for the images of calls that reach it together (dynamic batching, as
    Triton's): the first call to arrive waits up to `window_s` for the other calls in flight, then
    embeds every image gathered in one batch and hands each call its rows. A call alone in the
    service does not wait. Off by default (`--batch-window-ms 0`): on the shipped model, whose cost is
    decoding and not the model, its gain is within the noise (bench/encoder.py measures it)."""

    def __init__(self, runtime: Runtime, window_s: float, max_images: int = 256) -> None:
        self.runtime = runtime
        self.window_s = window_s
        self.max_images = max_images
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: list[_Job] = []
        self._in_flight = 0  # calls between start() and embed()

    def start(self) -> None:
        """Counts a call that will reach embed() soon (it is decoding), so the first one waits for it."""
        with self._lock:
            self._in_flight += 1

    def cancel(self) -> None:
        """Uncounts a started call that will not reach embed() (a bad image, an abandoned call)."""
        with self._arrived:
            self._in_flight -= 1
            self._arrived.notify_all()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        job = _Job(batch)
        with self._arrived:
            self._in_flight -= 1
            self._waiting.append(job)
            leader = len(self._waiting) == 1
            self._arrived.notify_all()
            if leader:
                deadline = time.monotonic() + self.window_s
                while (
                    self._in_flight > 0
                    and sum(len(j.batch) for j in self._waiting) < self.max_images
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._arrived.wait(left)
                group, self._waiting = self._waiting, []
        if not leader:
            job.done.wait()
            if job.error is not None:
                raise job.error
            assert job.vectors is not None
            return job.vectors
        try:
            vectors = self.runtime.embed(np.concatenate([j.batch for j in group]))
            start = 0
            for other in group:
                other.vectors = vectors[start : start + len(other.batch)]
                start += len(other.batch)
        except Exception as error:
            for other in group:
                other.error = error
            raise
        finally:  # never leave a caller waiting
            for other in group[1:]:
                if other.vectors is None and other.error is None:
                    other.error = RuntimeError("the batch this call was in failed")
                other.done.set()
        return vectors[: len(batch)]


class _Job:
    """One call's images waiting in a MicroBatcher, and then its vectors (or the error)."""

    def __init__(self, batch: np.ndarray) -> None:
        self.batch = batch
        self.done = threading.Event()
        self.vectors: np.ndarray | None = None
        self.error: Exception | None = None
