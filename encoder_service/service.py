"""The encoder service assembled: a runtime per model served, their servicer, a gRPC server. Holds no
state."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from encoder_service import metrics
from encoder_service.model_dir import read_card, shipped_model
from encoder_service.preprocess import raise_pillow_limit
from encoder_service.runtime import Runtime, load_runtime
from encoder_service.servicer import DEFAULT_DECODE_BUDGET_MIB, DEFAULT_DECODE_WAIT_S, EncoderServicer
from imgsearch.flags import Flag
from imgsearch.v1 import encoder_pb2
from imgsearch_server.handlers import add_servicer
from imgsearch_server.serving import GrpcServer, ServerSettings, server_settings, service_parser

log = logging.getLogger("encoder_service")

DEFAULT_PORT = 50051
GRAY_PNG_DECODE_BYTES = 2  # per pixel, the cheapest image to decode (preprocess.ImageHeader.decode_bytes)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # what a call's `model` may say


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its name (what Embed's `model` takes) and its directory."""

    name: str
    model_dir: Path


@dataclass(frozen=True)
class EncoderConfig:
    server: ServerSettings
    models: tuple[ModelSpec, ...]  # the default first; never empty
    runtime: str
    max_batch: int
    max_image_bytes: int
    max_image_pixels: int
    batch_window_ms: float = 0.0
    replica_id: str = ""
    decode_budget_mib: int = DEFAULT_DECODE_BUDGET_MIB
    decode_wait_s: float = DEFAULT_DECODE_WAIT_S

    @property
    def model_dir(self) -> Path:
        """The default model's directory."""
        return self.models[0].model_dir


def encoder_flags() -> list[Flag]:
    """The encoder's own flags, beside the server's (serving.server_flags)."""
    return [
        Flag(
            "--model",
            "a shipped model by name: default (digits), tutorial (the tutorial's, for comparison), "
            "fashion, fashion-tutorial; the one model served, unless --models is given",
            "IMGSEARCH_MODEL",
            "default",
        ),
        Flag(
            "--model-dir",
            "a directory written by `imgsearch train`, instead of a shipped model (named by its folder); "
            "--models wins over it too",
            "IMGSEARCH_MODEL_DIR",
            None,
            Path,
        ),
        Flag(
            "--models",
            "several models in one process, a comma list of shipped names, directories written by "
            "`imgsearch train` (a path with a '/', named by its folder) or NAME=PATH; the first is the "
            "default, and each call picks one by name (its `model`); wins over --model and --model-dir",
            "IMGSEARCH_MODELS",
            None,
            shown_default="none: the one model of --model or --model-dir",
        ),
        Flag(
            "--runtime",
            "litert runs encoder.tflite (no TensorFlow needed); tensorflow runs encoder.keras through a "
            "compiled tf.function",
            "IMGSEARCH_RUNTIME",
            "litert",
            choices=("litert", "tensorflow"),
        ),
        Flag("--max-batch", "most images in one Embed call", "IMGSEARCH_ENCODER_MAX_BATCH", 1024, int),
        Flag(
            "--max-image-bytes",
            "largest encoded image",
            "IMGSEARCH_MAX_IMAGE_BYTES",
            16 * 1024 * 1024,
            int,
            shown_default="16 MiB",
        ),
        Flag(
            "--max-image-pixels",
            "largest image in pixels, checked before decoding",
            "IMGSEARCH_MAX_IMAGE_PIXELS",
            40_000_000,
            int,
            shown_default="40M",
        ),
        Flag(
            "--decode-budget-mib",
            "memory, in MiB, that images may take while they are decoded, across all calls at once: "
            "each image holds its estimated peak (width x height x about 2 bytes for 8-bit gray, 5 for "
            "colour, 21 for WebP; docs/PREPROCESSING.md) from before its first pixel is decoded until it "
            "is fitted; an image that can never fit is refused at once, one past a full budget waits up "
            "to --decode-wait-s, both with RESOURCE_EXHAUSTED",
            "IMGSEARCH_ENCODER_DECODE_BUDGET_MIB",
            DEFAULT_DECODE_BUDGET_MIB,
            int,
            shown_default=f"{DEFAULT_DECODE_BUDGET_MIB}: with it the encoder stays under about 1 GiB",
        ),
        Flag(
            "--decode-wait-s",
            "longest an image waits for room in the decoding budget, never past its call's deadline",
            "IMGSEARCH_ENCODER_DECODE_WAIT_S",
            DEFAULT_DECODE_WAIT_S,
            float,
            shown_default=f"{DEFAULT_DECODE_WAIT_S:g}",
        ),
        Flag(
            "--batch-window-ms",
            "dynamic batching: the first of several calls in flight waits up to this long to run the "
            "model once for all of them; 0 turns it off",
            "IMGSEARCH_ENCODER_BATCH_WINDOW_MS",
            0.0,
            float,
            shown_default="0: on the shipped model its gain is within the noise, see bench/results/REPORT.md",
        ),
        Flag(
            "--replica-id",
            "this replica's name in Embed replies and Info, so a client can count what each replica served",
            "IMGSEARCH_REPLICA_ID",
            default_replica_id(),
            shown_default="HOSTNAME:PID; a container's hostname is its id",
        ),
    ]


def parse_config(argv: Sequence[str] | None = None) -> EncoderConfig:
    """Returns the configuration from flags, each defaulting to an env var."""
    parser = service_parser(
        "python -m encoder_service",
        "The imgsearch encoder service (images to 128-d vectors).",
        env_prefix="IMGSEARCH_ENCODER",
        default_port=DEFAULT_PORT,
        own=encoder_flags(),
        io_core="auto",  # measured: a one-PNG Embed 1.22 -> 1.04 ms p50 (imgsearch_server/cpus.py)
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
    try:
        if args.models is not None:
            models = parse_models(args.models)
        elif args.model_dir is not None:  # checked when it loads, as before --models
            models = (ModelSpec(_folder_name(args.model_dir), args.model_dir),)
        else:
            models = (ModelSpec(args.model, shipped_model(args.model)),)
    except ValueError as error:
        parser.error(f"--models: {error}" if args.models is not None else str(error))
    return EncoderConfig(
        server_settings(args),
        models,
        args.runtime,
        args.max_batch,
        args.max_image_bytes,
        args.max_image_pixels,
        args.batch_window_ms,
        args.replica_id,
        args.decode_budget_mib,
        args.decode_wait_s,
    )


def parse_models(text: str) -> tuple[ModelSpec, ...]:
    """--models: `default,fashion,models/mine,cats=/models/v2` to named model directories, in order.

    An entry with a '/' (or starting with '.' or '~') is a directory, named by its folder; NAME=PATH
    names one explicitly; any other entry is a shipped model's name. Directories must hold a card.
    Raises ValueError, in one line, for an unknown shipped name, a bad directory, a bad or repeated
    name, or no entry at all."""
    models: dict[str, ModelSpec] = {}
    entries: dict[str, str] = {}  # name -> the entry that gave it, for the error of a repeated name
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, named, path = entry.partition("=")
        if named:
            name, path = name.strip(), path.strip()
            if not path:
                raise ValueError(f"{entry!r} gives no directory after '='")
            model_dir = Path(path).expanduser()
        elif "/" in entry or entry.startswith((".", "~")):
            model_dir = Path(entry).expanduser()
            name = _folder_name(model_dir)
        else:
            try:
                model_dir = shipped_model(entry)
            except ValueError as error:
                raise ValueError(f"{error} (a directory: give a path, such as ./{entry})") from None
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} ({entry}) is not a model name: letters, digits, '.', '_' and '-', starting "
                "with a letter or digit; NAME=PATH names a directory"
            )
        if name in models:
            raise ValueError(
                f"the model name {name!r} is given twice ({entries[name]}, {entry}); "
                "NAME=PATH names one otherwise"
            )
        try:
            read_card(model_dir)  # here, so a bad directory fails in one line before any model loads
        except (OSError, ValueError) as error:
            raise ValueError(f"model {name!r}: {error}") from None
        models[name] = ModelSpec(name, model_dir)
        entries[name] = entry
    if not models:
        raise ValueError(f"{text!r} names no model")
    return tuple(models.values())


def _folder_name(model_dir: Path) -> str:
    """A model directory's name: its folder's, the path made absolute but links not followed."""
    return Path(os.path.abspath(model_dir)).name


def load_models(models: Sequence[ModelSpec], runtime: str) -> dict[str, Runtime]:
    """A runtime per model, by name, in order (a directory named twice is loaded once). Every model loads
    now, so a bad one stops the service at start and not at its first call.

    Raises SystemExit, in one line naming the model, when one cannot load."""
    loaded: dict[Path, Runtime] = {}
    runtimes: dict[str, Runtime] = {}
    for spec in models:
        key = spec.model_dir.resolve()
        if key not in loaded:
            try:
                loaded[key] = load_runtime(spec.model_dir, runtime)
            except (OSError, ValueError) as error:
                raise SystemExit(f"encoder_service: cannot load the model {spec.name}: {error}") from error
        default = not runtimes
        served = runtimes[spec.name] = loaded[key]
        log.info(
            "model %s%s: %s (dim %d, input %s) on the %s runtime",
            spec.name,
            " (the default)" if default else "",
            served.model_version,
            served.dim,
            served.input_shape,
            served.name,
        )
    return runtimes


def default_replica_id() -> str:
    """HOSTNAME:PID: unique among replicas on one machine and across containers."""
    return f"{socket.gethostname()}:{os.getpid()}"


class EncoderService:
    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.runtimes = load_models(config.models, config.runtime)
        self.runtime = next(iter(self.runtimes.values()))  # the default model's
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
        try:
            servicer = EncoderServicer(
                self.runtimes,
                max_batch=config.max_batch,
                max_image_bytes=config.max_image_bytes,
                max_image_pixels=config.max_image_pixels,
                batch_window_s=config.batch_window_ms / 1000,
                replica_id=replica,
                decode_budget_mib=config.decode_budget_mib,
                decode_wait_s=config.decode_wait_s,
            )
        except ValueError as error:  # a model this service cannot feed
            raise SystemExit(f"encoder_service: cannot serve the model: {error}") from error
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
            models={name: runtime.model_version for name, runtime in self.runtimes.items()},
            runtime=config.runtime,
            replica=replica,
        )

    def start(self) -> int:
        return self.server.start()

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s)
