"""The gateway's settings: flags, each defaulting to an environment variable (flags win)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgsearch import client_flags, security
from imgsearch.client import DEFAULT_ENCODER, DEFAULT_INDEX
from imgsearch.flags import Entry, Flag, SecretFlag, add_flags, secret

DEFAULT_PORT = 8080
DEFAULT_COLLECTION = "default"  # the index service's own default collection
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_K = 100
DEFAULT_TIMEOUT_S = 10.0
# Slow and idle HTTP clients (web/connections.py). An idle keep-alive connection costs a socket and little
# else, and browsers reopen one at once, so 5 s (uvicorn's own default). A request head is a few hundred
# bytes: 10 s is ample on any link, and a slowloris client dripping headers is cut off there. A body is at
# most --max-upload-bytes (8 MiB): 30 s is 2.2 Mbit/s for the largest, while the page's drawings and
# digits are a few KiB; raise it with the upload limit for slow links.
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# Open connections (idle ones included) or requests in flight before uvicorn answers 503 at once: about 30
# browsers at 6 connections each. The routes run on 40 threads, so more requests than that queue; past 200
# a caller gets 503 at once instead of a place in an ever longer queue, and the timeouts above keep idle or
# slow connections from holding the places.
DEFAULT_MAX_CONNECTIONS = 200
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
READ_TOKEN_COOKIE = "imgsearch_read_token"  # the page keeps the read token here, for <img src> too


@dataclass(frozen=True)
class Settings:
    encoder: str = DEFAULT_ENCODER
    index: str = DEFAULT_INDEX
    # The collection (or alias) of a request that names none; the index service says whether it exists.
    collection: str = DEFAULT_COLLECTION
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    media_root: Path | None = None  # resolved; thumbnails and item views read only below it
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_k: int = DEFAULT_MAX_K
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls_ca: str | None = None
    # Sent to both services; with allow_indexing, also what POST /api/items must present.
    token: security.Secret | None = field(default=None, repr=False)
    allow_indexing: bool = False
    # What every /api/ request must carry (header or cookie) when set; None: the API is open.
    read_token: security.Secret | None = field(default=None, repr=False)
    show_source: bool = False  # return the items' `source` paths (the indexing machine's file names)
    log_level: str = "info"
    log_format: str = "text"
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.allow_indexing and self.token is None:
            raise ValueError(
                "--allow-indexing needs a token (--token, --token-file, IMGSEARCH_TOKEN or "
                "IMGSEARCH_TOKEN_FILE): without one anyone could write to the index"
            )
        if (
            self.allow_indexing
            and self.token is not None
            and self.read_token is not None
            and self.read_token.value == self.token.value
        ):
            raise ValueError(
                "--read-token must differ from the indexing token (--token): whoever may read could write"
            )
        if not self.collection:
            raise ValueError("--collection must name a collection or an alias (default: default)")
        if self.max_upload_bytes < 1:
            raise ValueError(f"--max-upload-bytes must be positive, got {self.max_upload_bytes}")
        if self.max_k < 1:
            raise ValueError(f"--max-k must be positive, got {self.max_k}")
        for flag, seconds in (
            ("--keep-alive-timeout-s", self.keep_alive_timeout_s),
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
        ):
            if not seconds > 0:
                raise ValueError(f"{flag} must be positive, got {seconds}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be positive, got {self.max_connections}")

    def summary(self) -> str:
        """One line for the log: everything but the token's value."""
        return (
            f"encoder {self.encoder}, index {self.index}, collection {self.collection}, "
            f"media root {self.media_root or '-'}, "
            f"max upload {self.max_upload_bytes} bytes, max k {self.max_k}, "
            f"TLS {'on' if self.tls_ca else 'off'}, token {'set' if self.token else 'none'}, "
            f"indexing {'on' if self.allow_indexing else 'off'}, "
            f"read token {'set' if self.read_token else 'none (the API is open)'}, "
            f"sources {'shown' if self.show_source else 'hidden'}, "
            f"timeouts: keep-alive {self.keep_alive_timeout_s:g} s, headers {self.header_timeout_s:g} s, "
            f"body {self.body_timeout_s:g} s, max connections {self.max_connections}"
        )


READ_TOKEN = SecretFlag(
    "--read-token",
    "IMGSEARCH_WEB_READ_TOKEN",
    "make every /api/ route need this token, as `Authorization: Bearer TOKEN` or the cookie "
    f"{READ_TOKEN_COOKIE} (percent-encoded), which the page sets once it has asked for the token; "
    "/, /static/, /healthz and /metrics stay open; 401 without it (default none: the API is open to whoever "
    "reaches the port)",
    what="read token",
)
SERVICE_TOKEN = SecretFlag(
    "--token",
    "IMGSEARCH_TOKEN",
    "bearer token sent to the services. Give it the services' read-only token (their --read-token), so "
    "that the gateway cannot write or delete, unless --allow-indexing is on: then their full token, which "
    "is also the token POST /api/items must carry. Prefer the env var, which `ps` does not show",
)
WEB_FLAGS: list[Entry] = [
    Flag(
        "--host",
        "address to listen on",
        "IMGSEARCH_WEB_HOST",
        "127.0.0.1",
        shown_default="127.0.0.1; 0.0.0.0 for every interface",
    ),
    Flag("--port", "port", "IMGSEARCH_WEB_PORT", DEFAULT_PORT, int),
    replace(client_flags.ENCODER, help="encoder address, as the CLI takes it"),
    client_flags.INDEX,
    Flag(
        "--collection",
        "the collection (or alias) of the index service that searches use when a request names none; "
        "the page offers every collection, this one first",
        "IMGSEARCH_COLLECTION",
        DEFAULT_COLLECTION,
    ),
    Flag(
        "--media-root",
        "folder of the stored images: thumbnails and item views read an item's `source` path only inside it",
        "IMGSEARCH_MEDIA_ROOT",
        None,
        Path,
        shown_default="none: no thumbnails",
    ),
    Flag(
        "--max-upload-bytes",
        "largest image a request may upload; larger gets 413",
        "IMGSEARCH_WEB_MAX_UPLOAD_BYTES",
        DEFAULT_MAX_UPLOAD_BYTES,
        int,
    ),
    Flag("--max-k", "most results per search", "IMGSEARCH_WEB_MAX_K", DEFAULT_MAX_K, int),
    Flag(
        "--timeout-s",
        "deadline of each gRPC call",
        "IMGSEARCH_WEB_TIMEOUT_S",
        DEFAULT_TIMEOUT_S,
        float,
        shown_default=f"{DEFAULT_TIMEOUT_S:.0f}",
    ),
    replace(client_flags.TLS_CA, help="CA certificate (PEM) of the services; turns on TLS to them"),
    SERVICE_TOKEN,
    READ_TOKEN,
    Flag(
        "--show-source",
        "return the items' `source` metadata (the path each image had on the machine that indexed it) in "
        "the API's replies; by default they are left out, and thumbnails go by id",
        "IMGSEARCH_WEB_SHOW_SOURCE",
        False,
        switch=True,
    ),
    Flag(
        "--allow-indexing",
        "accept POST /api/items (add an uploaded image to the index) from requests that carry "
        "`Authorization: Bearer TOKEN`; needs a token (default off: read-only)",
        "IMGSEARCH_WEB_ALLOW_INDEXING",
        False,
        switch=True,
    ),
    Flag(
        "--keep-alive-timeout-s",
        "close a keep-alive connection idle this long after a reply",
        "IMGSEARCH_WEB_KEEP_ALIVE_TIMEOUT_S",
        DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        float,
        shown_default=f"{DEFAULT_KEEP_ALIVE_TIMEOUT_S:g}",
    ),
    Flag(
        "--header-timeout-s",
        "time a client has to send a request's line and headers, from its first byte (or from "
        "connecting); then 408 and the connection is closed: slowloris",
        "IMGSEARCH_WEB_HEADER_TIMEOUT_S",
        DEFAULT_HEADER_TIMEOUT_S,
        float,
        shown_default=f"{DEFAULT_HEADER_TIMEOUT_S:g}",
    ),
    Flag(
        "--body-timeout-s",
        "time a client has to send a request's whole body after its headers; then 408 and the "
        "connection is closed",
        "IMGSEARCH_WEB_BODY_TIMEOUT_S",
        DEFAULT_BODY_TIMEOUT_S,
        float,
        shown_default=f"{DEFAULT_BODY_TIMEOUT_S:g}: an 8 MiB upload at 2.2 Mbit/s",
    ),
    Flag(
        "--max-connections",
        "open connections (idle ones included) or requests in flight past which a request gets 503 at "
        "once (uvicorn's limit_concurrency)",
        "IMGSEARCH_WEB_MAX_CONNECTIONS",
        DEFAULT_MAX_CONNECTIONS,
        int,
    ),
    Flag(
        "--log-level",
        "log level of the gateway and uvicorn; debug adds one line per request, errors (status 400 and "
        "up) are logged at warning",
        "IMGSEARCH_LOG_LEVEL",
        "info",
        str.lower,
        choices=LOG_LEVELS,
    ),
    Flag(
        "--log-format",
        "log lines as text or JSON, as the services write them",
        "IMGSEARCH_LOG_FORMAT",
        "text",
        str.lower,
        choices=LOG_FORMATS,
    ),
]


def build_parser(prog: str = "python -m web") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The imgsearch web gateway: a page and a JSON API (/api/) over the encoder and index "
        "services, Prometheus metrics at /metrics, health at /healthz.",
        allow_abbrev=False,
    )
    add_flags(parser, WEB_FLAGS)
    return parser


def parse_settings(argv: Sequence[str] | None = None, prog: str = "python -m web") -> Settings:
    """Returns the settings from flags and env; exits with a message when they do not make sense."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    media_root = None
    if args.media_root is not None:
        media_root = Path(args.media_root).expanduser().resolve()
        if not media_root.is_dir():
            parser.error(f"--media-root {args.media_root} is not a folder")
    try:
        token = secret(args, SERVICE_TOKEN)
        read_token = secret(args, READ_TOKEN)
        return Settings(
            encoder=args.encoder,
            index=args.index,
            collection=args.collection or DEFAULT_COLLECTION,
            host=args.host,
            port=args.port,
            media_root=media_root,
            max_upload_bytes=args.max_upload_bytes,
            max_k=args.max_k,
            timeout_s=args.timeout_s,
            tls_ca=args.tls_ca,
            token=security.Secret(token) if token else None,
            allow_indexing=args.allow_indexing,
            read_token=security.Secret(read_token) if read_token else None,
            show_source=args.show_source,
            log_level=args.log_level,
            log_format=args.log_format,
            keep_alive_timeout_s=args.keep_alive_timeout_s,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            max_connections=args.max_connections,
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
