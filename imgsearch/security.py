"""The client's side of TLS and bearer-token auth: channels, call metadata, token files; knows no service.
The services' side (server credentials, the token interceptor) is imgsearch_server/auth.py.

TLS keeps images, vectors and tokens private on the wire; the token decides who may call. Both are off
unless configured, so a local setup stays plaintext and open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

AUTH_KEY = "authorization"  # gRPC metadata keys are lowercase
PathLike = str | Path


class Secret:
    """A value that never shows itself in logs, reprs or `describe()`'s JSON (which uses str())."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


def read_pem(path: PathLike, what: str, marker: str) -> bytes:
    """Returns the file's bytes; a missing file or one without `marker` fails here, not at handshake."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if marker.encode() not in data:
        raise ValueError(f"the {what} {path} holds no PEM {marker.strip('-')} block")
    return data


def read_token_file(path: PathLike) -> str:
    """Returns the token in `path` (a Docker secret, say), surrounding whitespace stripped; never empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(f"cannot read the token file {path}: {error}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def channel_credentials(ca_path: PathLike) -> grpc.ChannelCredentials:
    """Returns TLS credentials that trust only the CA certificate(s) in `ca_path`."""
    ca = read_pem(ca_path, "TLS CA file", "-----BEGIN CERTIFICATE-----")
    return grpc.ssl_channel_credentials(root_certificates=ca)


def open_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    tls_ca: PathLike | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """Returns a TLS channel when a CA is given, else a plaintext one. `server_name` is the name the
    server's certificate must hold when it differs from the target's host (a probe of localhost)."""
    if not tls_ca:
        return grpc.insecure_channel(target, options=list(options))
    extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, channel_credentials(tls_ca), options=[*options, *extra])


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Returns the metadata that carries `token` on a call: plain metadata, so it works without TLS too."""
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()
