"""What both gRPC services share: flags with env defaults, logging, health, reflection, graceful stop,
TLS, token auth and the bound on calls in flight."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgsearch import security
from imgsearch.flags import Entry, Flag, SecretFlag, add_flags, secret
from imgsearch_server import admission, auth, cpus, metrics

log = logging.getLogger("imgsearch")
# Reflection only describes the services: a read-only token may use it (grpcurl's first call).
REFLECTION_METHOD = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"


@dataclass(frozen=True)
class ServerSettings:
    """How a gRPC server listens; shared by both services."""

    host: str
    port: int
    workers: int
    max_message_bytes: int
    grace_s: float
    log_format: str
    log_level: str
    max_concurrent_rpcs: int = 64
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the server speaks only TLS
    tls_key: str | None = None
    auth_token: security.Secret | None = None  # when set, every call but health needs it
    read_token: security.Secret | None = None  # with auth_token: accepted for the service's reads only
    max_streams: int = 16  # open streams of each kind (health Watch; Scan and reflection)
    # Connections are closed (GOAWAY) after this long, so clients re-resolve DNS and find replicas added
    # since; calls in flight get the grace to finish. 0: connections live on.
    max_connection_age_s: float = 60.0
    max_connection_age_grace_s: float = 300.0
    # Prometheus metrics over HTTP on this port (0: a free one); None: no metrics server. The host: --host's.
    metrics_port: int | None = None
    metrics_host: str = ""
    # The core gRPC's I/O threads (and a lone call's worker) are held to: "auto", "none" or a core number.
    # "none" here, for servers inside another program; the encoder's flag defaults to "auto", the index's
    # to "none": a held worker's OpenMP threads (FAISS batches, duplicates) inherit its one core.
    io_core: str = "none"

    def security_summary(self) -> str:
        """Returns e.g. "TLS, bearer token" for the start-up line."""
        auth = "bearer token" if self.auth_token else "no auth"
        if self.read_token:
            auth += " and read-only token"
        return ", ".join(["TLS" if self.tls_cert else "plaintext", auth])


AUTH_TOKEN = SecretFlag(
    "--auth-token", "IMGSEARCH_AUTH_TOKEN", "require `authorization: Bearer TOKEN` on every call but health"
)
READ_TOKEN = SecretFlag(
    "--read-token",
    "IMGSEARCH_READ_TOKEN",
    "with --auth-token: a second token, accepted for reads only (searches, gets, stats, scans, Embed, "
    "Reconstruct, Info); writes presenting it get PERMISSION_DENIED",
    what="read-only token",
)


def server_flags(*, env_prefix: str, default_port: int, io_core: str = "none") -> list[Entry]:
    """The flags every service takes; those of one service's own (its port, workers, metrics port) read
    the env vars under its prefix."""
    return [
        Flag(
            "--host", "address to listen on", "IMGSEARCH_HOST", "[::]", shown_default="[::], all interfaces"
        ),
        Flag("--port", "port to listen on, 0 picks a free one", f"{env_prefix}_PORT", default_port, int),
        Flag("--workers", "gRPC worker threads for unary calls", f"{env_prefix}_WORKERS", 8, int),
        Flag(
            "--max-message-bytes",
            "largest request or reply in bytes",
            "IMGSEARCH_MAX_MESSAGE_BYTES",
            64 * 1024 * 1024,
            int,
            shown_default="64 MiB",
        ),
        Flag(
            "--grace-s",
            "on SIGTERM/SIGINT, seconds in-flight calls get to finish",
            "IMGSEARCH_GRACE_S",
            10.0,
            float,
            shown_default="10",
        ),
        Flag(
            "--log-format",
            "log lines as text or JSON",
            "IMGSEARCH_LOG_FORMAT",
            "text",
            choices=("text", "json"),
        ),
        Flag("--log-level", "log level", "IMGSEARCH_LOG_LEVEL", "INFO"),
        Flag(
            "--max-concurrent-rpcs",
            "calls in flight (running or queued) past which a call is refused at once with "
            "RESOURCE_EXHAUSTED; health checks never count",
            "IMGSEARCH_MAX_CONCURRENT_RPCS",
            64,
            int,
        ),
        Flag(
            "--max-streams",
            "streams open at once of each kind, health Watch and the others (Scan, reflection), each on "
            "threads of its own, never the workers'; past it a stream is refused with RESOURCE_EXHAUSTED",
            "IMGSEARCH_MAX_STREAMS",
            16,
            int,
        ),
        Flag(
            "--max-connection-age-s",
            "close each client connection after this long (clients reconnect at once and re-resolve "
            "DNS, finding replicas added since); 0: never",
            "IMGSEARCH_MAX_CONNECTION_AGE_S",
            60.0,
            float,
            shown_default="60",
        ),
        Flag(
            "--max-connection-age-grace-s",
            "time calls in flight on a closing connection get to finish, long scans included",
            "IMGSEARCH_MAX_CONNECTION_AGE_GRACE_S",
            300.0,
            float,
            shown_default="300",
        ),
        Flag(
            "--tls-cert",
            "PEM certificate chain; with --tls-key the service speaks only TLS",
            "IMGSEARCH_TLS_CERT",
        ),
        Flag("--tls-key", "PEM private key of --tls-cert", "IMGSEARCH_TLS_KEY"),
        AUTH_TOKEN,
        READ_TOKEN,
        Flag(
            "--io-core",
            "the core gRPC's I/O threads are held to, and a call's worker while it is the only call, so "
            "its hand-offs stay on one core: auto (one of this process's cores, by its pid), none, or a "
            "core number",
            f"{env_prefix}_IO_CORE",
            io_core,
        ),
        Flag(
            "--metrics-port",
            "serve Prometheus metrics over HTTP on this port at /metrics, 0 picks a free one",
            f"{env_prefix}_METRICS_PORT",
            None,
            int,
            shown_default="no metrics server",
        ),
        Flag(
            "--metrics-host",
            "address the metrics server listens on",
            "IMGSEARCH_METRICS_HOST",
            "",
            shown_default="--host's",
        ),
    ]


def service_parser(
    prog: str,
    description: str,
    *,
    env_prefix: str,
    default_port: int,
    own: Sequence[Entry],
    io_core: str = "none",
) -> argparse.ArgumentParser:
    """A service's parser: the flags every service takes, then its `own`; each defaults to an env var,
    then to a built-in value (`io_core`: --io-core's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    flags = server_flags(env_prefix=env_prefix, default_port=default_port, io_core=io_core)
    add_flags(parser, [*flags, *own])
    return parser


def _token(args: argparse.Namespace, flag: SecretFlag) -> security.Secret | None:
    """Returns the secret of `flag` (flags, then env vars); empty strings mean off."""
    try:
        value = secret(args, flag)
    except (OSError, ValueError) as error:
        raise SystemExit(f"{flag.name}: {error}") from None
    return security.Secret(value) if value else None


def _tokens(args: argparse.Namespace) -> tuple[security.Secret | None, security.Secret | None]:
    """Returns (the token, the read-only token), checked: a read token needs a token, and another one."""
    token = _token(args, AUTH_TOKEN)
    read = _token(args, READ_TOKEN)
    if read is not None and token is None:
        raise SystemExit(
            "--read-token needs --auth-token (or --auth-token-file) too: without it every call, writes "
            "included, would be open"
        )
    if read is not None and token is not None and read.value == token.value:
        raise SystemExit("--read-token and --auth-token must differ")
    return token, read


def _tls_files(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Returns (cert, key): both or neither, each readable."""
    cert, key = args.tls_cert or None, args.tls_key or None
    if (cert is None) != (key is None):
        raise SystemExit(
            "TLS needs both --tls-cert and --tls-key (env IMGSEARCH_TLS_CERT, IMGSEARCH_TLS_KEY), "
            f"got only {'--tls-cert' if cert else '--tls-key'}"
        )
    if cert is not None and key is not None:
        try:
            auth.server_credentials(cert, key)
        except (OSError, ValueError) as error:
            raise SystemExit(f"TLS: {error}") from None
    return cert, key


def _io_core(setting: str) -> str:
    try:
        return cpus.check_io_core(setting.strip().lower())
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _connection_age_options(settings: ServerSettings) -> list[tuple[str, int]]:
    if settings.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
    ]


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """Returns the server part of parsed flags, checked; a bad TLS or token setting fails here."""
    tls_cert, tls_key = _tls_files(args)
    auth_token, read_token = _tokens(args)
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace_s,
        log_format=args.log_format,
        log_level=args.log_level.upper(),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        tls_cert=tls_cert,
        tls_key=tls_key,
        auth_token=auth_token,
        read_token=read_token,
        max_streams=args.max_streams,
        max_connection_age_s=args.max_connection_age_s,
        max_connection_age_grace_s=args.max_connection_age_grace_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or "",
        io_core=_io_core(args.io_core),
    )
    if settings.max_connection_age_s < 0 or settings.max_connection_age_grace_s < 0:
        raise SystemExit("--max-connection-age-s and --max-connection-age-grace-s must be 0 or more")
    if not 0 <= settings.port <= 65535:
        raise SystemExit(f"--port must be 0 to 65535, got {settings.port}")
    if settings.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {settings.workers}")
    if settings.max_message_bytes < 1024:
        raise SystemExit(f"--max-message-bytes must be at least 1024, got {settings.max_message_bytes}")
    if settings.max_concurrent_rpcs < 1:
        raise SystemExit(f"--max-concurrent-rpcs must be at least 1, got {settings.max_concurrent_rpcs}")
    if settings.max_streams < 1:
        raise SystemExit(f"--max-streams must be at least 1, got {settings.max_streams}")
    if settings.metrics_port is not None and not 0 <= settings.metrics_port <= 65535:
        raise SystemExit(f"--metrics-port must be 0 to 65535, got {settings.metrics_port}")
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise SystemExit(f"--metrics-port and --port are both {settings.port}")
    return settings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # logging's extra={"fields": {...}}: the request log's
        if isinstance(fields, dict):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Sends logs to stderr, one event per line, as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class GrpcServer:
    """A grpc.Server with health and reflection, started on a port and stopped gracefully; TLS, token
    auth and the bounds on calls in flight as the settings say; request metrics and logs (`metrics`),
    served over HTTP when the settings give a metrics port.

    Interceptors, outermost first: the request metrics and log (`metrics.interceptor`), admission (each
    kind of call on threads of its own, and refused past its bound: imgsearch_server/admission.py), then the
    bearer token. `read_methods` ("/pkg.Service/Method") are the calls a read-only token may make."""

    def __init__(
        self,
        settings: ServerSettings,
        service_names: Sequence[str],
        register: Callable[[grpc.Server], None],
        read_methods: Collection[str] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics.ServerMetrics(max_reply_bytes=settings.max_message_bytes)
        self.admission = admission.Admission(
            workers=settings.workers,
            max_calls=settings.max_concurrent_rpcs,
            max_streams=settings.max_streams,
            on_refused=self.metrics.refused,
            place=cpus.io_core(settings.io_core) is not None,
        )
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [self.metrics.interceptor, self.admission]
        if settings.auth_token:
            interceptors.append(
                auth.BearerTokenInterceptor(
                    settings.auth_token.value,
                    settings.read_token.value if settings.read_token else None,
                    [*read_methods, REFLECTION_METHOD],
                )
            )
        self._server = grpc.server(
            self.admission.workers,
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a port in use must fail, not share it
                *_connection_age_options(settings),
            ],
            # No maximum_concurrent_rpcs: admission bounds each kind of call on its own, so that health
            # checks and open streams never count against the calls that do the work.
        )
        register(self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.metrics.expect([*self._service_names, health.SERVICE_NAME])
        self.port = 0
        self.metrics_server: metrics.MetricsServer | None = None
        self.metrics_port: int | None = None  # once started with a metrics port: the one bound

    def start(self) -> int:
        """Binds, starts serving, reports SERVING; returns the bound port."""
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            credentials = None
            if self.settings.tls_cert and self.settings.tls_key:
                credentials = auth.server_credentials(self.settings.tls_cert, self.settings.tls_key)
        except (OSError, ValueError) as error:
            raise SystemExit(f"TLS: {error}") from None
        try:
            if credentials is not None:
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise SystemExit(f"cannot listen on {address}: {error}") from error
        if self.settings.metrics_port is not None:
            host = self.settings.metrics_host or self.settings.host
            try:
                self.metrics_server = metrics.MetricsServer(
                    self.metrics.registry, host, self.settings.metrics_port
                )
            except OSError as error:
                self._server.stop(0)
                raise SystemExit(str(error)) from error
            self.metrics_port = self.metrics_server.port
            log.info("metrics on %s", self.metrics_server.url)
        self._server.start()
        core = cpus.io_core(self.settings.io_core)
        if core is not None:
            held = cpus.hold_io_threads(core)
            log.info("gRPC I/O threads held to core %d (%d threads; --io-core)", core, held)
        self._set_status(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING, refuses new calls, lets in-flight calls finish within the grace period."""
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.settings.grace_s if grace_s is None else grace_s
        self._server.stop(grace).wait()
        self.admission.shutdown()
        if self.metrics_server is not None:  # scraped until the calls have drained
            self.metrics_server.close()
            self.metrics_server = None

    def _set_status(self, status: int) -> None:
        for name in ["", *self._service_names]:
            self._health.set(name, status)  # type: ignore[arg-type]


def run_until_signal(server: GrpcServer, name: str, on_stopped: Callable[[], None] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully and runs `on_stopped` (e.g. a snapshot)."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info(
            "%s: received %s, draining for up to %.1f s",
            name,
            signal.Signals(signum).name,
            server.settings.grace_s,
        )
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    port = server.start()
    log.info(
        "%s: serving on %s:%d (%s)", name, server.settings.host, port, server.settings.security_summary()
    )
    if server.settings.auth_token and not server.settings.tls_cert:
        log.warning("%s: the bearer token travels in clear text; add --tls-cert and --tls-key", name)
    while not stop.wait(0.5):
        pass
    server.stop()
    if on_stopped is not None:
        on_stopped()
    log.info("%s: stopped", name)


def describe(config: object) -> str:
    """Returns the effective configuration as one JSON line for the start-up log."""
    values = asdict(config) if hasattr(config, "__dataclass_fields__") else vars(config)  # type: ignore[call-overload]
    return json.dumps(values, default=str, sort_keys=True)
