"""TLS credentials and bearer-token auth for both services and the client; knows no service.

TLS keeps images, vectors and tokens private on the wire; the token decides who may call. Both are off
unless configured, so a local setup stays plaintext and open.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import grpc

from imgsearch.admission import OPEN_PREFIXES, refusal

log = logging.getLogger(__name__)

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


def _read_pem(path: PathLike, what: str, marker: str) -> bytes:
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


def server_credentials(cert_path: PathLike, key_path: PathLike) -> grpc.ServerCredentials:
    """Returns TLS credentials from a PEM certificate chain and its unencrypted PEM private key.

    The pair is loaded once with the `ssl` module first: gRPC would only say "failed to bind"."""
    certificate = _read_pem(cert_path, "TLS certificate", "-----BEGIN CERTIFICATE-----")
    key = _read_pem(key_path, "TLS key", "PRIVATE KEY-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as error:
        raise ValueError(
            f"the TLS key {key_path} and certificate {cert_path} do not make a pair "
            f"(or the key is encrypted): {error.reason or error}"
        ) from None
    return grpc.ssl_server_credentials([(key, certificate)])


def channel_credentials(ca_path: PathLike) -> grpc.ChannelCredentials:
    """Returns TLS credentials that trust only the CA certificate(s) in `ca_path`."""
    ca = _read_pem(ca_path, "TLS CA file", "-----BEGIN CERTIFICATE-----")
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


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>`; the health service stays open.

    With a read token too, that one is accepted for `read_methods` ("/pkg.Service/Method") only; any
    other call presenting it gets PERMISSION_DENIED. A refused request is never parsed."""

    def __init__(self, token: str, read_token: str | None = None, read_methods: Collection[str] = ()) -> None:
        if not token:
            raise ValueError("an empty token would let anyone in")
        if read_token is not None and (not read_token or read_token == token):
            raise ValueError("the read token must be set and differ from the token")
        self._expected = token.encode("utf-8")
        self._read = read_token.encode("utf-8") if read_token else None
        self._read_methods = frozenset(read_methods)

    def check(self, metadata: Sequence[tuple[str, Any]] | None, method: str = "") -> str | None:
        """Returns None when the metadata carries a token good for `method`, else why not (never the
        token itself)."""
        return self._check(metadata, method)[1]

    def _check(
        self, metadata: Sequence[tuple[str, Any]] | None, method: str
    ) -> tuple[grpc.StatusCode, str | None]:
        value = next((v for k, v in metadata or () if k == AUTH_KEY), None)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, presented = (value or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
        given = presented.strip().encode("utf-8")
        # compare_digest: the time taken does not tell how much of a guess was right
        if hmac.compare_digest(given, self._expected):
            return grpc.StatusCode.OK, None
        if self._read is not None and hmac.compare_digest(given, self._read):
            if method in self._read_methods:
                return grpc.StatusCode.OK, None
            name = method.rpartition("/")[2] or method
            return grpc.StatusCode.PERMISSION_DENIED, f"the read-only token may not call {name}"
        return grpc.StatusCode.UNAUTHENTICATED, "invalid token"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        code, problem = self._check(handler_call_details.invocation_metadata, method)  # type: ignore[arg-type]
        if problem is None:
            return handler
        log.warning("refused %s: %s", method, problem)
        return refusal(handler, code, problem)
