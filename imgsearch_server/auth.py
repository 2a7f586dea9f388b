"""The services' side of TLS and bearer-token auth: server credentials and the token interceptor.
The client's side (channels, call metadata, token files) is imgsearch/security.py.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Collection, Sequence
from typing import Any

import grpc

from imgsearch.security import AUTH_KEY, PathLike, read_pem
from imgsearch_server.admission import OPEN_PREFIXES, Continuation, refusal

log = logging.getLogger("imgsearch.security")  # the logger's name from before the move to imgsearch_server


def server_credentials(cert_path: PathLike, key_path: PathLike) -> grpc.ServerCredentials:
    """Returns TLS credentials from a PEM certificate chain and its unencrypted PEM private key.

    The pair is loaded once with the `ssl` module first: gRPC would only say "failed to bind"."""
    certificate = read_pem(cert_path, "TLS certificate", "-----BEGIN CERTIFICATE-----")
    key = read_pem(key_path, "TLS key", "PRIVATE KEY-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as error:
        raise ValueError(
            f"the TLS key {key_path} and certificate {cert_path} do not make a pair "
            f"(or the key is encrypted): {error.reason or error}"
        ) from None
    return grpc.ssl_server_credentials([(key, certificate)])


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
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
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
