"""The upload limit: a request body over it gets 413 with a message, read no further than the limit."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from web.asgi import HttpMiddleware, send_json


def too_large_message(limit: int) -> str:
    return f"the upload is over the limit of {limit} bytes (--max-upload-bytes)"


class BodyLimit(HttpMiddleware):
    """An ASGI middleware: refuses a body declared (Content-Length) over `max_body_bytes` before reading
    it, and stops one that turns out longer while it is read (HTTPException 413 from `receive`, which the
    app's handlers turn into the JSON error). `limit` is the upload limit the message names."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, limit: int) -> None:
        super().__init__(app)
        self.max_body_bytes = max_body_bytes
        self.limit = limit

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_json(send, 413, {"detail": too_large_message(self.limit)}, [(b"connection", b"close")])
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large_message(self.limit))
            return message

        await self.app(scope, counted, send)
