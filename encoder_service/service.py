"""The encoder service assembled: a model runtime, its servicer, a gRPC server. Holds no state."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from encoder_service.runtime import load_runtime, shipped_model
from encoder_service.servicer import EncoderServicer
from imgsearch import metrics
from imgsearch.handlers import add_servicer
from imgsearch.serving import GrpcServer, ServerSettings, add_server_flags, env_or, server_settings
from imgsearch.v1 import encoder_pb2

log = logging.getLogger("encoder_service")

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class EncoderConfig:
    server: ServerSettings
    model_dir: Path
    runtime: str
    max_batch: int
    max_image_bytes: int
    max_image_pixels: int
    batch_window_ms: float = 0.0
    replica_id: str = ""


def parse_config(argv: Sequence[str] | None = None) -> EncoderConfig:
    """Returns the configuration from flags, each defaulting to an env var."""
    parser = argparse.ArgumentParser(
        prog="python -m encoder_service",
        description="The imgsearch encoder service (images to 128-d vectors).",
    )
    add_server_flags(parser, env_prefix="IMGSEARCH_ENCODER", default_port=DEFAULT_PORT)
    parser.add_argument(
        "--model",
        default=env_or("IMGSEARCH_MODEL", "default"),
        help="a shipped model by name: default (digits), tutorial (the tutorial's, for comparison), "
        "fashion, fashion-tutorial (env IMGSEARCH_MODEL, default: default)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=env_or("IMGSEARCH_MODEL_DIR", None),
        help="a directory written by `imgsearch train`, instead of a shipped model (env IMGSEARCH_MODEL_DIR)",
    )
    parser.add_argument(
        "--runtime",
        choices=["litert", "tensorflow"],
        default=env_or("IMGSEARCH_RUNTIME", "litert"),
        help="litert runs encoder.tflite (no TensorFlow needed); tensorflow runs encoder.keras through a "
        "compiled tf.function (env IMGSEARCH_RUNTIME, default litert)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=env_or("IMGSEARCH_ENCODER_MAX_BATCH", 1024),
        help="most images in one Embed call (env IMGSEARCH_ENCODER_MAX_BATCH, default 1024)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=env_or("IMGSEARCH_MAX_IMAGE_BYTES", 16 * 1024 * 1024),
        help="largest encoded image (env IMGSEARCH_MAX_IMAGE_BYTES, default 16 MiB)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=env_or("IMGSEARCH_MAX_IMAGE_PIXELS", 40_000_000),
        help="largest image in pixels, checked before decoding (env IMGSEARCH_MAX_IMAGE_PIXELS, default 40M)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=env_or("IMGSEARCH_ENCODER_BATCH_WINDOW_MS", 0.0),
        help="dynamic batching: the first of several calls in flight waits up to this long to run the "
        "model once for all of them; 0 turns it off (env IMGSEARCH_ENCODER_BATCH_WINDOW_MS, default 0: "
        "on the shipped model its gain is within the noise, see bench/results/REPORT.md)",
    )
    parser.add_argument(
        "--replica-id",
        default=env_or("IMGSEARCH_REPLICA_ID", default_replica_id()),
        help="this replica's name in Embed replies and Info, so a client can count what each replica "
        "served (env IMGSEARCH_REPLICA_ID, default HOSTNAME:PID; a container's hostname is its id)",
    )
    args = parser.parse_args(argv)
    if min(args.max_batch, args.max_image_bytes, args.max_image_pixels) < 1:
        parser.error("--max-batch, --max-image-bytes and --max-image-pixels must be at least 1")
    if not 0 <= args.batch_window_ms <= 1000:
        parser.error("--batch-window-ms must be 0 to 1000")
    if args.model_dir is None:
        try:
            args.model_dir = shipped_model(args.model)
        except ValueError as error:
            parser.error(str(error))
    return EncoderConfig(
        server_settings(args),
        args.model_dir,
        args.runtime,
        args.max_batch,
        args.max_image_bytes,
        args.max_image_pixels,
        args.batch_window_ms,
        args.replica_id,
    )


def default_replica_id() -> str:
    """HOSTNAME:PID: unique among replicas on one machine and across containers."""
    return f"{socket.gethostname()}:{os.getpid()}"


class EncoderService:
    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        try:
            self.runtime = load_runtime(config.model_dir, config.runtime)
        except (OSError, ValueError) as error:
            raise SystemExit(f"encoder_service: cannot load the model: {error}") from error
        log.info(
            "model %s (dim %d, input %s) on the %s runtime",
            self.runtime.model_version,
            self.runtime.dim,
            self.runtime.input_shape,
            self.runtime.name,
        )
        replica = config.replica_id or default_replica_id()
        servicer = EncoderServicer(
            self.runtime,
            max_batch=config.max_batch,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            batch_window_s=config.batch_window_ms / 1000,
            replica_id=replica,
        )
        service = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
        self.server = GrpcServer(
            config.server,
            [service.full_name],
            lambda server: add_servicer(server, servicer, service),
            read_methods=[f"/{service.full_name}/{method.name}" for method in service.methods],  # all reads
        )
        metrics.watch_encoder(
            self.server.metrics,
            f"/{service.full_name}/Embed",
            model_version=self.runtime.model_version,
            runtime=self.runtime.name,
            replica=replica,
        )

    def start(self) -> int:
        return self.server.start()

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s)
