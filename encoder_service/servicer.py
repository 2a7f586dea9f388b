"""The Encoder gRPC servicer: images in, decoded by `preprocess`, embedded by a runtime, vectors out."""

from __future__ import annotations

import json
import logging
import threading

import grpc
import numpy as np

from encoder_service.preprocess import ImageError, decode_image, from_raw_pixels
from encoder_service.runtime import Runtime
from imgsearch import vectors as wire
from imgsearch.errors import RequestError, call_gone, grpc_errors
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc

BAD_IMAGE_KEY = "imgsearch-bad-image"  # trailing metadata: the position of the image that failed

log = logging.getLogger(__name__)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(
        self, runtime: Runtime, *, max_batch: int, max_image_bytes: int, max_image_pixels: int
    ) -> None:
        self.runtime = runtime
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
            if len(image.encoded) > self.max_image_bytes:
                raise ImageError(
                    f"{len(image.encoded)} bytes, over the limit of {self.max_image_bytes} bytes per image"
                )
            return decode_image(image.encoded, max_pixels=self.max_image_pixels)
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
        if count > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} images in one call; the limit is {self.max_batch} (--max-batch)",
            )
        height, width, _ = self.runtime.input_shape
        batch = np.empty((count, height, width), dtype=np.float32)
        for position, image in enumerate(request.images):
            self._give_up_if_gone(context, f"after decoding {position} of {count} images")
            batch[position] = self._decode(position, image)
        self._give_up_if_gone(context, f"after decoding {count} images, before the model")
        vectors = self.runtime.embed(batch)
        with self._counts_lock:
            self._embedded += count
        return encoder_pb2.EmbedResponse(vectors=wire.pack(vectors), model_version=self.runtime.model_version)

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
        )
