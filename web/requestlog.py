"""The gateway's per-request log and request ids, as the gRPC services have them
(imgsearch_server/metrics.py).

`RequestLog`, the outermost of the gateway's middlewares, takes the caller's `X-Request-Id` when it is a
plain token of up to 128 characters (else makes one: 16 random hex digits,
`imgsearch_server.metrics.request_id`), keeps it for the handlers (`request.state.request_id`, see
`request_id_of`), echoes it in the response header `X-Request-Id` and logs one line on `web.requests`: at
DEBUG when the status is below 400, at WARNING, with the error's detail (the JSON `detail` of the reply),
from 400 up. The line's fields (logging's `extra={"fields": ...}`, which `--log-format json` writes as
keys) are method, route (the path template, as the metrics label it), path, status, duration_ms,
request_id, client and, for an error, details.

Only the path is logged, never the query (ids, k): the path as sent, percent-encoded, cut at 200
characters."""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsearch.wire import REQUEST_ID_KEY
from imgsearch_server import metrics
from web.asgi import HttpMiddleware
from web.metrics import route_label

request_log = logging.getLogger("web.requests")

HEADER = REQUEST_ID_KEY.encode("ascii")  # in and out; ASGI header names are lowercase
MAX_PATH = 200
MAX_ERROR_BODY = 8 * 1024  # an error reply's body read for its detail; longer ones are left undetailed
MAX_DETAIL = 500


def request_id_of(scope: Scope) -> str | None:
    """The request id `RequestLog` gave this request (None outside it)."""
    state = scope.get("state")
    found = state.get("request_id") if isinstance(state, dict) else None
    return found if isinstance(found, str) else None


def _path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        text = raw.partition(b"?")[0].decode("ascii", "backslashreplace")
    else:
        text = quote(str(scope.get("path", "")), safe="/")
    text = "".join(c if c.isprintable() and not c.isspace() else quote(c) for c in text)
    return text if len(text) <= MAX_PATH else text[:MAX_PATH] + "..."


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _detail(body: bytes) -> str:
    """The reply's `detail`; for a health reply (no detail), the details of what is not serving."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    detail = parsed.get("detail")
    if isinstance(detail, str):
        text = detail
    elif detail is not None:  # FastAPI's default validation errors: a list
        text = json.dumps(detail)
    else:
        text = "; ".join(
            f"{name}: {part['detail']}"
            for name, part in parsed.items()
            if isinstance(part, dict) and part.get("ok") is False and isinstance(part.get("detail"), str)
        )
    return _one_line(text)


def _one_line(text: str) -> str:
    """`text` on one line (control characters escaped: nothing in it can forge a log line), cut short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


class RequestLog(HttpMiddleware):
    """Gives every HTTP request an id, echoes it and logs the request (an ASGI middleware); see the
    module's doc. Put it outermost, so that it times and logs what the other middlewares answer (a 413)."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        given = [(REQUEST_ID_KEY, value) for name, value in scope.get("headers", ()) if name == HEADER]
        rid = metrics.request_id(given)
        state = scope.get("state")
        if not isinstance(state, dict):
            state = scope["state"] = {}
        state["request_id"] = rid
        status = 500  # unless a response starts: an exception the server turns into a 500
        collect = False  # an error reply in JSON, read for its detail
        body = bytearray()
        failure = ""

        async def send_and_note(message: Message) -> None:
            nonlocal status, collect
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message["headers"] = [*headers, (HEADER, rid.encode("ascii"))]
                if status >= 400 and request_log.isEnabledFor(logging.WARNING):
                    types = [v for k, v in headers if k.lower() == b"content-type"]
                    collect = bool(types) and b"json" in types[0].lower()
            elif message["type"] == "http.response.body" and collect:
                body.extend(message.get("body", b""))
                if len(body) > MAX_ERROR_BODY:
                    collect = False
                    body.clear()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException as error:
            failure = _one_line(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            raise
        finally:
            elapsed = time.perf_counter() - started
            level = logging.DEBUG if status < 400 else logging.WARNING
            if request_log.isEnabledFor(level):
                details = failure or (_detail(bytes(body)) if collect and body else "")
                self._log(scope, level, status, elapsed, rid, details)

    @staticmethod
    def _log(scope: Scope, level: int, status: int, elapsed: float, rid: str, details: str) -> None:
        method = str(scope.get("method", ""))
        path = _path(scope)
        client = _client(scope)
        fields: dict[str, Any] = {
            "method": method,
            "route": route_label(scope),
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "request_id": rid,
            "client": client,
        }
        if details:
            fields["details"] = details
        request_log.log(
            level,
            "%s %s %d %.1f ms request_id=%s client=%s%s",
            method,
            path,
            status,
            elapsed * 1000,
            rid,
            client or "-",
            f": {details}" if details else "",
            extra={"fields": fields},
        )
