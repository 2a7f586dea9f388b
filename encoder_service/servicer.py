"""The Encoder gRPC servicer: images in, decoded by `preprocess`, embedded by a runtime, vectors out;
`Reconstruct`: the same images out as the model sees them and as its decoder redraws them. Embed also
gives each image's novelty (how unlike the model's training data it looks) where the model has a decoder
and its card a novelty threshold.

One servicer serves one or more named models (`--models`), the first its default: each call names its
model (`model`, empty for the default), and each model has a runtime and, with dynamic batching, a
batcher of its own."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from encoder_service.photo import decode_photo, from_raw_photo
from encoder_service.preprocess import MODEL_SIZE, ImageError, ImageHeader, decode_image, from_raw_pixels
from encoder_service.runtime import NoDecoderError, Runtime
from imgsearch import wire
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.wire import BAD_IMAGE_KEY
from imgsearch_server.errors import RequestError, call_gone, grpc_errors
from imgsearch_server.memory import release_free_memory

CHECK_EVERY_S = 0.005  # while decoding a batch, look this often whether its caller still waits
MIB = 1024 * 1024
DEFAULT_DECODE_BUDGET_MIB = 512  # see DecodeBudget
DEFAULT_DECODE_WAIT_S = 2.0
# An image whose decoding takes less than this (about 0.1 M pixels) is not counted against the budget:
# at most --workers of them decode at once (32 MiB at the default 8), and a burst of large images cannot
# hold up small ones.
UNCOUNTED_DECODE_BYTES = 4 * MIB
# After a call whose images took at least this much to decode, the heap's free pages go back to the
# system (malloc_trim, a few milliseconds), so a burst leaves no resident slack; smaller calls skip it.
RELEASE_AFTER_BYTES = 64 * MIB
DEFAULT_MODEL_NAME = "default"  # the name of a model given alone, as a Runtime
# What the `digits` preprocessing makes of every image: a digits model must take this, or its calls would fail
# one by one. A `photo` model takes any shape (photo.py makes it).
PREPROCESSED_SHAPE = (MODEL_SIZE, MODEL_SIZE, 1)
PREPROCESSINGS = ("digits", "photo")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model served: its name (what a call's `model` says), its runtime, and its own batcher (with
    --batch-window-ms), so that one run of a model never holds another model's images."""

    name: str
    runtime: Runtime
    batcher: MicroBatcher | None
    is_default: bool

    def info(self) -> encoder_pb2.ModelInfo:
        return encoder_pb2.ModelInfo(
            name=self.name,
            model_version=self.runtime.model_version,
            dim=self.runtime.dim,
            input_shape=list(self.runtime.input_shape),
            runtime=self.runtime.name,
            card_json=json.dumps(self.runtime.card, sort_keys=True),
            is_default=self.is_default,
        )


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """`models`: name -> runtime, the default first; a lone Runtime is served as `default`.

    Raises ValueError for no model, or a model whose input is not what the preprocessing makes."""

    def __init__(
        self,
        models: Runtime | Mapping[str, Runtime],
        *,
        max_batch: int,
        max_image_bytes: int,
        max_image_pixels: int,
        batch_window_s: float = 0.0,
        replica_id: str = "",
        decode_budget_mib: int = DEFAULT_DECODE_BUDGET_MIB,
        decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
    ) -> None:
        runtimes = {DEFAULT_MODEL_NAME: models} if isinstance(models, Runtime) else dict(models)
        if not runtimes:
            raise ValueError("no model to serve")
        for name, runtime in runtimes.items():
            preprocess = getattr(runtime, "preprocess", "digits")
            if preprocess not in PREPROCESSINGS:
                raise ValueError(f"model {name!r}: unknown preprocessing {preprocess!r} in its card")
            if preprocess == "digits" and runtime.input_shape != PREPROCESSED_SHAPE:
                raise ValueError(
                    f"model {name!r} takes {' x '.join(map(str, runtime.input_shape))} inputs, but the "
                    f"digits preprocessing makes every image {' x '.join(map(str, PREPROCESSED_SHAPE))}"
                )
        self.models = {
            name: ServedModel(
                name,
                runtime,
                MicroBatcher(runtime, batch_window_s) if batch_window_s > 0 else None,
                is_default=position == 0,
            )
            for position, (name, runtime) in enumerate(runtimes.items())
        }
        self.default = next(iter(self.models.values()))
        self.replica_id = replica_id
        self.max_batch = max_batch
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.budget = DecodeBudget(decode_budget_mib * MIB)
        self.decode_wait_s = decode_wait_s
        self._embedded = 0
        self._abandoned = 0
        self._counts_lock = threading.Lock()

    def _model(self, name: str) -> ServedModel:
        """The model a call names (empty: the default); NOT_FOUND, naming the models served, for another."""
        if not name:
            return self.default
        served = self.models.get(name)
        if served is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} is not served here; this encoder serves: {', '.join(self.models)} "
                "(--models)",
            )
        return served

    def _decode(
        self,
        position: int,
        image: encoder_pb2.Image,
        context: grpc.ServicerContext,
        call: _CallMemory,
        served: ServedModel,
    ) -> np.ndarray:
        try:
            kind = image.WhichOneof("content")
            photo = getattr(served.runtime, "preprocess", "digits") == "photo"
            if kind == "raw":
                raw = image.raw
                height, width, channels = served.runtime.input_shape
                given = (raw.height, raw.width, raw.channels or 1)
                if given != (height, width, channels):
                    raise ImageError(
                        f"raw pixels must be {height} x {width} x {channels} (the input of model "
                        f"{served.name!r}), got {' x '.join(map(str, given))}"
                    )
                if photo:
                    return from_raw_photo(*given, raw.pixels, served.runtime.input_shape)
                return from_raw_pixels(raw.height, raw.width, raw.pixels)
            if kind is None:
                raise ImageError("empty image: neither encoded bytes nor raw pixels")
            data = image.encoded  # each read of the field makes a new bytes object: read it once
            if len(data) > self.max_image_bytes:
                raise ImageError(
                    f"{len(data)} bytes, over the limit of {self.max_image_bytes} bytes per image"
                )

            def admit(header: ImageHeader) -> AbstractContextManager[None]:
                call.decoded_bytes += header.decode_bytes
                return self._admit(position, header, context)

            if photo:
                return decode_photo(
                    data, served.runtime.input_shape, max_pixels=self.max_image_pixels, admit=admit
                )
            return decode_image(data, max_pixels=self.max_image_pixels, admit=admit)
        except ImageError as error:
            if error.oversize is not None:
                width, height = error.oversize
                message = (
                    f"image {position}: {width} x {height} = {width * height} pixels, over the limit of "
                    f"{self.max_image_pixels} pixels per image (--max-image-pixels)"
                )
            else:
                message = f"image {position}: {error}"
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, message, ((BAD_IMAGE_KEY, str(position)),)
            ) from error

    @contextmanager
    def _admit(self, position: int, header: ImageHeader, context: grpc.ServicerContext) -> Iterator[None]:
        """Holds the image's decoding memory in the budget while it is decoded and fitted; refuses it
        with RESOURCE_EXHAUSTED when it can never fit, or when the budget stays full past the wait."""
        if header.decode_bytes < UNCOUNTED_DECODE_BYTES:
            yield
            return
        size = f"image {position}: {header.width} x {header.height} = {header.pixels} pixels"
        needs = f"{header.decode_bytes / MIB:.0f} MiB to decode ({header.format} {header.mode})"
        capacity = f"{self.budget.capacity // MIB} MiB (--decode-budget-mib)"
        if header.decode_bytes > self.budget.capacity:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{size} needs about {needs}, more than the whole decoding budget of {capacity}: "
                "this encoder can never decode it",
                ((BAD_IMAGE_KEY, str(position)),),
            )
        remaining = context.time_remaining()
        wait_s = self.decode_wait_s if remaining is None else max(0.0, min(self.decode_wait_s, remaining))
        if not self.budget.take(header.decode_bytes, wait_s):
            self._give_up_if_gone(context, f"waiting to decode image {position}")
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{size} needs about {needs}, and the decoding budget of {capacity} had no room for "
                f"it within {wait_s:g} s (--decode-wait-s): other calls' images hold it; try again",
            )
        try:
            yield
        finally:
            self.budget.give_back(header.decode_bytes)

    @grpc_errors({})
    def Embed(
        self, request: encoder_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.EmbedResponse:
        """The images' vectors and, unless the request skips it, each image's novelty: the decoder run on
        the call's own vectors (after the micro-batch, when there is one), the reconstruction error scored
        against the model card's threshold (encoder_service.novelty)."""
        served = self._model(request.model)
        count = len(request.images)
        self._check_batch_size(count)
        batcher = served.batcher
        if batcher is None:
            batch = self._decode_all(request, context, served)
            vectors = served.runtime.embed(batch)
        else:
            batcher.start()
            try:
                batch = self._decode_all(request, context, served)
            except BaseException:
                batcher.cancel()
                raise
            vectors = batcher.embed(batch)
        novelty = [] if request.skip_novelty else self._novelty(served, batch, vectors)
        with self._counts_lock:
            self._embedded += count  # all models together
        return encoder_pb2.EmbedResponse(
            vectors=wire.pack(vectors),
            model_version=served.runtime.model_version,
            replica=self.replica_id,
            model=served.name,
            novelty=novelty,
        )

    def _novelty(self, served: ServedModel, batch: np.ndarray, vectors: np.ndarray) -> list[float]:
        """Each image's novelty (the decoder on the call's own embeddings, after any micro-batch: see
        encoder_service.novelty); empty when the model has no decoder or its card no threshold, or when
        scoring failed (logged: the vectors are still good)."""
        if not served.runtime.has_novelty:
            return []
        try:
            scores = served.runtime.novelty(batch, vectors)
        except Exception:
            log.exception(
                "novelty of %d images by model %r failed; replying without it", len(batch), served.name
            )
            return []
        return [] if scores is None else scores.tolist()

    @grpc_errors({NoDecoderError: grpc.StatusCode.FAILED_PRECONDITION})
    def Reconstruct(
        self, request: encoder_pb2.ReconstructRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.ReconstructResponse:
        """Each image as the model's input and as the decoder's output from its embedding, both uint8
        (0 = background, 255 = ink). Limits, bad images, the decoding budget, deadlines and the refusal
        of an empty batch as in Embed; runs the model directly, never through the batcher. Not counted in
        Info's images_embedded, which counts Embed."""
        served = self._model(request.model)
        served.runtime.check_decoder()  # before any decoding: a model without a decoder fails at once
        self._check_batch_size(len(request.images))
        batch = self._decode_all(request, context, served)
        pictures = served.runtime.reconstruct(batch)
        height, width, channels = served.runtime.input_shape
        reply = encoder_pb2.ReconstructResponse(
            model_version=served.runtime.model_version, replica=self.replica_id, model=served.name
        )
        for seen, redrawn in zip(_to_uint8(batch), _to_uint8(pictures), strict=True):
            item = reply.items.add()
            for raw, pixels in ((item.input, seen), (item.reconstruction, redrawn)):
                raw.height, raw.width, raw.channels, raw.pixels = height, width, channels, pixels.tobytes()
        return reply

    def _check_batch_size(self, count: int) -> None:
        if count == 0:  # the index refuses an empty batch too: say so here, before anything is stored
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "the batch is empty: send at least one image"
            )
        if count > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} images in one call; the limit is {self.max_batch} (--max-batch)",
            )

    def _decode_all(
        self,
        request: encoder_pb2.EmbedRequest | encoder_pb2.ReconstructRequest,
        context: grpc.ServicerContext,
        served: ServedModel,
    ) -> np.ndarray:
        """The request's images as `served`'s input batch, float32 [N, H, W] (or [N, H, W, C] for colour).
        One image at a time, so
        a call holds at most one image's decoding memory; a call that decoded much hands the freed
        memory back to the system at its end (RELEASE_AFTER_BYTES)."""
        count = len(request.images)
        height, width, channels = served.runtime.input_shape
        shape = (height, width) if channels == 1 else (height, width, channels)
        batch = np.empty((count, *shape), dtype=np.float32)
        call = _CallMemory()
        checked = -CHECK_EVERY_S
        try:
            for position, image in enumerate(request.images):
                now = time.monotonic()
                if now - checked >= CHECK_EVERY_S:  # before each image of a slow batch, not of a fast one
                    self._give_up_if_gone(context, f"after decoding {position} of {count} images")
                    checked = now
                batch[position] = self._decode(position, image, context, call, served).reshape(shape)
        finally:
            if call.decoded_bytes >= RELEASE_AFTER_BYTES:
                release_free_memory()
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
        """The default model at the top level (as before there were several), every model in `models`."""
        models = [served.info() for served in self.models.values()]
        default = models[0]
        return encoder_pb2.InfoResponse(
            model_version=default.model_version,
            dim=default.dim,
            input_shape=default.input_shape,
            runtime=default.runtime,
            card_json=default.card_json,
            images_embedded=self._embedded,
            calls_abandoned=self._abandoned,
            replica=self.replica_id,
            models=models,
        )


class _CallMemory:
    """What one call's images took to decode, so far (estimated: ImageHeader.decode_bytes)."""

    def __init__(self) -> None:
        self.decoded_bytes = 0


class DecodeBudget:
    """The memory images may take while they decode, shared by every call in flight (--decode-budget-mib).

    Each image takes its estimated peak (ImageHeader.decode_bytes) before any pixel is decoded and gives
    it back once fitted. Takers are served in arrival order, so a large image is not starved by a stream
    of smaller ones that would each fit."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_use = 0
        self._changed = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    def take(self, amount: int, wait_s: float) -> bool:
        """Takes `amount` bytes, waiting up to wait_s for earlier takers and for room; False on timeout."""
        deadline = time.monotonic() + wait_s
        turn = object()
        with self._changed:
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or self._in_use + amount > self.capacity:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                self._in_use += amount
                return True
            finally:
                self._queue.remove(turn)
                self._changed.notify_all()

    def give_back(self, amount: int) -> None:
        with self._changed:
            self._in_use -= amount
            self._changed.notify_all()


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
