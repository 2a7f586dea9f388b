"""The encoder service assembled: a model runtime, its servicer, a gRPC server. Holds no state."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from encoder_service.preprocess import raise_pillow_limit
from encoder_service.runtime import load_runtime, shipped_model
from encoder_service.servicer import DEFAULT_DECODE_BUDGET_MIB, DEFAULT_DECODE_WAIT_S, EncoderServicer
from imgsearch import metrics
from imgsearch.handlers import add_servicer
from imgsearch.serving import GrpcServer, ServerSettings, add_server_flags, env_or, server_settings
from imgsearch.v1 import encoder_pb2

log = logging.getLogger("encoder_service")

DEFAULT_PORT = 50051
GRAY_PNG_DECODE_BYTES = 2  # per pixel, the cheapest image to decode (preprocess.ImageHeader.decode_bytes)


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
    decode_budget_mib: int = DEFAULT_DECODE_BUDGET_MIB
    decode_wait_s: float = DEFAULT_DECODE_WAIT_S


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
        "--decode-budget-mib",
        type=int,
        default=env_or("IMGSEARCH_ENCODER_DECODE_BUDGET_MIB", DEFAULT_DECODE_BUDGET_MIB),
        help="memory, in MiB, that images may take while they are decoded, across all calls at once: "
        "each image holds its estimated peak (width x height x about 2 bytes for 8-bit gray, 5 for colour, "
        "21 for WebP; docs/PREPROCESSING.md) from before its first pixel is decoded until it is fitted; "
        "an image that can never fit is refused at once, one past a full budget waits up to "
        "--decode-wait-s, both with RESOURCE_EXHAUSTED "
        f"(env IMGSEARCH_ENCODER_DECODE_BUDGET_MIB, default {DEFAULT_DECODE_BUDGET_MIB}: with it the "
        "encoder stays under about 1 GiB)",
    )
    parser.add_argument(
        "--decode-wait-s",
        type=float,
        default=env_or("IMGSEARCH_ENCODER_DECODE_WAIT_S", DEFAULT_DECODE_WAIT_S),
        help="longest an image waits for room in the decoding budget, never past its call's deadline "
        f"(env IMGSEARCH_ENCODER_DECODE_WAIT_S, default {DEFAULT_DECODE_WAIT_S:g})",
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
    if args.decode_budget_mib < 1:
        parser.error("--decode-budget-mib must be at least 1")
    if not 0 <= args.decode_wait_s <= 60:
        parser.error("--decode-wait-s must be 0 to 60")
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
        args.decode_budget_mib,
        args.decode_wait_s,
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
        # --max-image-pixels over Pillow's own guard (about 89 M pixels) decides: Pillow would refuse first
        raise_pillow_limit(config.max_image_pixels)
        if config.max_image_pixels * GRAY_PNG_DECODE_BYTES > config.decode_budget_mib * 1024 * 1024:
            log.warning(
                "--decode-budget-mib %d cannot hold even an 8-bit PNG of --max-image-pixels %d (about %d "
                "MiB to decode): such images are refused with RESOURCE_EXHAUSTED",
                config.decode_budget_mib,
                config.max_image_pixels,
                config.max_image_pixels * GRAY_PNG_DECODE_BYTES // (1024 * 1024),
            )
        servicer = EncoderServicer(
            self.runtime,
            max_batch=config.max_batch,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            batch_window_s=config.batch_window_ms / 1000,
            replica_id=replica,
            decode_budget_mib=config.decode_budget_mib,
            decode_wait_s=config.decode_wait_s,
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
