"""The optional read token (--read-token): the API holds the collection's images, ids and labels, so a
gateway whose port others can reach may ask every caller for a token. The page itself, its static files,
/healthz and /metrics hold no data and stay open (probes and Prometheus carry no token); everything else
needs `Authorization: Bearer TOKEN` or the cookie the page sets (an <img src> cannot send a header)."""

from __future__ import annotations

import hmac
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from web.asgi import HttpMiddleware, send_json
from web.settings import READ_TOKEN_COOKIE

OPEN_PATHS = frozenset({"/", "/healthz", "/metrics"})
OPEN_PREFIXES = ("/static/",)
AUTH_MARK = "read-token"  # the 401's `auth` field: how the page tells this 401 from the indexing token's
HOW = f"send Authorization: Bearer TOKEN or the cookie {READ_TOKEN_COOKIE}"


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def presented(headers: Headers) -> list[bytes]:
    """The tokens a request carries: its bearer token and its read-token cookie (percent-decoded)."""
    found = []
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip().encode("utf-8"))
    cookie = cookie_parser(headers.get("cookie", "")).get(READ_TOKEN_COOKIE, "")
    if cookie:
        found.append(unquote(cookie).encode("utf-8"))
    return found


class ReadTokenGate(HttpMiddleware):
    """An ASGI middleware: answers 401 (JSON, `WWW-Authenticate: Bearer`) to a request for anything but
    the open paths unless it carries one of `tokens` (the read token; the indexing token reads too).
    Compared with hmac.compare_digest, so the time taken does not tell how much of a guess was right."""

    def __init__(self, app: ASGIApp, tokens: list[str]) -> None:
        if not tokens or not all(tokens):
            raise ValueError("an empty read token would let anyone in")
        super().__init__(app)
        self.tokens = [token.encode("utf-8") for token in tokens]

    def problem(self, headers: Headers) -> str | None:
        """None when the request carries a token accepted here, else why not (never a token itself)."""
        given = presented(headers)
        if not given:
            return f"this gateway needs a read token: {HOW}"
        matches = [hmac.compare_digest(value, token) for value in given for token in self.tokens]
        return None if any(matches) else f"invalid read token: {HOW}"

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self.problem(Headers(scope=scope))
        if problem is None:
            await self.app(scope, receive, send)
            return
        headers = [(b"www-authenticate", b'Bearer realm="imgsearch"'), (b"cache-control", b"no-store")]
        await send_json(send, 401, {"detail": problem, "auth": AUTH_MARK}, headers)
